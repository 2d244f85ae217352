"""MLflow tracking against a real ``mlflow server`` (SQLite backend) started here on 127.0.0.1."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
MINI = str(ROOT / "configs/mini.yaml")
SECRET = "hunter2-s3cret-value"
pytestmark = pytest.mark.slow



class Server:
    """``mlflow server`` on 127.0.0.1 with an SQLite store; stop() and start() keep the store."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"],
            stdout=open(self.folder / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


def words(run_dir, data, uri, experiment, *extra):
    return [f"run.dir={run_dir}", f"data.root={data}", "tracking.backend=mlflow", f"tracking.uri={uri}",
            f"tracking.experiment={experiment}", "train.epochs=2", "train.batch_size=64", "train.log_every_steps=2",
            "checkpoint.every_steps=4", "data.workers=1", "tracking.flush_timeout_s=30", *extra]


def runs_of(uri, experiment):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def assert_steps_strictly_increase(client, run_id):
    for key in client.get_run(run_id).data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == sorted(set(steps)), (key, steps)


def test_two_ranks_give_one_run_with_params_tags_metrics_and_artifacts_and_no_secret(tmp_path, server, mini_data):
    run_dir = tmp_path / "run"
    # credentials in the URI and in the environment must never reach MLflow
    uri = server.uri.replace("http://", f"http://user:{SECRET}@")
    # system metrics are sampled every 10 s by default: sooner here, as the run is short
    env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": SECRET, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    result = subprocess.run([sys.executable, "-m", "launch.local", MINI, "--nproc-per-node", "2",
                             *words(run_dir, mini_data, uri, "two-ranks", "tracking.register_model=densenet-mini")],
                            env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, runs = runs_of(server.uri, "two-ranks")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["train.epochs"] == "2" and params["model.name"] == "densenet_bc"
    assert params["train.batch_size"] == "64" and "optim.lr" in params
    assert tags["world_size"] == "2" and tags["version.torch"] and tags["version.dali"]
    assert tags["hosts"] == socket.gethostname() and tags["gpu"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert metrics["val/top1"] == pytest.approx(summary["val_top1"])
    assert {"train/loss", "train/lr", "train/images_per_s", "train/data_wait", "val/top5", "val/loss",
            "epoch_seconds", "checkpoint_seconds"} <= set(metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(2, 21, 2))
    assert any(key.startswith("system/") for key in metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "train.log", "summary.json", "model_final.pt"} <= artifacts
    versions = client.search_model_versions("name='densenet-mini'")
    assert [v.run_id for v in versions] == [run.info.run_id] and versions[0].source.endswith("model_final.pt")

    everything = json.dumps([params, tags]) + (run_dir / "metrics.jsonl").read_text()
    for name in ("config.yaml", "train.log", "summary.json"):
        everything += Path(client.download_artifacts(run.info.run_id, name, str(tmp_path))).read_text()
    assert SECRET not in everything


def test_a_killed_and_restarted_run_continues_the_same_mlflow_run(tmp_path, server, mini_data):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = [sys.executable, "-m", "pipeline.train", MINI, *words(run_dir, mini_data, server.uri, "resumed",
                                                                 "train.log_every_steps=1")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    metrics_file = run_dir / "metrics.jsonl"
    while not (metrics_file.exists() and '"global_step": 14' in metrics_file.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(1.5)  # let the sender deliver what it holds, so the restart has steps to skip
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert subprocess.run(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, timeout=600).returncode == 0
    client, runs = runs_of(server.uri, "resumed")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert_steps_strictly_increase(client, runs[0].info.run_id)
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == list(range(1, 21))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert runs[0].data.metrics["val/top1"] == pytest.approx(summary["val_top1"])


@pytest.fixture
def own_server(tmp_path):
    """A server this test may stop and start again; always stopped at the end."""
    server = Server(tmp_path / "server")
    server.folder.mkdir()
    server.start()
    yield server
    if server.proc.poll() is None:
        server.stop()


def test_training_survives_the_server_going_away_and_coming_back(tmp_path, own_server, mini_data):
    server = own_server
    run_dir, log = tmp_path / "run", tmp_path / "log"
    cmd = [sys.executable, "-m", "pipeline.train", MINI, *words(run_dir, mini_data, server.uri, "outage",
                                                                 "train.log_every_steps=1", "train.epochs=3")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    metrics_file = run_dir / "metrics.jsonl"
    while not (metrics_file.exists() and '"global_step": 3' in metrics_file.read_text()):
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    server.stop()
    time.sleep(6)
    assert proc.poll() is None, "training must go on while the server is away"
    server.start()
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("is unreachable") == 1 and "is back" in text
    client, runs = runs_of(server.uri, "outage")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == list(range(1, 31))


@pytest.mark.parametrize("required", [True, False])
def test_an_unreachable_server_at_start_is_explained(tmp_path, mini_data, required):
    uri = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run([sys.executable, "-m", "pipeline.train", MINI,
                             *words(tmp_path / "run", mini_data, uri, "none", f"tracking.required={required}",
                                    "train.epochs=1")], capture_output=True, text=True, timeout=600)
    assert "Cannot reach the MLflow tracking server at " + uri in result.stdout + result.stderr
    if required:
        assert result.returncode == 2 and not (tmp_path / "run" / "summary.json").exists()
    else:
        assert result.returncode == 0 and "WITHOUT tracking" in result.stdout


def test_insights_reach_the_run_as_images_each_epoch_and_gradient_norms_on_the_step_axis(tmp_path, server,
                                                                                          mini_data):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "pipeline.train", MINI,
                             *words(run_dir, mini_data, server.uri, "insights", "insights.every_steps=3")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, runs = runs_of(server.uri, "insights")
    run_id = runs[0].info.run_id
    epoch_ends = [json.loads(line)["global_step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["event"] == "val"]
    assert epoch_ends == [10, 20]  # 2 epochs of 10 steps
    names = [a.path for a in client.list_artifacts(run_id, "images")]
    for key in ("feature_reuse", "gradient_flow"):
        pattern = rf"images/visual[~#]{key}[+%]step[+%](\d+)[+%]"  # then a timestamp and a uuid
        steps = sorted(int(m[1]) for n in names if (m := re.match(pattern, n)) and not n.endswith("compressed.webp"))
        assert steps == [0, 0, *epoch_ends], (key, names)  # each epoch's, and each again at step 0 as the latest
    assert {a.path for a in client.list_artifacts(run_id, "insights")} == {"insights/feature_reuse.png",
                                                                           "insights/gradient_flow.png"}
    history = client.get_metric_history(run_id, "visual/grad_norm/block1.layer01")
    assert [m.step for m in history] == [3, 6, 9, 12, 15, 18] and all(m.value > 0 for m in history)
    assert {f"visual/grad_norm/{u}" for u in ("stem", "block3.layer02", "classifier")} <= set(runs[0].data.metrics)

    # the command on the run's own weights: heatmaps, numbers, and the gradient flow from metrics.jsonl
    out = subprocess.run([sys.executable, "-m", "pipeline.insights", str(run_dir / "model_final.pt"),
                          str(run_dir / "config.yaml"), "--out", str(tmp_path / "pictures")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (tmp_path / "pictures").iterdir()} == {"feature_reuse.png", "feature_reuse.csv",
                                                                   "gradient_flow.png"}


MOUNTS = """22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 27 0:50 / /home rw,relatime - nfs4 filer:/home rw,vers=4.2
41 40 0:51 / /home/alice/scratch rw,relatime - lustre 10.0.0.1@o2ib:/scratch rw
42 27 0:52 / /local\\040disk rw,relatime - xfs /dev/nvme0n1 rw
"""


def test_a_sweep_on_one_sqlite_store_over_a_network_filesystem_is_refused_with_the_fix():
    from pipeline.tracking import filesystem_type, shared_sqlite_problem

    assert [filesystem_type(p, MOUNTS) for p in ("/home/bob/runs", "/home/alice/scratch/r", "/local disk/x", "/opt",
                                                 "/homework")] == ["nfs4", "lustre", "xfs", "ext4", "ext4"]
    problem = shared_sqlite_problem("sqlite:////home/bob/runs/mlflow.db", 16, MOUNTS)
    assert problem.startswith("The MLflow store /home/bob/runs/mlflow.db is one SQLite file on a network filesystem "
                              "(nfs4), where SQLite's locks are not reliable: these 16 jobs writing it at once")
    assert "mlflow server --backend-store-uri" in problem and "tracking.uri=http://LOGIN-NODE:5000" in problem
    assert shared_sqlite_problem("sqlite:////local disk/mlflow.db", 16, MOUNTS) is None
    assert shared_sqlite_problem("http://login:5000", 16, MOUNTS) is None
    assert filesystem_type("/tmp") != ""  # this machine's own table is read


def test_each_node_logs_its_system_metrics_into_the_one_run_under_its_own_name(tmp_path, server, mini_data):
    # two nodes of one rank each, on this machine: torchrun gives each its own LOCAL_RANK 0, as two hosts would
    port, run_dir = free_port(), tmp_path / "run"
    env = {**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "launch.local", MINI, "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--master-port", str(port),
                               *words(run_dir, mini_data, server.uri, "two-nodes", "insights.enabled=false")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    client, [run] = runs_of(server.uri, "two-nodes")
    assert run.info.status == "FINISHED"  # the second node neither reopened nor ended it
    keys = set(run.data.metrics)
    for node in ("node0", "node1"):
        assert {f"system/{node}/cpu_utilization_percentage", f"system/{node}/system_memory_usage_megabytes"} <= keys
    assert not any(re.match(r"system/[a-z_]+$", key) for key in keys)  # none without a node's name
    host = socket.gethostname()
    assert run.data.tags["system_metrics_nodes"] == f"node0={host}, node1={host}"


def test_nodes_are_named_in_rank_order_by_their_first_rank_and_one_node_keeps_plain_names():
    from pipeline.train import node_ids

    assert node_ids([0, 1, 0, 1, 0, 1]) == ["node0", None, "node1", None, "node2", None]
    assert node_ids([0, 1, 2, 3]) == [None] * 4
