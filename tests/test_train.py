import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def train(config, *words, cwd):
    # tracking is tested against a real server in test_tracking.py
    return subprocess.run([sys.executable, "-m", "pipeline.train", config, "tracking.backend=none", *words], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_mini_config_trains_well_above_chance_and_writes_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = train(str(ROOT / "configs/mini.yaml"), f"run.dir={run_dir}", f"data.root={tmp_path / 'data'}",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "img/s" in result.stdout and "data-wait" in result.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 8 and summary["global_step"] == 8 * 20
    assert summary["images_seen"] == 8 * 640
    assert summary["val_top1"] > 40 and summary["best_val_top1"] >= summary["val_top1"]  # chance is 10%
    assert 0 <= summary["val_top5"] <= 100 and summary["wall_seconds"] > 0

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in events if e["event"] == "train"]
    vals = [e for e in events if e["event"] == "val"]
    assert len(vals) == 8 and all(v["count"] == 160 for v in vals)
    assert train_losses[-1] < 0.7 * train_losses[0]
    assert all(e["images_per_s"] > 0 and 0 <= e["data_wait"] <= 1 for e in events if e["event"] == "train")

    config = (run_dir / "config.yaml").read_text()
    assert f"dir: {run_dir}" in config and "${" not in config
    state = torch.load(run_dir / "model_final.pt", weights_only=True)
    build_model("densenet_bc", num_classes=10, depth=16, growth_rate=12).load_state_dict(state, strict=True)


def test_model_final_is_a_torchvision_state_dict(tmp_path):
    run_dir = tmp_path / "run"
    result = train(str(ROOT / "configs/mini.yaml"), f"run.dir={run_dir}", "model.name=densenet121",
                   "data.backend=synthetic", "data.synthetic_steps=2", "train.batch_size=2", "train.epochs=1",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(run_dir / "model_final.pt", weights_only=True)
    torchvision.models.densenet121(num_classes=10).load_state_dict(state, strict=True)


@pytest.mark.slow  # training runs of 20 s and more: `make test` stays under 5 minutes
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_synthetic_backend_trains_with_amp_and_memory_efficient_layers(tmp_path, precision):
    run_dir = tmp_path / "run"
    result = train(str(ROOT / "configs/mini.yaml"), f"run.dir={run_dir}", "data.backend=synthetic",
                   "data.synthetic_steps=4", "train.epochs=2", "train.log_every_steps=2", "train.batch_size=8",
                   f"train.precision={precision}", "model.memory_efficient=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 8 and summary["images_seen"] == 8 * 8
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [e for e in logged if e["event"] == "train"]
    if precision == "fp16":  # the unscaled gradients' norm (computed to tell a skipped step) and the scale
        assert all(e["grad_norm"] > 0 and e["loss_scale"] >= 1 for e in logged), logged
    assert not (run_dir / "profile").exists()  # profile.start_step=0: no profile


@pytest.mark.parametrize("words,needle", [
    (["data.root={tmp}/missing", "data.generate.enabled=false"], "{tmp}/missing"),
    (["model.num_classes=7"], "model.num_classes=7"),
])
def test_bad_dataset_fails_before_training_and_leaves_no_run_dir(tmp_path, words, needle):
    from pipeline.data.synthetic import write_synthetic_imagenet

    write_synthetic_imagenet(tmp_path / "data", 3, 2, 1, 16, 24)
    run_dir = tmp_path / "run"
    words = [w.format(tmp=tmp_path) for w in words]
    result = train(str(ROOT / "configs/mini.yaml"), f"run.dir={run_dir}", f"data.root={tmp_path / 'data'}",
                   *words, cwd=tmp_path)
    assert result.returncode == 2
    assert needle.format(tmp=tmp_path) in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_empty_class_folder_fails_before_training(tmp_path):
    from pipeline.data.synthetic import write_synthetic_imagenet

    root = write_synthetic_imagenet(tmp_path / "data", 10, 2, 1, 16, 24)
    empty = sorted((root / "val").iterdir())[4]
    for f in empty.iterdir():
        f.unlink()
    result = train(str(ROOT / "configs/mini.yaml"), f"run.dir={tmp_path / 'run'}", f"data.root={root}",
                   cwd=tmp_path)
    assert result.returncode == 2 and str(empty) in result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_never_refuses_a_run_dir_that_holds_files(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model_final.pt").write_bytes(b"precious")
    result = train(str(ROOT / "configs/mini.yaml"), f"run.dir={run_dir}", "run.resume=never",
                   "data.backend=synthetic", cwd=tmp_path)
    assert result.returncode == 2 and "run.resume=never" in result.stderr
    assert (run_dir / "model_final.pt").read_bytes() == b"precious"


def test_without_dali_training_falls_back_to_torchvision_with_a_warning(tmp_path):
    from pipeline.data.synthetic import write_synthetic_imagenet

    root = write_synthetic_imagenet(tmp_path / "data", 10, 4, 1, 16, 24)
    run_dir = tmp_path / "run"
    code = ("import sys; sys.modules['nvidia.dali'] = None; from pipeline.train import cli; "
            f"sys.exit(cli([{str(ROOT / 'configs/mini.yaml')!r}, 'run.dir={run_dir}', 'data.root={root}', "
            "'tracking.backend=none', "
            "'train.epochs=1', 'train.batch_size=8', 'data.workers=1']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NVIDIA DALI could not be imported" in result.stdout and "data.backend=torchvision" in result.stdout
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 5


def test_a_second_run_into_a_locked_run_dir_stops_at_once_naming_the_holder(tmp_path):
    import socket

    from pipeline.lock import RunDirLock

    run_dir = tmp_path / "run"
    lock = RunDirLock(run_dir).acquire()  # this process plays the run that holds the dir
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        result = subprocess.run([sys.executable, "-m", "pipeline.train", str(ROOT / "configs/mini.yaml"),
                                 f"run.dir={run_dir}", "data.backend=synthetic", "tracking.backend=none"],
                                capture_output=True, text=True, env=env, timeout=300)
    finally:
        lock.release()
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"is in use by another run (pid {os.getpid()} on {socket.gethostname()}" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]  # nothing written


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_first_non_finite_value_and_keeps_the_last_finite_checkpoint(tmp_path):
    from mlflow import MlflowClient

    from pipeline.boundary import NONFINITE_EXIT_CODE
    from pipeline.checkpoint import load_checkpoint

    run_dir = tmp_path / "runs" / "diverged"
    result = subprocess.run([sys.executable, "-m", "pipeline.train", str(ROOT / "configs/mini.yaml"),
                             f"run.dir={run_dir}", "data.backend=synthetic", "optim.lr=2000",
                             "schedule.warmup_epochs=1", "checkpoint.every_steps=2", "checkpoint.keep_last=100",
                             "train.log_every_steps=1", "tracking.backend=mlflow"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == NONFINITE_EXIT_CODE, result.stdout[-3000:] + result.stderr[-3000:]
    stopped = re.search(r"Stopped: the (?:loss at step (\d+) is \S+|weights after step (\d+) hold non-finite "
                        r"values)\. No checkpoint of it was written", result.stderr)
    assert stopped, result.stderr[-3000:]
    bad_step = int(stopped.group(1) or stopped.group(2))
    # every checkpoint on disk is finite and older than the bad step; latest names the newest of them
    saved = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    assert len(saved) >= 3
    for path in saved:
        state = load_checkpoint(path)
        assert state["progress"]["global_step"] < bad_step
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), path
    latest = json.loads((run_dir / "checkpoints/latest").read_text())
    assert latest["file"] == saved[-1].name
    assert not (run_dir / "model_final.pt").exists() and not (run_dir / "summary.json").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("densenet").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("NonFiniteLoss: Stopped: the ")


def test_the_first_non_finite_loss_stops_the_run_within_2_steps_naming_the_loss_not_the_weights(tmp_path):
    """A run trains 5 finite steps (a checkpoint at step 5), then resumes with a learning rate of 1e38: step 6 is
    computed from finite weights and gives them values near the float32 limit, so step 7's loss is the first
    non-finite one, while no checkpoint is due (every 5 steps) to find the weights first. The loss alone must
    stop every rank, by step 9, before the checkpoint of step 10."""
    from pipeline.boundary import NONFINITE_EXIT_CODE
    from pipeline.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    words = [f"run.dir={run_dir}", "data.backend=synthetic", "data.synthetic_steps=5", "train.batch_size=8",
             "checkpoint.every_steps=5", "checkpoint.keep_last=100", "train.log_every_steps=1",
             "insights.enabled=false"]
    first = train(str(ROOT / "configs/mini.yaml"), *words, "train.epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    result = train(str(ROOT / "configs/mini.yaml"), *words, "train.epochs=3", "optim.lr=1e38", cwd=tmp_path)
    assert result.returncode == NONFINITE_EXIT_CODE, result.stdout[-3000:] + result.stderr[-3000:]
    losses = {e["global_step"]: e["loss"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "train"}
    first_bad = min(step for step, loss in losses.items() if not math.isfinite(loss))
    assert first_bad == 7 and all(math.isfinite(losses[step]) for step in range(1, 7)), losses
    stopped = re.search(r"error: Stopped: the (.*?)\. No checkpoint of it was written", result.stderr)
    assert stopped, result.stderr[-3000:]
    assert re.fullmatch(rf"loss at step {first_bad} is (nan|inf|-inf)", stopped.group(1)), stopped.group(1)
    assert first_bad <= max(losses) <= first_bad + 2  # every rank stopped within the documented 2 steps
    saved = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    assert [load_checkpoint(p)["progress"]["global_step"] for p in saved] == [5]
    assert json.loads((run_dir / "checkpoints/latest").read_text())["file"] == saved[-1].name


@pytest.mark.slow  # training runs of 20 s and more: `make test` stays under 5 minutes
def test_a_resume_applies_a_changed_learning_rate_and_precision_and_names_them(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.engine import lr_factor

    run_dir = tmp_path / "run"
    words = [f"run.dir={run_dir}", "data.backend=synthetic", "data.synthetic_steps=4", "train.log_every_steps=1",
             "train.batch_size=8"]  # small: fp16 autocast is slow on a CPU
    first = train(str(ROOT / "configs/mini.yaml"), *words, "train.epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = train(str(ROOT / "configs/mini.yaml"), *words, "train.epochs=2", "optim.lr=0.4", "train.precision=fp16",
                  cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "Traceback" not in out
    assert "train.precision changed from fp32 to fp16 since the checkpoint: applied, with a new grad scaler" in out
    assert "optim.lr 0.8 -> 0.4" in out and "train.epochs 1 -> 2" in out
    log = (run_dir / "train.log").read_text()  # what a resume says reaches the run's own log too
    assert "Resuming from" in log and "optim.lr 0.8 -> 0.4" in log and "with a new grad scaler" in log
    # the schedule of the new settings, from the resumed step on: lr 0.4 per 256 images at batch 8
    schedule = OmegaConf.create({"name": "cosine", "warmup_epochs": 0.5, "milestones": [], "gamma": 0.1})
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = {e["global_step"]: e["lr"] for e in events if e["event"] == "train"}
    for step in (5, 6, 7):
        assert lrs[step] == pytest.approx(0.4 * 8 / 256 * lr_factor(step, 4, 2, schedule))


SHORT_RUN = ["data.backend=synthetic", "data.synthetic_steps=3", "train.batch_size=2", "train.epochs=1",
             "train.log_every_steps=50", "insights.every_steps=50"]


def test_a_short_run_says_so_at_its_start_logs_its_last_step_and_insights_name_every_steps(tmp_path, capsys):
    from pipeline.insights import main as insights

    run_dir = tmp_path / "run"
    result = train(str(ROOT / "configs/mini.yaml"), f"run.dir={run_dir}", *SHORT_RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout
    started = log.index("Training from global step 1 to 3; train metrics every 50 steps")
    assert "The first step may be slow" in log[started:]
    assert started < log.index("epoch 1 step 3/3  loss")  # the last step's line, though 3 is no multiple of 50
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in events if e["event"] == "train"] == [3]
    small_batch = next(line for line in log.splitlines() if "images per rank" in line)
    assert "Raise the global batch" in small_batch and "model.sync_bn" not in small_batch  # refused on CPU

    assert insights([str(run_dir / "model_final.pt")]) == 0  # python -m pipeline.insights, in this process
    said = capsys.readouterr().out
    assert "insights were enabled, but insights.every_steps=50 is more than the 3 steps" in said
    assert "insights.every_steps=3 or less" in said


@pytest.mark.slow  # two training runs
def test_a_stopped_run_names_the_command_that_resumes_it(tmp_path):
    command = [sys.executable, str(ROOT / "tests" / "stop_at.py"), "step:1", str(ROOT / "configs/mini.yaml"),
               "tracking.backend=none", "run.dir=run", *SHORT_RUN]
    stopped = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    said = stopped.stderr.splitlines()
    hint = next(i for i, line in enumerate(said) if "To resume the run in" in line)
    assert f"{tmp_path / 'run'} from its last checkpoint, run the same command again from {tmp_path}:" in said[hint]
    printed = shlex.split(said[hint + 1])
    assert printed == command
    resumed = subprocess.run(printed, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["global_step"] == 3
