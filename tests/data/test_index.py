"""The dataset index, packed shards, and what every rank checks at start."""

import faulthandler
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.data.imagenet as imagenet
from pipeline.config import load_config
from pipeline.data.imagenet import pack, verify
from pipeline.data.index import has_index, load_index
from pipeline.data.layout import DatasetError
from pipeline.data.loaders import build_loaders, dataset_index
from pipeline.data.synthetic import write_synthetic_imagenet
from pipeline.distributed import DistInfo, free_port

ROOT = Path(__file__).resolve().parents[2]
ONE = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = write_synthetic_imagenet(tmp_path_factory.mktemp("data") / "tree", 4, 12, 4, 20, 60)
    verify(root, workers=2)
    return root


def config(root, backend="dali", *words):
    return load_config(None, [f"data.root={root}", f"data.backend={backend}", "data.image_size=24",
                              "data.workers=1", "model.num_classes=4", *words])


def first_batches(root, backend):
    train, val = build_loaders(config(root, backend), ONE, 4)
    train.set_epoch(2)
    return next(iter(train)), next(iter(val))


@pytest.fixture
def packed_copy(tree, tmp_path):
    out = pack(tree, tmp_path / "packed", shard_size=4096)
    return tmp_path / "packed", out


def test_verify_writes_an_index_without_the_undecodable_files(tmp_path):
    root = write_synthetic_imagenet(tmp_path / "d", 2, 5, 2, 20, 40)
    bad = root / "train" / "n10000001" / "n10000001_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:100])
    report = verify(root, workers=2)
    index = load_index(root)
    names = [index.splits["train"].name(i) for i in range(len(index.splits["train"]))]
    assert report["undecodable"] == ["train/n10000001/n10000001_0.JPEG"] and len(names) == 9
    assert "train/n10000001/n10000001_0.JPEG" not in names and index.verified
    with Image.open(root / names[0]) as image:
        assert image.size == (index.splits["train"].width[0], index.splits["train"].height[0])
    assert report["index"]["hash"] == index.hash


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_packed_copy_has_the_same_hash_and_gives_the_same_batches(tree, packed_copy, backend):
    root, index = packed_copy
    assert index.hash == load_index(tree).hash == load_index(root).hash and len(index.shards) > 3
    (tree_train, tree_val), (packed_train, packed_val) = first_batches(tree, backend), first_batches(root, backend)
    for a, b in ((tree_train, packed_train), (tree_val, packed_val)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_shard_reads_open_no_file(packed_copy, monkeypatch):
    root, _ = packed_copy
    train, _ = build_loaders(config(root, "torchvision"), ONE, 4)
    next(iter(train))  # shards mapped
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: opened.append(a[0]))
    batches = list(train)
    assert len(batches) == len(train) and not [p for p in opened if str(root) in str(p)]


def test_a_truncated_or_damaged_shard_is_named_before_training(packed_copy):
    root, index = packed_copy
    shard = root / "shards" / index.shards[1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DatasetError, match=rf"{shard.name} holds {len(data) - 10} bytes, not {len(data)}"):
        dataset_index(config(root), ONE)
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(DatasetError, match=rf"{shard.name} fails its SHA-256 checksum.*Copy the named shards again"):
        dataset_index(config(root), ONE)
    shard.unlink()
    with pytest.raises(DatasetError, match=rf"{shard.name} is missing"):
        dataset_index(config(root), ONE)


def listings_under(root, monkeypatch):
    """Counts directory listings of anything under ``root`` (os.scandir, os.listdir, os.walk)."""
    seen = []
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def counting(path=".", real=real):
            if str(root) in str(Path(path).absolute()):
                seen.append(str(path))
            return real(path)
        monkeypatch.setattr(os, name, counting)
    return seen


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_start_on_an_indexed_dataset_lists_no_data_folder(tree, backend, monkeypatch):
    listed = listings_under(tree, monkeypatch)
    train, val = build_loaders(config(tree, backend), ONE, 4)
    next(iter(train)), next(iter(val))
    assert listed == []


def test_a_tree_without_an_index_is_listed_by_rank_0_alone(tmp_path):
    root = write_synthetic_imagenet(tmp_path / "d", 3, 6, 2, 20, 40)
    assert not has_index(root)
    script = (
        "import os, sys, torch, torch.distributed as dist\n"
        "from pathlib import Path\n"
        "root = sys.argv[1]\n"
        "seen = []\n"
        "for name in ('scandir', 'listdir'):\n"
        "    real = getattr(os, name)\n"
        "    def counting(path='.', real=real):\n"
        "        if root in str(Path(path).absolute()):\n"
        "            seen.append(path)\n"
        "        return real(path)\n"
        "    setattr(os, name, counting)\n"
        "from pipeline.config import load_config\n"
        "from pipeline.data.loaders import dataset_index\n"
        "from pipeline.distributed import init_distributed\n"
        "info = init_distributed()\n"
        "index = dataset_index(load_config(None, [f'data.root={root}', 'model.num_classes=3']), info)\n"
        "print('RESULT', info.rank, len(seen), index.hash, len(index.splits['train']))\n"
        "dist.destroy_process_group()\n"
    )
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    results = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        rank, listed, digest, count = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
        results[int(rank)] = (int(listed), digest, int(count))
    assert results[0][0] > 0 and results[1][0] == 0  # rank 1 took the index rank 0 built
    assert results[0][1:] == results[1][1:] and results[0][2] == 18


