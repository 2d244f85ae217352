"""The benchmark commands run end to end and report their figures (the figures themselves are not asserted)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def bench(*words, tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-m", "pipeline.bench", *words, "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


def test_model_compares_ours_with_torchvision_in_separate_processes(tmp_path):
    stdout, result = bench("model", "--batch", "2", "--image-size", "32", "--steps", "2", "--warmup", "1",
                           "--compare", "torchvision", tmp_path=tmp_path)
    ours, theirs = result["runs"]["ours"], result["runs"]["torchvision"]
    assert ours["impl"] == "ours" and theirs["impl"] == "torchvision"
    assert result["ratio"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])
    assert ours["peak_MB"] > 0 and ours["step_ms"] > 0 and "ratio ours/torchvision" in stdout


def test_model_compares_a_setting_on_and_off(tmp_path):
    setting = "channels_last"  # --compare compile takes the same path (minutes to compile on a CPU)
    stdout, result = bench("model", "--model", "densenet_bc", "--batch", "2", "--image-size", "32", "--steps", "2",
                           "--warmup", "1", "--compare", setting, tmp_path=tmp_path)
    ours, flipped = result["runs"]["ours"], result["runs"][setting]
    on, off = (ours, flipped) if ours[setting] else (flipped, ours)
    assert on[setting] is True and off[setting] is False
    assert result["ratio"] == pytest.approx(on["images_per_s"] / off["images_per_s"])
    assert f"{setting}: images/s x" in stdout


def test_loader_times_dali_torchvision_and_decoding_alone_on_the_same_files(tmp_path):
    stdout, result = bench("loader", "--images", "32", "--batch", "8", "--image-size", "64", "--epochs", "1",
                           tmp_path=tmp_path)
    assert set(result["runs"]) == {"decode_only", "dali", "torchvision"}
    assert all(run["images_per_s"] > 0 for run in result["runs"].values())
    assert result["ratio"] == pytest.approx(result["runs"]["dali"]["images_per_s"]
                                            / result["runs"]["torchvision"]["images_per_s"])
    assert "DALI / torchvision" in stdout


def test_train_compares_the_training_loop_with_a_bare_loop(tmp_path):
    stdout, result = bench("train", "--steps", "6", "--epochs", "1", "--window", "2", "--repeat", "1",
                           tmp_path=tmp_path)
    assert result["ratio"] == pytest.approx(result["train_loop_images_per_s"] / result["bare_loop_images_per_s"])
    assert "ratio train/bare" in stdout
