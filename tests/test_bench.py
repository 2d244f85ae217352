"""The benchmark commands run end to end and report their figures (the figures themselves are not asserted), and
each configuration is measured in a process of its own that reports what it measured: its pid and its settings as
it found them in the model, the tensors or the run, not as it was asked."""

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
    assert ours["measured"]["model_module"] == "pipeline.models.densenet"
    assert theirs["measured"]["model_module"] == "torchvision.models.densenet"
    assert ours["measured"]["pid"] != theirs["measured"]["pid"]
    assert result["ratio"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])
    assert ours["peak_MB"] > 0 and ours["step_ms"] > 0 and "ratio ours/torchvision" in stdout


def test_model_compares_a_setting_on_and_off(tmp_path):
    setting = "channels_last"  # --compare compile takes the same path (minutes to compile on a CPU)
    stdout, result = bench("model", "--model", "densenet_bc", "--batch", "2", "--image-size", "32", "--steps", "2",
                           "--warmup", "1", "--compare", setting, tmp_path=tmp_path)
    ours, flipped = result["runs"]["ours"], result["runs"][setting]
    on, off = (ours, flipped) if ours[setting] else (flipped, ours)
    assert on["measured"]["channels_last_input"] and on["measured"]["channels_last_weights"]
    assert not off["measured"]["channels_last_input"] and not off["measured"]["channels_last_weights"]
    assert on["measured"]["pid"] != off["measured"]["pid"]
    assert result["ratio"] == pytest.approx(on["images_per_s"] / off["images_per_s"])
    assert f"{setting}: images/s x" in stdout


def test_loader_times_each_pipeline_in_its_own_process_on_the_same_files(tmp_path):
    stdout, result = bench("loader", "--images", "32", "--batch", "8", "--image-size", "64", "--epochs", "1",
                           "--repeat", "1", tmp_path=tmp_path)
    runs = result["runs"]
    assert set(runs) == {"decode_only", "dali_limit", "dali", "dali_packed", "torchvision", "torchvision_packed",
                         "stock_torchvision"}
    # what each measuring process says it ran: its own backend, and shards or files
    assert {(r["loader_class"], r["read_from"]) for name, r in runs.items() if "pid" in r} == {
        ("DaliLoader", "files"), ("DaliLoader", "shards"), ("FolderLoader", "files"), ("FolderLoader", "shards")}
    assert len({r["pid"] for r in runs.values() if "pid" in r}) == 4
    faster = max(runs["dali"]["images_per_s"], runs["dali_packed"]["images_per_s"])
    assert result["ratio"] == pytest.approx(faster / runs["stock_torchvision"]["images_per_s"])
    assert "stock_torchvision" in stdout


