"""Profiles on demand: a window of global steps recorded by torch.profiler into run.dir/profile."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.profiling import StepProfiler

ROOT = Path(__file__).resolve().parents[1]


def test_the_profiler_exists_only_over_its_window_and_a_resume_past_its_start_records_nothing(tmp_path):
    window = OmegaConf.create({"start_step": 3, "steps": 2})
    profiler = StepProfiler(window, tmp_path / "run", 0, torch.device("cpu"))
    active = []
    for step in range(1, 7):
        profiler.before_step(step)
        active.append(torch.autograd._profiler_enabled())
        torch.ones(8).add_(1)
        profiler.after_step(step)
    assert active == [False, False, True, True, False, False]
    assert sorted(p.name for p in (tmp_path / "run/profile").iterdir()) == ["rank-0.ops.txt", "rank-0.trace.json"]
    resumed = StepProfiler(window, tmp_path / "resumed", 0, torch.device("cpu"))
    for step in range(4, 7):  # resumed at step 4: the window's start has passed
        resumed.before_step(step)
        assert not torch.autograd._profiler_enabled()
        resumed.after_step(step)
    assert resumed.finish() == [] and not (tmp_path / "resumed").exists()


@pytest.mark.slow  # training runs of 20 s and more: `make test` stays under 5 minutes
def test_a_profile_window_writes_a_trace_and_the_top_operators_and_reaches_mlflow(tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "runs" / "profiled"
    result = subprocess.run([sys.executable, "-m", "pipeline.train", str(ROOT / "configs/mini.yaml"),
                             f"run.dir={run_dir}", "data.backend=synthetic", "data.synthetic_steps=3", "train.epochs=2",
                             "train.batch_size=8", "tracking.backend=mlflow", "tracking.system_metrics=false",
                             "profile.start_step=3", "profile.steps=5"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # the window of steps 3-7 ends with the first epoch (3 steps): validation and epoch 2 are not in it
    assert re.search(r"Profiled global steps 3-3: \S+rank-0.trace.json", result.stdout), result.stdout[-3000:]
    trace = json.loads((run_dir / "profile/rank-0.trace.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name.startswith("aten::") for name in names) and "aten::_fused_sgd_" in names
    table = (run_dir / "profile/rank-0.ops.txt").read_text()
    assert "Self CPU" in table and "aten::convolution_backward" in table and "aten::mkldnn_convolution" in table
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("densenet").experiment_id])
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "profile")) == [
        "profile/rank-0.ops.txt", "profile/rank-0.trace.json"]
