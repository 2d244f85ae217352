"""Batch semantics at scale: a global or a per-GPU batch, warm-up that follows it, BatchNorm over small batches."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.config import ConfigError, global_batch, load_config, warmup_epochs
from pipeline.distributed import DistInfo
from pipeline.train import check_batch_settings

ROOT = Path(__file__).resolve().parents[1]
MINI = str(ROOT / "configs/mini.yaml")
CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def test_exactly_one_of_the_global_and_the_per_gpu_batch_is_set():
    with pytest.raises(ConfigError, match=r"Set exactly one of 'train.batch_size' .* now 32\) and "
                                          r"'train.batch_per_gpu' \(per GPU; now 16\)"):
        load_config(MINI, ["train.batch_per_gpu=16"])
    with pytest.raises(ConfigError, match="Set exactly one"):
        load_config(MINI, ["train.batch_size=null"])
    cfg = load_config(MINI, ["train.batch_size=null", "train.batch_per_gpu=64"])
    assert [global_batch(cfg.train, world) for world in (1, 8, 64)] == [64, 512, 4096]
    assert global_batch(load_config(MINI).train, 8) == 32


@pytest.mark.parametrize("batch, expected", [(256, 0.0), (1024, 0.0), (1025, 5.0), (8192, 5.0)])
def test_auto_warm_up_follows_the_global_batch(batch, expected):
    assert warmup_epochs(load_config(MINI, ["schedule.warmup_epochs=auto"]).schedule, batch) == expected
    assert warmup_epochs(load_config(MINI, ["schedule.warmup_epochs=2"]).schedule, batch) == 2.0


def test_small_per_gpu_batches_and_no_warm_up_at_a_large_batch_are_warned_about(caplog):
    cfg = load_config(MINI, ["schedule.warmup_epochs=0"])
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        check_batch_settings(cfg, CPU, 256, 16, 0.0)
        check_batch_settings(cfg, CPU, 2048, 64, 0.0)
        check_batch_settings(cfg, CPU, 2048, 64, 5.0)
        check_batch_settings(cfg, CPU, 256, 32, 0.0)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2
    assert said[0].startswith("16 images per rank: BatchNorm's statistics over fewer than 32 images are noisy")
    assert "schedule.warmup_epochs=auto" in said[0] and "model.sync_bn" not in said[0]  # refused on CPU ranks
    assert said[1].startswith("schedule.warmup_epochs=0 at a global batch of 2048: the learning rate starts at 6.4")


def test_the_small_batch_warning_suggests_sync_bn_on_gpus_and_fewer_ranks_on_cpus(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        check_batch_settings(load_config(MINI), DistInfo(0, 8, 0, torch.device("cuda", 0)), 128, 16, 0.0)
        check_batch_settings(load_config(MINI), DistInfo(0, 4, 0, torch.device("cpu")), 64, 16, 0.0)
        check_batch_settings(load_config(MINI), DistInfo(0, 1, 0, torch.device("cuda", 0)), 16, 16, 0.0)
    on_gpus, on_cpus, on_one_gpu = [r.getMessage() for r in caplog.records]
    assert on_one_gpu.startswith("16 images per GPU") and "sync_bn" not in on_one_gpu  # no other GPU's images
    assert on_gpus.startswith("16 images per GPU") and "model.sync_bn=true" in on_gpus and "CPU" not in on_gpus
    assert on_cpus.startswith("16 images per rank") and "run fewer CPU ranks" in on_cpus
    assert "model.sync_bn=true" not in on_cpus  # refused on CPU ranks


def test_an_auto_warm_up_as_long_as_the_run_is_refused_by_name():
    cfg = load_config(MINI, ["schedule.warmup_epochs=auto", "train.epochs=5"])
    with pytest.raises(ConfigError, match=r"schedule.warmup_epochs=auto warms up for 5 epochs at a global batch "
                                          r"of 2048 \(above 1024\), but train.epochs=5: the warm-up would never end"):
        check_batch_settings(cfg, CPU, 2048, 64, warmup_epochs(cfg.schedule, 2048))
    check_batch_settings(load_config(MINI, ["schedule.warmup_epochs=auto", "train.epochs=6"]), CPU, 2048, 64, 5.0)
    check_batch_settings(cfg, CPU, 1024, 64, warmup_epochs(cfg.schedule, 1024))  # no warm-up at 1024


def test_a_resume_compares_the_warm_up_in_epochs_and_names_what_changed():
    from pipeline.config import flatten
    from pipeline.engine import build_scheduler
    from pipeline.optim import build_optimizer
    from pipeline.train import apply_changed_settings

    def restored(words):
        cfg = load_config(MINI, words)
        model = torch.nn.Linear(2, 2)
        optimizer = build_optimizer(model, cfg.optim, 256)
        return cfg, model, optimizer, build_scheduler(optimizer, OmegaConf.merge(cfg.schedule, {"warmup_epochs": 0.0}),
                                               cfg.train.epochs, 10)

    saved = flatten(OmegaConf.to_container(load_config(MINI, ["schedule.warmup_epochs=0"])))
    assert apply_changed_settings(saved, *restored(["schedule.warmup_epochs=auto"]), 256) == ""  # auto is 0 here
    assert apply_changed_settings(saved, *restored(["schedule.warmup_epochs=auto"]), 2048) == \
        "schedule.warmup_epochs 0.0 -> 5.0"
    assert apply_changed_settings(saved, *restored(["optim.lr=0.05", "schedule.warmup_epochs=0"]), 256) == \
        "optim.lr 0.8 -> 0.05"


def test_sync_bn_without_cuda_is_refused_by_name(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.train", MINI, f"run.dir={tmp_path / 'run'}",
                             "data.backend=synthetic", "model.sync_bn=true", "tracking.backend=none"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # a CPU rank, on a GPU machine too
    assert result.returncode == 2 and "model.sync_bn=true needs CUDA" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_per_gpu_batch_resumed_at_another_world_size_changes_the_global_batch_and_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    words = [f"run.dir={run_dir}", "data.backend=synthetic", "data.synthetic_steps=3", "train.batch_size=null",
             "train.batch_per_gpu=16", "tracking.backend=none"]
    first = subprocess.run([sys.executable, "-m", "pipeline.train", MINI, *words, "train.epochs=1"],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run([sys.executable, "-m", "launch.local", MINI, "--nproc-per-node", "2", *words,
                            "train.epochs=2"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "the global batch changes from 16 to 32 (train.batch_per_gpu=16 x 2 ranks)" in again.stderr + again.stdout


@pytest.mark.parametrize("profile, world, batch, lr", [("gpu-32", 32, 2048, 0.8), ("gpu-64", 64, 4096, 1.6)])
def test_the_32_and_64_gpu_profiles_scale_the_batch_and_learning_rate_and_warm_up(profile, world, batch, lr):
    from pipeline.engine import build_scheduler
    from pipeline.optim import build_optimizer

    cfg = load_config(ROOT / "configs/densenet121.yaml", [f"slurm.profile={profile}"])
    assert cfg.slurm.nodes * cfg.slurm.gpus_per_node == world
    assert global_batch(cfg.train, world) == batch and warmup_epochs(cfg.schedule, batch) == 5
    steps = 1_281_167 // batch  # ImageNet-1k's training images
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg.optim, batch)
    schedule = build_scheduler(optimizer, OmegaConf.merge(cfg.schedule, {"warmup_epochs": 5.0}), cfg.train.epochs,
                               steps)
    factor = schedule.lr_lambdas[0]  # of the optimizer step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr / (5 * steps))  # step 1 of the warm-up
    assert lr * factor(5 * steps) == pytest.approx(lr) and lr * factor(5 * steps // 2) < lr / 1.9
