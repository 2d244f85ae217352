"""Register a 2-rank run in MLflow TRIES times, each time from two fresh rank processes.

    python tests/register_ranks.py STORE_DIR TRIES

Each try forks two ranks from this process, which has imported the pipeline and MLflow and opened the store (as
every rank has by the time it registers; the store's one-time schema check, seconds on a busy machine, is not
repeated per try; its connections are not pooled, so no SQLite connection crosses a fork). They join a gloo group
and run ``pipeline.train.start_tracking`` against the SQLite store STORE_DIR/mlflow.db with
``tracking.required=true``, then rank 0 finishes the run. Prints one line per try:
``try N: exit codes A B``; exits 1 if any rank of any try failed.
"""

import multiprocessing
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import pipeline.train as train
from pipeline.config import load_config
from pipeline.distributed import free_port, init_distributed, shutdown

MINI = str(Path(__file__).resolve().parents[1] / "configs/mini.yaml")


def rank(number: int, port: int, store: Path, run_dir: Path) -> None:
    os.environ.update(RANK=str(number), LOCAL_RANK=str(number), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config(MINI, [f"run.dir={run_dir}", f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
                             "tracking.required=true", "tracking.system_metrics=false"])
    dist = init_distributed(60)
    try:
        with ExitStack() as held:
            tracker = train.start_tracking(cfg, dist, run_dir, ["localhost", "localhost"], [0, 1], held)
            if tracker:
                tracker.finish([])
    except train.TrackingError as err:
        print(f"rank {number}: {err}", flush=True)
        shutdown(together=True)
        sys.exit(3)
    shutdown(together=True)


def main(store: Path, tries: int) -> int:
    import mlflow  # after the pipeline, as in a rank: pipeline.tracking switches MLflow's telemetry off first

    os.environ["MLFLOW_SQLALCHEMYSTORE_POOLCLASS"] = "NullPool"
    mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}").search_experiments(max_results=1)  # records no telemetry
    fork = multiprocessing.get_context("fork")
    failed = 0
    for attempt in range(tries):
        port = free_port()
        ranks = [fork.Process(target=rank, args=(n, port, store, store / f"run-{attempt}")) for n in range(2)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(120)
        codes = [process.exitcode for process in ranks]
        failed += any(codes)
        print(f"try {attempt}: exit codes {codes[0]} {codes[1]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))
