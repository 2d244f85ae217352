"""Real multi-process runs on gloo: torchrun through launch.local, on one and on two "nodes"."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.synthetic import write_synthetic_imagenet
from pipeline.distributed import RankError, check_rank_environment, device_index, placement, shared_gpus
from pipeline.engine import step_flops
from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]
MINI = str(ROOT / "configs/mini.yaml")


def launch(*words, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "launch.local", *words, "tracking.backend=none"], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_ranks_end_with_identical_parameters_and_one_summary(tmp_path, mini_data):
    run_dir = tmp_path / "run"
    # memory-efficient layers too: their non-reentrant checkpointing must work under DDP
    result = launch(MINI, "--nproc-per-node", "2", f"run.dir={run_dir}", f"data.root={mini_data}",
                    "train.epochs=2", "model.memory_efficient=true", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_identical"] is True
    assert summary["global_step"] == 2 * 20 and summary["images_seen"] == 2 * 640
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert events.count("summary") == 1 and events.count("val") == 2
    assert "[rank 0/2]" in result.stdout
    # the job's rate, each rank's share of it, and each rank's TFLOP/s from the FLOPs of its batch of 16
    flops = step_flops(load_config(MINI).model, 16, 32)
    for r in (r for r in records if r["event"] == "train"):
        assert r["images_per_s_per_gpu"] == pytest.approx(r["images_per_s"] / 2)
        assert r["tflops_per_gpu"] == pytest.approx(flops * r["images_per_s_per_gpu"] / 16 / 1e12)


@pytest.mark.slow
def test_compiled_ddp_with_memory_efficient_layers_trains_and_resumes(tmp_path, mini_data):
    run_dir = tmp_path / "run"
    words = [MINI, "--nproc-per-node", "2", f"run.dir={run_dir}", f"data.root={mini_data}", "train.compile=true",
             "model.memory_efficient=true"]
    first = launch(*words, "train.epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # one graph: the checkpointed layers compile along with the rest under DDP, nothing splits the model
    assert "torch.compile: the model runs as 1 graph" in first.stdout
    second = launch(*words, "train.epochs=2", cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Resuming from" in second.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["replicas_identical"] is True
    assert summary["val_top1"] > 20  # chance is 10%
    state = torch.load(run_dir / "model_final.pt", weights_only=True)
    build_model("densenet_bc", num_classes=10, depth=16, growth_rate=12).load_state_dict(state, strict=True)


@pytest.mark.slow
def test_two_nodes_of_one_rank_each_train_to_the_end(tmp_path, mini_data):
    port = "29617"
    run_dir = tmp_path / "run"
    common = [MINI, "--nnodes", "2", "--nproc-per-node", "1", "--master-port", port, f"run.dir={run_dir}",
              f"data.root={mini_data}", "train.epochs=1", "tracking.backend=none"]
    node1 = subprocess.Popen([sys.executable, "-m", "launch.local", *common, "--node-rank", "1"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node0 = launch(*common, "--node-rank", "0", cwd=tmp_path)
    out1, _ = node1.communicate(timeout=300)
    assert node0.returncode == 0, node0.stdout[-3000:] + node0.stderr[-3000:]
    assert node1.returncode == 0, out1[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 1 and summary["replicas_identical"]


# a rank that runs the training command, then names the threads it has left: a gloo group still alive at the
# interpreter's exit can abort it (SIGABRT), turning its exit status (0, 2, 75) into a crash
# (``keep``: like launch.slurm, the caller runs pipeline.train.main and looks while it still holds the stop's error)
THREADS_LEFT = """
import os, sys
sys.path.insert(0, "tests")
import pipeline.train as train
import stop_at  # pipeline.train's command, with a stop signal at a chosen moment

def report(status):
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{task}/comm").read().strip())
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    print(f"rank {os.environ['RANK']} status {status} threads {sorted(names)}", flush=True)
    return status

def keep(argv):
    try:
        train.main(train.load_config(argv[0], argv[1:]))
    except train.StopRequested:
        return report(75)
    return report(0)

if sys.argv[1] == "keep":
    train.cli = keep
    sys.exit(stop_at.main(sys.argv[2:]))
