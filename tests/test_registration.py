"""Registering a run in MLflow: nothing else in the process can break it, a failure names the store's real problem,
and a run whose registration failed is never left RUNNING or SCHEDULED."""

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from pipeline.config import flatten, load_config
from pipeline.tracking import RUN_ID_FILE, TrackingError, environment, open_tracker, unreachable

ROOT = Path(__file__).resolve().parents[1]
MINI = str(ROOT / "configs/mini.yaml")


def as_a_user_runs_it() -> dict[str, str]:
    """This environment without what makes MLflow think it runs under a test or CI (it then skips telemetry)."""
    return {k: v for k, v in environment().items()
            if k not in ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}


def test_mlflow_telemetry_is_off_in_our_processes_and_the_processes_they_start():
    probe = "import mlflow.telemetry as t; print('telemetry', t.get_telemetry_client())"
    parent = ("import launch.local, subprocess, sys; " + probe.replace("print(", "print('parent', ")
              + f"; subprocess.run([sys.executable, '-c', {probe!r}])")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**as_a_user_runs_it(), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["parent telemetry None", "telemetry None"], out.stdout


def test_the_environment_copy_survives_another_thread_adding_and_removing_variables():
    stop = threading.Event()

    def churn():  # what MLflow's telemetry thread does to _MLFLOW_TELEMETRY_SESSION_ID
        while not stop.is_set():
            os.environ["_CHURNED_BY_A_THREAD"] = "x"
            del os.environ["_CHURNED_BY_A_THREAD"]

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            assert environment()["PATH"] == os.environ["PATH"]
    finally:
        stop.set()
        thread.join()


def config(tmp_path: Path, uri: str, *extra: str):
    return load_config(MINI, [f"run.dir={tmp_path / 'run'}", f"tracking.uri={uri}", "tracking.required=true",
                              "tracking.system_metrics=false", *extra])


def test_a_store_file_that_is_not_sqlite_is_named_with_its_problem_not_sent_to_start_a_server(tmp_path):
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"not a database, a text file someone saved here\n" * 100)
    with pytest.raises(TrackingError) as caught:
        open_tracker(config(tmp_path, f"sqlite:///{store}"), tmp_path / "run", 1, ["host"])
    message = str(caught.value)
    assert f"Cannot register the run in the MLflow store {store} (a local SQLite file, not a server)" in message
    assert f"{store} is not an SQLite database: move it aside" in message
    assert "mlflow server" not in message


def test_each_store_gets_the_advice_that_fits_it(tmp_path):
    error = ConnectionError("refused")
    assert "Start it (mlflow server ...)" in unreachable("https://mlflow.example.org", error)
    missing = unreachable(f"sqlite:///{tmp_path}/gone/mlflow.db", error)
    assert f"Its folder {tmp_path}/gone does not exist" in missing and "mlflow server" not in missing
    assert "looks sound: the registration itself failed" in unreachable(f"sqlite:///{tmp_path}/mlflow.db",
                                                                         KeyError("_MLFLOW_TELEMETRY_SESSION_ID"))


def test_a_new_run_that_fails_to_register_is_deleted_and_the_message_says_so(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "run" / RUN_ID_FILE).mkdir(parents=True)  # the run id cannot be written: a real OSError
    with pytest.raises(TrackingError, match=r"The MLflow run (\w+) it had begun is deleted\.") as caught:
        open_tracker(config(tmp_path, uri), tmp_path / "run", 1, ["host"])
    run = MlflowClient(uri).get_run(re.search(r"The MLflow run (\w+)", str(caught.value)).group(1))
    assert run.info.lifecycle_stage == "deleted"
    assert "IsADirectoryError" in str(caught.value)


def test_a_reopened_run_that_fails_to_register_this_attempt_is_marked_failed_not_left_running(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = open_tracker(config(tmp_path, uri), tmp_path / "run", 1, ["host"])
    first.finish([])
    other = open_tracker(config(tmp_path, uri, f"run.dir={tmp_path / 'other'}"), tmp_path / "other", 1, ["host"])
    try:  # MLflow holds one active run per process: reopening the first one now fails after it was reopened
        with pytest.raises(TrackingError, match=f"The MLflow run {first.run_id} is marked FAILED"):
            open_tracker(config(tmp_path, uri), tmp_path / "run", 1, ["host"])
        run = MlflowClient(uri).get_run(first.run_id)
        assert run.info.status == "FAILED" and run.info.lifecycle_stage == "active"
        assert mlflow.active_run().info.run_id == other.run_id  # the run that failed ended only itself
    finally:
        other.finish([])


@pytest.mark.slow
def test_a_two_rank_run_registers_fifty_times_in_a_row_under_cpu_load(tmp_path):
    tries = 50
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = subprocess.run([sys.executable, str(ROOT / "tests/register_ranks.py"), str(tmp_path), str(tries)],
                             capture_output=True, text=True, timeout=1200, cwd=ROOT,
                             env={**as_a_user_runs_it(), "PYTHONPATH": str(ROOT)})
    finally:
        burner.kill()
        burner.wait()
    assert out.returncode == 0, out.stdout[-4000:]
    cfg = config(tmp_path, "sqlite:///x")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              max_results=1000)
    params = len(flatten(OmegaConf.to_container(cfg, resolve=True)))
    assert len(runs) == tries and {run.info.status for run in runs} == {"FINISHED"}
    assert {len(run.data.params) for run in runs} == {params}


@pytest.mark.slow
def test_a_finished_run_started_again_says_so_and_leaves_its_mlflow_run_as_it_ended(tmp_path):
    run_dir, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "pipeline.train", MINI, f"run.dir={run_dir}", "data.backend=synthetic",
               "data.synthetic_steps=4", "train.batch_size=8", "data.val_batch_size=8", "train.epochs=1",
               "tracking.backend=mlflow", f"tracking.uri={uri}", "tracking.system_metrics=false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, whatever the working directory
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(uri)
    run_id = json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"]
    ended, summary = client.get_run(run_id).info, (run_dir / "summary.json").read_bytes()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr
    assert f"The run in {run_dir} finished already" in said and "choose a new run.dir" in said, said[:4000]
    run = client.get_run(run_id).info
    assert (run.status, run.start_time, run.end_time) == ("FINISHED", ended.start_time, ended.end_time)
    assert (run_dir / "summary.json").read_bytes() == summary
    assert len(client.search_runs([run.experiment_id])) == 1