def test_verify_lists_a_file_that_kills_the_decoder_and_decodes_the_rest(tmp_path, monkeypatch):
    root = write_synthetic_imagenet(tmp_path / "d", 2, 70, 2, 20, 40)  # more than two batches of 64
    killer = root / "train" / "n10000000" / "n10000000_5.JPEG"
    real = imagenet.inspect_file

    def crashing(path):
        if path == str(killer):
            os.kill(os.getpid(), signal.SIGSEGV)  # what a native decoder fault does to its process
        return real(path)

    monkeypatch.setattr(imagenet, "inspect_file", crashing)  # worker processes are forked: they see it
    was_enabled = faulthandler.is_enabled()
    faulthandler.disable()  # pytest's, inherited by the workers, would print every crash's traceback
    try:
        report = verify(root, workers=2)
    finally:
        if was_enabled:
            faulthandler.enable()
    assert report["undecodable"] == ["train/n10000000/n10000000_5.JPEG"]
    assert "crashed" in report["errors"]["train/n10000000/n10000000_5.JPEG"]
    assert len(load_index(root).splits["train"]) == 139 and report["counts"]["train"] == 140


@pytest.mark.slow
def test_verify_survives_the_odd_and_damaged_files_of_a_larger_tree_five_times(tmp_path):
    """About 1,800 small JPEGs with a truncated, an empty, a PNG, a CMYK and a grayscale file (DALI once crashed)."""
    root = write_synthetic_imagenet(tmp_path / "d", 10, 160, 20, 32, 32)
    folders = sorted((root / "train").iterdir())
    source = next(folders[0].iterdir())
    data = source.read_bytes()
    (folders[0] / "third.JPEG").write_bytes(data[: len(data) // 3])
    (folders[1] / "empty.JPEG").write_bytes(b"")
    with Image.open(source) as image:
        image.save(folders[2] / "png.JPEG", format="PNG")
        image.convert("CMYK").save(folders[3] / "cmyk.JPEG", format="JPEG")
        image.convert("L").save(folders[4] / "gray.JPEG", format="JPEG")
    for attempt in range(5):
        result = subprocess.run([sys.executable, "-m", "pipeline.data.imagenet", "verify", str(root)],
                                capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, f"attempt {attempt}: {result.returncode} {result.stderr[-2000:]}"
        report = json.loads((root / "verify.json").read_text())
        assert [Path(p).name for p in report["undecodable"]] == ["third.JPEG", "empty.JPEG"]
        assert len(report["png_as_jpeg"]) == len(report["cmyk"]) == len(report["grayscale"]) == 1



@pytest.mark.slow
def test_ranks_given_different_datasets_stop_before_the_first_step(tmp_path):
    """Two nodes whose local copies differ: rank 1's tree lost a file that rank 0's still has."""
    import shutil

    first = write_synthetic_imagenet(tmp_path / "node0", 10, 8, 2, 20, 40)
    second = tmp_path / "node1"
    shutil.copytree(first, second)
    next((second / "train").rglob("*.JPEG")).unlink()
    for root in (first, second):
        verify(root, workers=2)
    port, run_dir = free_port(), tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.train", str(ROOT / "configs/mini.yaml"),
                               f"data.root={root}", f"run.dir={run_dir}", "tracking.backend=none",
                               "train.batch_size=16"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r, root in enumerate((first, second))]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 2, err[-2000:]
        assert "The ranks read different datasets" in err and "rank 1 on" in err and "Traceback" not in err
        assert " step " not in out  # stopped before the first step
    assert not (run_dir / "checkpoints").exists()


def test_a_damaged_index_is_named_when_it_is_read(tmp_path):
    root = write_synthetic_imagenet(tmp_path / "d", 2, 4, 2, 20, 40)
    verify(root, workers=2)
    labels = root / "index" / "train.label.npy"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 1  # one sample's label changed, the file still the right size
    labels.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"index in .* is damaged.*verify"):
        load_index(root)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_file_gone_since_indexing_is_named_with_the_fix(tmp_path, backend):
    root = write_synthetic_imagenet(tmp_path / "d", 2, 8, 2, 20, 40)
    verify(root, workers=2)
    for path in (root / "train").rglob("*.JPEG"):
        path.unlink()
    train, _ = build_loaders(load_config(None, [f"data.root={root}", f"data.backend={backend}", "data.workers=1",
                                                "model.num_classes=2", "data.image_size=24"]), ONE, 4)
    with pytest.raises(DatasetError, match=r"Cannot read .*\.JPEG.*changed since it was indexed.*verify"):
        next(iter(train))


def padded_jpeg(size: tuple[int, int], nbytes: int) -> bytes:
    """A JPEG of ``size`` pixels padded after its end marker to ``nbytes`` bytes (decoders ignore the padding)."""
    out = io.BytesIO()
    Image.new("RGB", size, (90, 120, 30)).save(out, "JPEG", quality=50)
    assert out.tell() <= nbytes
    return out.getvalue() + bytes(nbytes - out.tell())


@pytest.mark.parametrize("change", ["truncated", "a smaller image", "a larger image"])
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_file_changed_since_verify_stops_the_loader_naming_it_and_the_sizes(tmp_path, backend, change):
    root = write_synthetic_imagenet(tmp_path / "d", 2, 8, 2, 20, 40)
    verify(root, workers=2)
    victim = sorted((root / "train").rglob("*.JPEG"))[5]
    data = victim.read_bytes()
    with Image.open(victim) as image:
        width, height = image.size
    if change == "truncated":
        victim.write_bytes(data[:len(data) // 2])
        expected = rf"{victim} holds {len(data) // 2} bytes, but the index says {len(data)} \(truncated or replaced\)"
    else:  # the same number of bytes: only the pixels tell
        size = (12, 10) if change == "a smaller image" else (80, 60)  # smaller than the crops, or larger
        victim.write_bytes(padded_jpeg(size, len(data)))
        expected = rf"{victim} is {size[0]}x{size[1]} pixels, but the index says {width}x{height}"
    expected += rf": the dataset changed since it was indexed. Run `python -m pipeline.data.imagenet verify {root}`"
    train, _ = build_loaders(load_config(None, [f"data.root={root}", f"data.backend={backend}", "data.workers=1",
                                                "model.num_classes=2", "data.image_size=16"]), ONE, 4)
    with pytest.raises(DatasetError) as raised:
        for _ in train:
            pass
    message = str(raised.value)
    assert re.match(expected, message), message
    assert "Traceback" not in message and message.count(".JPEG") == 1  # the one file, no batch of suspects
    if backend == "dali" and change == "a smaller image":  # DALI failed on it; its own words are kept
        assert re.search(r"DALI stopped on it: .*(window|crop|image dimensions)", message, re.I), message
    train.close()


def test_a_shard_cut_short_before_it_is_mapped_is_named_when_read(packed_copy):
    from pipeline.data.samples import SampleBytes

    root, index = packed_copy
    last = len(index.shards) - 1
    shard = root / "shards" / index.shards[last]["file"]
    shard.write_bytes(shard.read_bytes()[:10])
    train = index.splits["train"]
    ids = np.flatnonzero(np.asarray(train.shard) == last)[:2]
    if not len(ids):  # the last shard may hold val samples only
        ids, split = np.flatnonzero(np.asarray(index.splits["val"].shard) == last)[:2], "val"
    else:
        split = "train"
    with pytest.raises(DatasetError, match=rf"{shard.name} at byte .* the shard is truncated"):
        SampleBytes(root, load_index(root), split).read_many(ids)


def test_an_index_json_of_the_wrong_shape_is_named(tmp_path):
    root = write_synthetic_imagenet(tmp_path / "d", 2, 4, 2, 20, 40)
    verify(root, workers=2)
    meta = root / "index" / "index.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "counts": {}}))
    with pytest.raises(DatasetError, match=r"index.json is damaged .*KeyError"):
        load_index(root)


def test_shard_checksums_are_read_once_and_a_shard_changed_since_is_checked_again(packed_copy, tmp_path,
                                                                                 monkeypatch):
    import pipeline.data.samples as samples

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    read = []
    monkeypatch.setattr(samples, "file_sha256", lambda path: read.append(path.name) or samples_sha256(path))
    root, index = packed_copy
    assert len(index.shards) > 2
    assert samples.check_shards(root, index) == [] and len(read) == len(index.shards)  # the first start reads all
    read.clear()
    assert samples.check_shards(root, index) == [] and read == []  # a restart trusts what it found good
    assert samples.check_shards(root, index, 0, 2) == [] and len(read) == -(-len(index.shards) // 2)  # its share
    read.clear()
    shard = root / "shards" / index.shards[1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged in place: the same size, a new modification time
    shard.write_bytes(bytes(data))
    assert samples.check_shards(root, index) == [f"{shard} fails its SHA-256 checksum (damaged)"]
    assert read == [shard.name]


def samples_sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
