"""Train (or evaluate) on this machine's GPUs, or on CPU ranks, through torchrun.

    python -m launch.local CONFIG [--nproc-per-node N] [key=value ...]
    python -m launch.local CONFIG --nnodes 2 --node-rank 0 --master-addr HOST [--master-port P] [key=value ...]
    python -m launch.local CONFIG --evaluate WEIGHTS [--crops 1|10] [--resize R --crop C] [--flip] [key=value ...]

The config is checked here, before any process starts; then torchrun runs in this process. This
launcher forwards the stop signals (SIGTERM, and SIGUSR1 and SIGUSR2: a scheduler's warning before
the time limit) to the ranks: torchrun starts each rank in a session of its own, so a signal to this
process group would not reach them. When every rank stopped to be resumed (exit 75), so does this.
"""

from __future__ import annotations

import argparse
import signal
import sys

import psutil
import torch

from pipeline.boundary import NONFINITE_EXIT_CODE
from pipeline.checkpoint import RESUME_EXIT_CODE, resume_command, run_again
from pipeline.cli import command
from pipeline.config import global_batch, load_config
from pipeline.distributed import free_port
from pipeline.train import per_rank_batch

USAGE_EXIT_CODE = 2  # a config, dataset, checkpoint or rank error that the run names


def torchrun_args(args: argparse.Namespace) -> list[str]:
    """torchrun's arguments for ``args``; static rendezvous on the master address and port."""
    port = args.master_port or (free_port() if args.nnodes == 1 else 29500)
    module = ["-m", "pipeline.evaluate"] if args.evaluate else ["-m", "pipeline.train"]
    program_args = [args.config, *([args.evaluate, *evaluation_args(args)] if args.evaluate else []),
                    *args.overrides]
    return [f"--nproc-per-node={args.nproc_per_node}", f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}",
            f"--master-addr={args.master_addr}", f"--master-port={port}", "--no-python", sys.executable,
            *module, *program_args]


EVALUATION_OPTIONS = ("crops", "resize", "crop", "out")  # pipeline.evaluate's, passed on with --evaluate


def evaluation_args(args: argparse.Namespace) -> list[str]:
    """``pipeline.evaluate``'s own options given to the launcher (it checks them)."""
    words = [f"--{name}={getattr(args, name)}" for name in EVALUATION_OPTIONS if getattr(args, name) is not None]
    return words + (["--flip"] if args.flip else [])


def forward_to_ranks(signum, frame) -> None:
    """Passes a stop signal on to the ranks (torchrun's children): each checkpoints at its next step."""
    for child in psutil.Process().children():
        try:
            child.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def torchrun_signal_args() -> list[str]:
    """Leave SIGTERM to this launcher where torchrun can be told so (PyTorch 2.9 and later): torchrun would
    otherwise stop on it and SIGKILL the ranks 30 s later, and exit 1; forwarded, the ranks checkpoint in their
    own time and exit 75. Older torchruns forward SIGTERM themselves and exit 1."""
    from torch.distributed.run import get_args_parser

    words = ["--signals-to-handle=SIGINT,SIGHUP,SIGQUIT"]
    parsed, _ = get_args_parser().parse_known_args([*words, "training_script"])
    return words if hasattr(parsed, "signals_to_handle") else []


def run_torchrun(argv: list[str], resume: str = "auto") -> int:
    """torchrun in this process; 75 when the ranks stopped to be resumed (exit 75, or SIGTERMed by torchrun
    after another rank did)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward_to_ranks)
    try:
        torchrun([*torchrun_signal_args(), *argv])
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        # torchrun SIGTERMs the other ranks once the first exits (each stop checkpoint is on disk by then), and
        # SIGKILLs those still there 30 s later: a rank that hung (SIGSTOP, a stuck read) while the others' hang
        # watches ended them (pipeline.hang)
        if RESUME_EXIT_CODE in codes and codes <= {RESUME_EXIT_CODE, -signal.SIGTERM, -signal.SIGKILL}:
            hung = sorted(rank for rank, f in err.failures.items() if f.exitcode == -signal.SIGKILL)
            again = run_again(resume)
            if hung:
                print(f"rank(s) {', '.join(map(str, hung))} hung and were killed, the others stopped after "
                      f"run.hang_timeout_s with their stacks in the log; run {again} to resume from the last "
                      f"checkpoint (exit {RESUME_EXIT_CODE}), {resume_command(resume)}", file=sys.stderr)
            else:
                print(f"every rank checkpointed and stopped; run {again} to resume (exit {RESUME_EXIT_CODE}), "
                      f"{resume_command(resume)}", file=sys.stderr)
            return RESUME_EXIT_CODE
        rank, first = err.get_first_failure()
        if first.exitcode in (USAGE_EXIT_CODE, NONFINITE_EXIT_CODE):  # a refusal, or the run diverged: said above
            print(f"rank {rank} stopped with exit status {first.exitcode} (its error is above)", file=sys.stderr)
            return first.exitcode
        raise
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML recipe, e.g. configs/mini.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value words that override the recipe")
    parser.add_argument("--nproc-per-node", type=int, default=torch.cuda.device_count() or 1,
                        help="ranks on this node (default: the number of GPUs, or 1 without one)")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1", help="host of node rank 0")
    parser.add_argument("--master-port", type=int, default=None,
                        help="default: a free port on one node, 29500 on several")
    parser.add_argument("--evaluate", metavar="WEIGHTS", help="evaluate these weights instead of training")
    views = parser.add_argument_group("with --evaluate (python -m pipeline.evaluate --help)")
    views.add_argument("--crops", type=int, help="1 (the centre crop) or 10 (the paper's)")
    views.add_argument("--flip", action="store_true", help="average the centre crop with the mirror image's")
    views.add_argument("--resize", type=int, help="the shorter side before the crops")
    views.add_argument("--crop", type=int, help="the square crop")
    views.add_argument("--out", help="where to write eval.json (default: beside the weights)")
    args = parser.parse_intermixed_args(argv)
    given = [f"--{name}" for name in (*EVALUATION_OPTIONS, "flip") if getattr(args, name) not in (None, False)]
    if given and not args.evaluate:
        parser.error(f"{', '.join(given)}: options of an evaluation, given without --evaluate WEIGHTS")
    if args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        parser.error(f"need --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes; got "
                     f"{args.nproc_per_node}, {args.nnodes}, {args.node_rank}")
    if args.nnodes > 1 and args.master_addr in ("127.0.0.1", "localhost") and not args.master_port:
        print("note: several nodes on 127.0.0.1 port 29500; pass --master-addr with node 0's host name "
              "when the nodes are separate machines", file=sys.stderr)
    return args


@command()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not args.evaluate:
        world = args.nproc_per_node * args.nnodes
        per_rank_batch(global_batch(cfg.train, world), world)
    else:  # views that cannot be made are refused here, before any rank starts
        from pipeline.evaluate import views_of

        views_of(cfg, args.crops or 1, args.flip, args.resize or 0, args.crop or 0)
    return run_torchrun(torchrun_args(args), cfg.run.resume)


if __name__ == "__main__":
    sys.exit(main())
