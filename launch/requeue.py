"""What the end of a SLURM job's attempt means: done, stopped on purpose, or a fault to requeue after.

One place answers "a task of the job died, what now?". Each task runs under ``srun --kill-on-bad-exit=1``, so
the first task that fails ends the whole step at once, and the job script then runs::

    python -m launch.requeue SUBMITIT_FOLDER SRUN_STATUS

An attempt that ended on purpose left a record in ``run.dir/slurm/`` (:func:`record_end`): finished, refused
(exit 2), diverged (exit 3), stopped by a signal, or requeued by rank 0 after a time limit or a preemption.
Anything else is a fault (a rank killed, crashed, out of memory, hung and ended by its hang watch, a node
lost): the job is requeued with ``scontrol requeue`` and resumes from its newest checkpoint, while the
failures counted stay within ``slurm.max_failures``. A failure at the same checkpoint step as the one before
(no progress since) counts twice, so with the default of 3 a fault that repeats at one step (a sample that
crashes the decoder, say) ends the job after its third attempt instead of requeueing it in a loop, and
faults that each come after a new checkpoint after its fourth. Every failure is kept in
``run.dir/slurm/failures.json``; ``python -m launch.slurm status`` shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from pipeline.checkpoint import atomic_write_bytes, read_pointer
from pipeline.cli import command

RUNS_FILE = "runs.json"  # in submitit's folder: job id -> run dir (a sweep's array has one run dir per task)
FAILURES_FILE = "slurm/failures.json"  # in run.dir


def job_key(env=os.environ) -> str:
    """This job's id as submitit names it: ``123``, or ``123_4`` for task 4 of an array."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def attempt(env=os.environ) -> int:
    """0 for the first attempt of the job, then one more per requeue."""
    return int(env.get("SLURM_RESTART_COUNT") or 0)


def remember_runs(folder: Path, runs: dict[str, str]) -> None:
    """Note which run dir each job id of ``folder`` trains (at submission)."""
    path = folder / RUNS_FILE
    known = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_bytes(path, json.dumps({**known, **runs}, indent=1).encode())


def run_dir_of(folder: Path, job: str) -> Path:
    return Path(json.loads((folder / RUNS_FILE).read_text())[job])


def _end_record(run_dir: Path, job: str, restart: int) -> Path:
    return Path(run_dir) / "slurm" / f"ended-{job}-{restart}.json"


