import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    check_resumable,
    find_and_load_latest,
    load_checkpoint,
    resume_hint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pipeline.tracking import MetricsFile


def state(step: int) -> dict:
    return {"format": FORMAT_VERSION, "model": {"w": torch.full((64,), float(step))},
            "progress": {"epoch": 0, "step_in_epoch": step}, "ranks": [{"loader": {"dali": b"\x00" * 8}}]}


def save(run_dir, step, keep_last=5, best_step=None):
    return save_checkpoint(state(step), run_dir, step, keep_last, best_step)


def test_latest_checkpoint_is_found_through_the_pointer(tmp_path):
    for step in (10, 20, 30):
        save(tmp_path, step)
    loaded, path = find_and_load_latest(tmp_path)
    assert path.name == "step-000000030.pt" and loaded["model"]["w"][0] == 30
    pointer = json.loads((tmp_path / "checkpoints" / "latest").read_text())
    assert pointer["file"] == "step-000000030.pt" and len(pointer["sha256"]) == 64


def test_no_checkpoints_means_a_fresh_start(tmp_path):
    assert find_and_load_latest(tmp_path) is None


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    loaded, path = find_and_load_latest(tmp_path)
    assert path.name == "step-000000010.pt" and loaded["model"]["w"][0] == 10
    assert "Skipping checkpoint step-000000020.pt" in caplog.text and "checksum" in caplog.text


def test_a_flipped_byte_fails_the_checksum_and_falls_back(tmp_path, caplog):
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(newest)
    _, path = find_and_load_latest(tmp_path)
    assert path.name == "step-000000010.pt" and "step-000000020.pt" in caplog.text


def test_all_checkpoints_damaged_is_an_error_naming_the_folder(tmp_path):
    path = save(tmp_path, 10)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="None of the 1 checkpoints"):
        find_and_load_latest(tmp_path)


def test_a_file_newer_than_the_pointer_is_ignored(tmp_path):
    save(tmp_path, 10)
    # written and renamed, but the process died before its sidecar and the pointer
    torch.save(state(20), tmp_path / "checkpoints" / "step-000000020.pt")
    assert find_and_load_latest(tmp_path)[1].name == "step-000000010.pt"


def test_leftover_temporary_files_are_ignored(tmp_path):
    save(tmp_path, 10)
    (tmp_path / "checkpoints" / ".step-000000020.pt.tmp-123").write_bytes(b"half a checkpoint")
    assert find_and_load_latest(tmp_path)[1].name == "step-000000010.pt"


def test_a_checkpoint_carrying_a_pickled_object_is_refused(tmp_path):
    evil = state(10)
    evil["extra"] = argparse.Namespace(x=1)
    path = tmp_path / "evil.pt"
    torch.save(evil, path)
    with pytest.raises(CheckpointError, match="Unsupported global"):
        load_checkpoint(path)


def test_keeps_the_last_n_and_the_best(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step, keep_last=2, best_step=10)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert names == ["step-000000010.pt", "step-000000030.pt", "step-000000040.pt"]


def test_resume_refuses_a_changed_model_or_data_and_allows_more_epochs(tmp_path):
    saved = {"model": {"name": "densenet121", "depth": 100}, "data": {"root": "/d", "workers": 4},
             "train": {"epochs": 90, "batch_size": 256}, "run": {"seed": 0}}
    more_epochs = json.loads(json.dumps(saved))
    more_epochs["train"]["epochs"] = 120
    more_epochs["data"]["workers"] = 8
    check_resumable(saved, more_epochs, tmp_path)
    other_model = json.loads(json.dumps(saved))
    other_model["model"]["name"] = "densenet169"
    with pytest.raises(CheckpointError, match="model.name: 'densenet121' -> 'densenet169'"):
        check_resumable(saved, other_model, tmp_path)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    set_rng_state(rng_state())
    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save(saved, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_metrics_file_keeps_the_lines_a_checkpoint_counted(tmp_path):
    metrics = MetricsFile(tmp_path / "metrics.jsonl")
    for step in range(5):
        metrics.log("train", global_step=step)
    metrics.close()
    resumed = MetricsFile(tmp_path / "metrics.jsonl", keep=3)
    resumed.log("train", global_step=3)
    resumed.close()
    steps = [json.loads(line)["global_step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3] and resumed.lines == 4


@pytest.mark.slow  # a benchmark run: 26 s on 2 cores
def test_checkpoint_benchmark_prints_save_and_load_figures(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "pipeline.bench", "checkpoint", "--model", "densenet121",
                             "--repeat", "1", "--world-size", "2", "--json", str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "save s" in result.stdout and "load s" in result.stdout
    figures = json.loads(out.read_text())
    assert figures["bytes"] > 2 * 7_978_856 * 4 * 0.95  # weights and momentum, fp32
    assert figures["save_s"] > 0 and figures["load_s"] > 0


@pytest.mark.parametrize("resume", ["never", "runs/x/checkpoints/step-00000010.pt"])
def test_the_resume_hint_adds_run_resume_auto_when_the_run_did_not_resume_automatically(resume, monkeypatch):
    """Run again as it was, run.resume=never would be refused (the run dir holds files) and a file would resume from
    that older checkpoint: the hint's command ends with run.resume=auto, which the config's last word wins."""
    argv = ["python", "-m", "pipeline.train", "configs/mini.yaml", f"run.resume={resume}"]
    monkeypatch.setattr(sys, "orig_argv", argv)
    hint = resume_hint("runs/x", resume)
    assert "run the same command with run.resume=auto" in hint, hint
    assert hint.endswith(f"python -m pipeline.train configs/mini.yaml run.resume={resume} run.resume=auto"), hint
    assert resume_hint("runs/x").endswith(f"run.resume={resume}")  # resumed automatically: the same command