sys.exit(report(stop_at.main(sys.argv[1:])))
"""


@pytest.mark.slow
@pytest.mark.parametrize("ending, words, status", [
    ("finished", ["step:99", "train.epochs=1"], 0),
    ("refused", ["step:99", "run.resume=missing.pt"], 2),  # every rank fails to read it: an agreed refusal
    ("stopped", ["step:1@1", "train.epochs=1"], 75),  # a stop signal to rank 1 (DDP's model in the traceback)
    ("stopped, the error kept", ["keep", "step:1@1", "train.epochs=1"], 75),
])
def test_each_rank_frees_its_process_group_before_the_interpreter_exits(tmp_path, ending, words, status):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--no-python",
                          sys.executable, "-c", THREADS_LEFT, *[w for w in words if "=" not in w], MINI,
                          f"run.dir={tmp_path / 'run'}", "data.backend=synthetic", "data.synthetic_steps=2",
                          "tracking.backend=none", *[w for w in words if "=" in w]],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    said = sorted(re.findall(r"rank (\d) status (\d+) threads (\[.*\])", run.stdout))
    assert [(rank, int(code)) for rank, code, _ in said] == [("0", status), ("1", status)], run.stderr[-3000:]
    for rank, _, names in said:
        assert "gloo" not in names, f"rank {rank} still runs the gloo group's threads after {ending}: {names}"
    assert run.returncode == (0 if status == 0 else 1)  # torchrun's own status for a failed rank
    assert "SIGABRT" not in run.stderr and "terminate called" not in run.stderr, run.stderr[-3000:]


def test_launcher_checks_the_config_before_starting_ranks(tmp_path):
    result = launch(MINI, "--nproc-per-node", "3", f"run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "train.batch_size=32" in result.stderr and "3 ranks" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_evaluation_gives_the_same_numbers_at_world_size_1_2_and_3(tmp_path):
    # the torchvision loader's exact-once validation at these world sizes: tests/data/test_loaders.py
    root = write_synthetic_imagenet(tmp_path / "data", 10, 1, 10, 24, 48)
    extra = next((root / "val" / "n10000003").iterdir())
    shutil.copy(extra, extra.with_name("extra.JPEG"))  # 101 validation images
    torch.manual_seed(0)
    weights = tmp_path / "model_final.pt"
    model = build_model("densenet_bc", num_classes=10, depth=16, growth_rate=12)
    with torch.no_grad():  # sharper: predictions that differ from image to image and from view to view
        model.classifier.weight.mul_(5)
    torch.save(model.state_dict(), weights)
    results = {}
    for world in (1, 2, 3):  # 8 images per rank: a per-GPU training batch sets the validation batch
        for views in ([], ["--crops", "10"]):  # the centre crop, and the paper's ten crops
            out = tmp_path / f"eval-{world}-{len(views)}.json"
            result = launch(MINI, "--nproc-per-node", str(world), "--evaluate", str(weights), *views, "--out",
                            str(out), f"data.root={root}", "train.batch_size=null", "train.batch_per_gpu=8",
                            "data.workers=1", "data.generate.enabled=false", cwd=tmp_path)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            results.setdefault(views and "10crop" or "1crop", []).append(json.loads(out.read_text()))
    for name, runs in results.items():
        assert [r["views"] for r in runs] == [name] * 3
        assert [r["count"] for r in runs] == [101, 101, 101]
        assert [r["world_size"] for r in runs] == [1, 2, 3]
        assert len({(r["top1"], r["top5"]) for r in runs}) == 1
        assert max(r["loss"] for r in runs) - min(r["loss"] for r in runs) < 1e-4
    assert len({(r["single_crop"]["top1"], r["single_crop"]["top5"]) for r in results["10crop"]}) == 1
    assert abs(results["10crop"][0]["loss"] - results["1crop"][0]["loss"]) > 1e-3  # ten views, not one


def test_evaluation_to_a_folder_it_cannot_write_is_refused_before_it_starts(tmp_path, capsys):
    from pipeline.evaluate import cli

    out = tmp_path / "missing" / "eval.json"
    assert cli([MINI, str(tmp_path / "model_final.pt"), "--out", str(out)]) == 2
    assert f"cannot write {out}" in capsys.readouterr().err and not out.parent.exists()


@pytest.mark.parametrize("env, gpus, message", [
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, 0,
     "task 2 of a SLURM step of 4 tasks, but RANK and WORLD_SIZE"),
    ({"RANK": "1"}, 0, "Only one of RANK and WORLD_SIZE is set"),
    ({"RANK": "8", "WORLD_SIZE": "8"}, 0, "RANK=8 is not in 0..WORLD_SIZE-1"),
    ({"RANK": "4", "WORLD_SIZE": "16", "LOCAL_RANK": "4"}, 4, "LOCAL_RANK=4 but this node shows 4 GPU(s)"),
])
def test_rank_variables_that_would_share_a_shard_or_a_gpu_are_refused(env, gpus, message):
    with pytest.raises(RankError, match=re.escape(message)):
        check_rank_environment(env, gpus)


# the batch script of a 4-task job is one process: SLURM_NTASKS=4 but no step of 4 tasks
@pytest.mark.parametrize("env", [{}, {"SLURM_NTASKS": "4", "SLURM_PROCID": "0"},
                                 {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "SLURM_NTASKS": "4"}])
def test_single_processes_and_complete_rank_variables_are_accepted(env):
    check_rank_environment(env, gpus=4)


@pytest.mark.parametrize("local_rank, gpus, device", [("0", 1, 0), ("5", 1, 0), ("5", 8, 5), ("0", 8, 0)])
def test_a_task_bound_to_one_gpu_uses_it_and_a_task_seeing_the_node_uses_its_local_rank(local_rank, gpus, device):
    env = {"RANK": local_rank, "WORLD_SIZE": "16", "LOCAL_RANK": local_rank}
    check_rank_environment(env, gpus)  # LOCAL_RANK 5 with one visible GPU: --gpus-per-task=1, not an error
    assert device_index(int(local_rank), gpus) == device


@pytest.mark.parametrize("hosts, said", [
    (["n1", "n1", "n2", "n2"], "4 ranks on 2 host(s): n1 (ranks 0-1), n2 (ranks 2-3)"),
    (["n1", "n2", "n1", "n2"], "4 ranks on 2 host(s): n1 (ranks 0,2), n2 (ranks 1,3)"),  # a cyclic distribution
    (["n1"] + [f"m{i}" for i in range(9)], "10 ranks on 10 host(s): n1 (rank 0), m0 (rank 1)"),
])
def test_the_log_says_which_ranks_run_on_which_host(hosts, said):
    assert placement(hosts).startswith(said)
    assert placement(hosts).endswith(", and 2 more") == (len(set(hosts)) == 10)


def test_two_ranks_shown_the_same_single_gpu_are_refused_and_tasks_bound_to_their_own_are_not():
    assert shared_gpus([("n1", "GPU-a"), ("n1", "GPU-b"), ("n2", "GPU-a"), ("n2", "GPU-b")]) is None
    problem = shared_gpus([("n1", "GPU-a"), ("n1", "GPU-a")])
    assert problem.startswith("ranks 0 and 1 on n1 would both use GPU GPU-a") and "gpu_binding" in problem


def test_a_rank_whose_peers_never_come_names_what_to_check(tmp_path):
    from pipeline.distributed import free_port

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", "pipeline.train", MINI, f"run.dir={tmp_path / 'run'}",
                             "data.backend=synthetic", "tracking.backend=none", "run.dist_timeout_s=3",
                             "run.hang_timeout_s=0"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    for named in ("rank 0 of 2", "127.0.0.1:", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "run.dist_timeout_s",
                  "a rank that died first"):
        assert named in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_bare_srun_of_training_stops_before_writing_anything(tmp_path):
    env = {**os.environ, "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-m", "pipeline.train", MINI, f"run.dir={tmp_path / 'run'}",
                             "tracking.backend=none"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "python -m launch.slurm" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_disagreements_name_each_differing_key_with_its_values_ranks_and_hosts():
    from pipeline.distributed import disagreements

    prints = [{"run.seed": 0, "version of torch": "2.14.1"}] * 2 + [{"run.seed": 1, "version of torch": "2.14.1"},
                                                                    {"run.seed": 1, "version of torch": "2.11.0"}]
    assert disagreements(prints, ["a", "a", "b", "b"]) == (
        "run.seed is 0 on rank 0 (a) but 1 on ranks 2, 3 (b); version of torch is '2.14.1' on rank 0 (a) but "
        "'2.11.0' on rank 3 (b)")
    assert disagreements(prints[:2], ["a", "b"]) is None


def test_a_task_given_a_gpu_that_pytorch_cannot_see_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    # device 99 exists on no machine: PyTorch sees no GPU here, and none on a GPU machine either
    result = subprocess.run([sys.executable, "-m", "pipeline.train", MINI, f"run.dir={run_dir}",
                             "data.backend=synthetic", "tracking.backend=none"], capture_output=True, text=True,
                            env={**os.environ, "SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "99"}, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: This task on {socket.gethostname()} was given GPUs "
                                    f"(CUDA_VISIBLE_DEVICES=99) but PyTorch {torch.__version__} sees 0 "
                                    "(torch.cuda.is_available() is False; this build is for CUDA "
                                    f"{torch.version.cuda or 'none: a CPU build'}; NVIDIA driver: ")
    assert "install the PyTorch build for the driver's CUDA" in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists() and not (tmp_path / "mlflow.db").exists()


def test_gpus_given_are_counted_from_cuda_visible_devices_first():
    from pipeline.distributed import gpus_missing

    assert gpus_missing({}, 0) is None and gpus_missing({"CUDA_VISIBLE_DEVICES": ""}, 0) is None  # a CPU job
    assert gpus_missing({"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_GPUS_ON_NODE": "8"}, 2) is None  # a task's share
    assert "(CUDA_VISIBLE_DEVICES=0,1) but PyTorch" in gpus_missing({"CUDA_VISIBLE_DEVICES": "0,1"}, 1)
    assert "(SLURM_GPUS_ON_NODE=4) but PyTorch" in gpus_missing({"SLURM_GPUS_ON_NODE": "4"}, 0)
    assert gpus_missing({"CUDA_VISIBLE_DEVICES": "MIG-a1,MIG-b2"}, 1) is None  # one MIG instance a process
    assert gpus_missing({"SLURM_GPUS_ON_NODE": "4"}, 1) is None
