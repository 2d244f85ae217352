"""Run ``python -m pipeline.train`` with a stop signal sent to this process at a chosen moment.

    python tests/stop_at.py MOMENT[@RANK] CONFIG OVERRIDES...

MOMENT is ``step:N`` (SIGUSR2 just before the step boundary of global step N, as if it arrived during that
step) or ``validation:E`` (SIGUSR2 just after validation of epoch E, counted from 0, before its end-of-epoch
checkpoint). With ``@RANK`` only that rank sends it (the others learn of it from the ranks' agreement); without,
every rank. The moment is printed, so a failure names it.
"""

import os
import signal
import sys

import pipeline.train as train


def main(argv: list[str]) -> int:
    moment, _, only = argv[0].partition("@")
    kind, _, number = moment.partition(":")
    at = int(number)
    rank = int(os.environ.get("RANK", 0))
    if only and int(only) != rank:
        return train.cli(argv[1:])
    if kind not in ("step", "validation"):
        raise SystemExit(f"unknown moment {moment!r}: use step:N or validation:E")
    print(f"stop_at: SIGUSR2 to rank {rank} at {moment}", flush=True)

    def send():
        print(f"stop_at: sending SIGUSR2 at {moment}", flush=True)
        os.kill(os.getpid(), signal.SIGUSR2)

    if kind == "step":
        on_step = train.Run.on_step

        def on_step_then(self, global_step, *step):
            if global_step == at:
                send()
            return on_step(self, global_step, *step)

        train.Run.on_step = on_step_then
    else:
        validate = train.Run.validate

        def validate_then(self, epoch, train_seconds):
            validate(self, epoch, train_seconds)
            if epoch == at:
                send()

        train.Run.validate = validate_then
    return train.cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