def record_end(run_dir: str | Path, status: int, why: str, env=os.environ) -> None:
    """Note that this attempt ended on purpose (not a fault), so the job script does not requeue it."""
    record = {"status": status, "why": why, "host": socket.gethostname(),
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_bytes(_end_record(Path(run_dir), job_key(env), attempt(env)), json.dumps(record).encode())


def failures(run_dir: str | Path) -> list[dict]:
    """The faults recorded for this run dir, oldest first."""
    path = Path(run_dir) / FAILURES_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def requeues_after_failures(run_dir: str | Path, job: str) -> int:
    """How many of job ``job``'s requeues followed a fault (the rest followed time limits and preemptions)."""
    return sum(1 for f in failures(run_dir) if f["job"] == job and f["requeued"])


def failure_count(past: list[dict], step: int) -> int:
    """The weight of the failures so far plus a new one at checkpoint ``step``: each counts 1, or 2 when no
    checkpoint was written since the one before it."""
    count, last_step = 0, None
    for f in [*past, {"step": step}]:
        count += 2 if f["step"] == last_step else 1
        last_step = f["step"]
    return count


def after_step(folder: Path, status: int, max_failures: int | None = None, env=os.environ) -> str:
    """Decide after the job's step ended with ``status``; requeue on a fault within the budget. Returns what
    was decided, as the job's log says it."""
    if status == 0:
        return ""
    job, restart = job_key(env), attempt(env)
    run_dir = run_dir_of(folder, job)
    ended = _end_record(run_dir, job, restart)
    if ended.is_file():
        record = json.loads(ended.read_text())
        return f"attempt {restart + 1} of job {job} ended on purpose ({record['why']}): not requeued by this script"
    if max_failures is None:
        from pipeline.config import load_config

        max_failures = load_config(run_dir / "config.yaml", profiles=False).slurm.max_failures
    pointer = read_pointer(run_dir)
    step = pointer["global_step"] if pointer else 0
    past = failures(run_dir)
    mine = [f for f in past if f["job"] == job]
    count = failure_count(mine, step)
    can = shutil.which("scontrol") is not None
    where = f"checkpoint step {step}" if pointer else "the start (no checkpoint yet)"
    what = (f"attempt {restart + 1} of job {job} failed (srun exit status {status}: a task died, crashed or hung; "
            f"its own log in {folder} says why); {len(mine) + 1} failure(s) of this job, counted {count} of "
            f"slurm.max_failures={max_failures}")
    if count > max_failures:
        why = ("too many failures (one with no checkpoint written since the one before counts twice). Fix the "
               f"cause, then submit the same command again to resume from {where}")
    elif not can:
        why = f"scontrol is not on PATH here. Submit the same command again to resume from {where}"
    else:
        why = ""
    record = {"job": job, "attempt": restart + 1, "status": status, "step": step, "count": count,
              "requeued": not why, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    # on disk before the requeue: SLURM ends this script soon after it
    atomic_write_bytes(run_dir / FAILURES_FILE, json.dumps([*past, record], indent=1).encode())
    if not why:
        note(run_dir, f"{what}: requeued, resuming from {where}", failed=False)
        try:
            subprocess.run(["scontrol", "requeue", job], check=True, timeout=60, capture_output=True, text=True)
            return f"{what}: requeued, resuming from {where}"
        except (subprocess.SubprocessError, OSError) as err:
            detail = str(getattr(err, "stderr", "") or err).strip()
            why = f"scontrol requeue failed ({detail}). Submit the same command again to resume from {where}"
            record["requeued"] = False
            atomic_write_bytes(run_dir / FAILURES_FILE, json.dumps([*past, record], indent=1).encode())
    message = f"{what}: not requeued, {why}"
    note(run_dir, message, failed=True)
    return message


def note(run_dir: Path, message: str, failed: bool) -> None:
    """``message`` into the run's ``train.log``, and a run given up on FAILED in MLflow, with the reason."""
    stamp = datetime.now().strftime("%H:%M:%S")
    with open(run_dir / "train.log", "a") as log:
        log.write(f"{stamp} {'ERROR' if failed else 'WARNING'} launch.requeue: {message}\n")
    ids = run_dir / "mlflow_run.json"
    if failed and ids.is_file():
        try:
            from pipeline.config import load_config
            from pipeline.tracking import connect, tracking_uri

            client = connect(tracking_uri(load_config(run_dir / "config.yaml", profiles=False)))
            run_id = json.loads(ids.read_text())["run_id"]
            client.set_tag(run_id, "failure", message[:5000])
            client.set_terminated(run_id, status="FAILED")
        except Exception as err:  # the decision stands without MLflow
            print(f"warning: could not mark the MLflow run FAILED: {err}", file=sys.stderr)


def job_folder_problem(folder: Path, env=os.environ) -> str | None:
    """Why ``folder`` cannot tell this job's run dir (not in a SLURM job, not a launch.slurm folder), or None."""
    if not env.get("SLURM_JOB_ID"):
        return ("SLURM_JOB_ID is not set: this runs in the job script that `python -m launch.slurm` writes, after "
                "the job's step")
    path = folder / RUNS_FILE
    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return (f"cannot read {path} ({type(err).__name__}): '{folder}' is not the job folder of a job submitted "
                "with `python -m launch.slurm`")
    if job_key(env) not in runs:
        return f"{path} does not name job {job_key(env)}: pass the job folder this job was submitted with"
    return None


@command()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.requeue", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="submitit's folder of the job")
    parser.add_argument("status", type=int, help="srun's exit status")
    args = parser.parse_args(argv)
    problem = job_folder_problem(args.folder) if args.status else None
    if problem:
        parser.error(problem)
    message = after_step(args.folder, args.status)
    if message:
        print(message, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