def test_loader_on_a_verified_tree_reads_the_files_its_index_lists_not_the_broken_one(tmp_path):
    from pipeline.data.imagenet import verify
    from pipeline.perf import write_jpegs

    root = write_jpegs(tmp_path / "tree", 16, classes=2, width=64, height=48)
    source = next((root / "train").rglob("*.JPEG"))
    (source.parent / "broken.JPEG").write_bytes(source.read_bytes()[:source.stat().st_size // 2])
    verify(root, decoder="pillow", workers=1)  # leaves broken.JPEG out of the index
    stdout, result = bench("loader", "--root", str(root), "--batch", "4", "--image-size", "32", "--epochs", "1",
                           "--repeat", "1", "--workers", "1", tmp_path=tmp_path)
    assert all(run["images_per_s"] > 0 for run in result["runs"].values()) and "stock_torchvision" in stdout


def test_index_measures_an_imagenet_sized_index_shared_by_ranks(tmp_path):
    stdout, result = bench("index", "--samples", "200000", "--classes", "100", "--world-size", "2", tmp_path=tmp_path)
    assert [r["rank"] for r in result["ranks"]] == [0, 1]
    assert all(result[k] > 0 for k in ("build_s", "save_s", "load_s", "order_s"))
    # the ranks share the memory-mapped index: each adds far less than a private copy of it
    assert "uss_MB_per_rank" in stdout and result["uss_MB_per_rank"] < result["index_MB"] / 2


def test_train_compares_the_training_loop_with_a_bare_loop_and_profiles_it_on_demand(tmp_path):
    stdout, result = bench("train", "--steps", "6", "--epochs", "1", "--window", "2", "--repeat", "1",
                           "--profile", str(tmp_path / "profile"), "--profile-steps", "2", tmp_path=tmp_path)
    [train], [bare] = result["runs"]["train_loop"], result["runs"]["bare_loop"]
    assert train["measured"]["pid"] != bare["measured"]["pid"]
    # python -m pipeline.train ran its 6 steps; the bare loop its windows of 2 steps
    assert train["measured"]["steps"] == 6 and train["measured"]["images"] == 6 * bare["measured"]["batch"]
    assert bare["measured"]["steps"] == 2 * (6 // 2 - 1 + 1)
    assert result["ratio"] == pytest.approx(result["train_loop_images_per_s"] / result["bare_loop_images_per_s"])
    assert "ratio train/bare" in stdout
    assert result["profile"] == [str(tmp_path / "profile" / name) for name in ("rank-0.ops.txt", "rank-0.trace.json")]
    assert "profile of steps 3-4" in stdout


def test_boundary_measures_both_designs_at_each_world_size(tmp_path):
    stdout, result = bench("boundary", "--world-size", "2", "3", "--steps", "20", "--step-ms", "10",
                           tmp_path=tmp_path)
    assert [r["world_size"] for r in result["runs"]] == [2, 3] and "async/blocking" in stdout
    for run in result["runs"]:
        assert len(set(run["pids"])) == run["world_size"]  # a process per rank
        assert run["blocking_by_rank"] == {"blocking": [True] * run["world_size"],
                                           "async": [False] * run["world_size"],
                                           "figures": [False] * run["world_size"]}
        assert run["blocked_ms_per_step_with_figures"] < 0.5 * run["blocked_ms_per_step_blocking"]
        # the blocking design waits a whole round trip per step; the asynchronous one only reads a finished one
        assert run["blocked_ms_per_step"] < 0.5 * run["blocked_ms_per_step_blocking"]
        assert run["boundary_ms_per_step"] >= run["blocked_ms_per_step"]


@pytest.mark.parametrize("words", [["--backend", "dali"], ["--backend", "torchvision", "--packed"]],
                         ids=["dali", "torchvision_packed"])
def test_feed_reports_the_wait_for_data_with_and_without_reading_ahead(tmp_path, words):
    batch, step_ms = 8, 20
    stdout, result = bench("feed", *words, "--images", "32", "--batch", str(batch), "--image-size", "32", "--steps",
                           "4", "--warmup", "1", "--step-ms", str(step_ms), "--read-latency-ms", "10",
                           "--workers", "1", tmp_path=tmp_path)
    figures = ("data_wait_share", "images_per_s", "data_wait_share_no_latency", "images_per_s_no_latency")
    runs, packed = result["runs"], "--packed" in words
    assert all(k in result for k in figures)
    if packed:  # torchvision: data.read_ahead is DALI's feed, so only the latency varies
        assert result["today"] is None and result["read_ahead"] == 0
        assert {(r["read_ahead"], r["latency_ms"]) for r in runs} == {(0, 10), (0, 0)}
    else:
        assert all(k in result["today"] for k in figures) and result["today"]["read_ahead"] == 0
        assert {(r["read_ahead"], r["latency_ms"]) for r in runs} == {(2, 10), (2, 0), (0, 10), (0, 0)}
    assert len({r["pid"] for r in runs}) == len(runs)  # each in its own process
    assert {(r["loader_class"], r["read_from"]) for r in runs} == {
        ("FolderLoader" if packed else "DaliLoader", "shards" if packed else "files")}
    for run in runs:
        assert 0 <= run["data_wait_share"] < 1
        assert 0 < run["images_per_s"] <= batch * 1000 / step_ms  # no faster than the fake step allows
    assert result["data_wait_share"] == next(r["data_wait_share"] for r in runs
                                             if r["read_ahead"] == result["read_ahead"] and r["latency_ms"] == 10)
    assert "data_wait_share at L=10 ms" in stdout
