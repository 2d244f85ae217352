import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets.imagenet as tv_imagenet
from bad_files import plant_bad_files
from PIL import Image

from pipeline.data.imagenet import cli, prepare, verify
from pipeline.data.index import load_index
from pipeline.data.layout import DatasetError
from pipeline.data.synthetic import write_synthetic_imagenet

WNIDS = ["n01440764", "n01443537", "n01484850"]
ROOT = Path(__file__).resolve().parents[2]


def jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def archives(tmp_path, monkeypatch):
    """A small ImageNet in the official layout: nested train tars, a flat val tar, a devkit."""
    src = tmp_path / "downloads"
    src.mkdir()
    with tarfile.open(src / "train.tar", "w") as train:
        for c, wnid in enumerate(WNIDS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i in range(2 + c):
                    add(class_tar, f"{wnid}_{i}.JPEG", jpeg_bytes(10 * c + i))
            add(train, f"{wnid}.tar", inner.getvalue())
    val_classes = [2, 0, 1, 0, 2]  # class index of each val image, in file-name order (its ID is index + 1)
    with tarfile.open(src / "val.tar", "w") as val:
        for i in range(len(val_classes)):
            add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg_bytes(100 + i))
    synsets = np.zeros(len(WNIDS), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                                          ("num_children", "O")])
    for i, wnid in enumerate(WNIDS):
        synsets[i] = (i + 1, wnid, f"class {i}, thing {i}", "a gloss", 0)
    devkit_dir = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit_dir.mkdir(parents=True)
    scipy.io.savemat(devkit_dir / "meta.mat", {"synsets": synsets})
    (devkit_dir / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{c + 1}\n" for c in val_classes))
    with tarfile.open(src / "devkit.tar.gz", "w:gz") as devkit:
        devkit.add(tmp_path / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    for key, name in (("train", "train.tar"), ("val", "val.tar"), ("devkit", "devkit.tar.gz")):
        # the official archives' checksums, replaced by those of this small copy
        monkeypatch.setitem(tv_imagenet.ARCHIVE_META, key, (tv_imagenet.ARCHIVE_META[key][0], md5(src / name)))
    return src, val_classes


def test_prepare_builds_the_class_folder_tree(tmp_path, archives):
    src, val_classes = archives
    out = prepare(src / "train.tar", src / "val.tar", src / "devkit.tar.gz", tmp_path / "imagenet")
    headers_only = load_index(out)  # prepare ends by indexing the tree from the files' headers
    assert {s: len(ix) for s, ix in headers_only.splits.items()} == {"train": 9, "val": 5}
    assert not headers_only.verified
    for c, wnid in enumerate(WNIDS):
        assert sorted(p.name for p in (out / "train" / wnid).iterdir()) == [f"{wnid}_{i}.JPEG" for i in range(2 + c)]
        expected = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i, v in enumerate(val_classes) if v == c]
        assert sorted(p.name for p in (out / "val" / wnid).iterdir()) == expected
    assert not list((out / "train").glob("*.tar"))
    report = verify(out)
    assert report["counts"] == {"train": 9, "val": 5, "classes": 3} and not report["undecodable"]


def prepare_words(src: Path, out: Path) -> list[str]:
    return ["prepare", "--train-tar", str(src / "train.tar"), "--val-tar", str(src / "val.tar"), "--devkit",
            str(src / "devkit.tar.gz"), "--out", str(out)]


@pytest.mark.parametrize("damaged", ["devkit", "val", "train"])
def test_prepare_names_a_checksum_mismatch_with_both_sums_and_leaves_no_new_out(tmp_path, archives, monkeypatch,
                                                                               capsys, damaged):
    src, _ = archives
    archive = src / {"devkit": "devkit.tar.gz", "val": "val.tar", "train": "train.tar"}[damaged]
    expected = "0123456789abcdef" * 2
    monkeypatch.setitem(tv_imagenet.ARCHIVE_META, damaged, (tv_imagenet.ARCHIVE_META[damaged][0], expected))
    assert cli(prepare_words(src, tmp_path / "imagenet")) == 2
    said = capsys.readouterr().err
    assert str(archive) in said and md5(archive) in said and expected in said
    assert "not present" not in said  # torchvision's words: the file was there
    assert not (tmp_path / "imagenet").exists()


def test_prepare_keeps_what_an_existing_out_held_when_it_fails(tmp_path, archives, monkeypatch):
    src, _ = archives
    out = tmp_path / "imagenet"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setitem(tv_imagenet.ARCHIVE_META, "train", (tv_imagenet.ARCHIVE_META["train"][0], "0" * 32))
    with pytest.raises(DatasetError, match="MD5"):  # after the devkit and val were extracted
        prepare(src / "train.tar", src / "val.tar", src / "devkit.tar.gz", out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_flat_val_folder_is_named_by_verify_and_sorted_by_prepare_val_flat(tmp_path, archives, capsys):
    src, val_classes = archives
    root = tmp_path / "imagenet"
    for c, wnid in enumerate(WNIDS):  # train/<wnid>/ as extracted; val/ flat, as the val archive holds it
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(2):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(10 * c + i))
    with tarfile.open(src / "val.tar") as val:
        val.extractall(root / "val", filter="data")

    for dataset in (root, root / "val"):  # the dataset, or its val folder given as the dataset
        assert cli(["verify", str(dataset)]) == 2
        said = capsys.readouterr().err
        assert "raw validation images" in said
        command = said[said.index("python -m pipeline.data.imagenet prepare"):].split()
        assert command[-2:] == ["--val-flat", str(root / "val")]

    assert cli(["prepare", "--devkit", str(src / "devkit.tar.gz"), "--val-flat", str(root / "val")]) == 0
    assert f"verify {root}" in capsys.readouterr().out
    for c, wnid in enumerate(WNIDS):
        expected = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i, v in enumerate(val_classes) if v == c]
        assert sorted(p.name for p in (root / "val" / wnid).iterdir()) == expected
    assert verify(root, decoder="pillow", workers=1)["counts"] == {"train": 6, "val": 5, "classes": 3}
    capsys.readouterr()
    assert cli(["prepare", "--devkit", str(src / "devkit.tar.gz"), "--val-flat", str(root / "val")]) == 2  # again
    assert f"it is sorted already. Next: python -m pipeline.data.imagenet verify {root}" in capsys.readouterr().err


def test_prepare_names_a_missing_archive(tmp_path):
    with pytest.raises(DatasetError, match="--val-tar"):
        prepare(__file__, tmp_path / "nope.tar", __file__, tmp_path / "out")


@pytest.fixture
def damaged_tree(tmp_path):
    root = write_synthetic_imagenet(tmp_path / "data", 10, 4, 2, 24, 48)
    return root, plant_bad_files(root)


@pytest.mark.parametrize("decoder", ["dali", "pillow"])
def test_verify_finds_each_planted_file_and_nothing_else(damaged_tree, decoder):
    root, planted = damaged_tree
    report = verify(root, decoder=decoder, workers=2)
    assert report["undecodable"] == sorted([planted["truncated"], planted["zero_byte"]])
    assert report["png_as_jpeg"] == [planted["png_as_jpeg"]]
    assert report["cmyk"] == [planted["cmyk"]]
    assert report["grayscale"] == [planted["grayscale"]]
    assert report["counts"] == {"train": 45, "val": 20, "classes": 10} and not report["imagenet_1k"]
    assert json.loads((root / "verify.json").read_text()) == report


def train(*words, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.train", str(ROOT / "configs/mini.yaml"),
                           "tracking.backend=none", *words],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # training runs of 20 s and more: `make test` stays under 5 minutes
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_a_damaged_file_stops_training_by_name_until_verify_lists_it(damaged_tree, tmp_path, backend):
    root, planted = damaged_tree
    words = [f"data.root={root}", f"data.backend={backend}", "train.batch_size=5", "train.epochs=2",
             "data.workers=1"]
    first = train(*words, f"run.dir={tmp_path / 'run1'}", cwd=tmp_path)
    assert first.returncode == 2
    assert "has no index" in first.stdout and f"verify {root}" in first.stdout
    assert "Could not decode image file" in first.stderr and "pipeline.data.imagenet verify" in first.stderr
    assert str(root / planted["truncated"]) in first.stderr or str(root / planted["zero_byte"]) in first.stderr
    assert "Traceback" not in first.stderr

    assert subprocess.run([sys.executable, "-m", "pipeline.data.imagenet", "verify", str(root)], cwd=tmp_path,
                          capture_output=True, timeout=300).returncode == 0
    second = train(*words, f"run.dir={tmp_path / 'run2'}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Leaving out 2 undecodable files" in second.stdout
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    # 45 training files, 2 left out: 43, of which 8 full batches of 5 per epoch
    assert summary["epochs_completed"] == 2 and summary["images_seen"] == 2 * 40


@pytest.mark.slow  # training runs of 20 s and more: `make test` stays under 5 minutes
def test_verify_under_the_training_stop_handlers_always_returns(tmp_path):
    """verify runs inside training, where SIGTERM only takes a note: its pool must still shut down every time."""
    script = (
        "import sys\n"
        "from pipeline.data.imagenet import verify\n"
        "from pipeline.data.synthetic import write_synthetic_imagenet\n"
        "from pipeline.signals import StopSignals\n"
        "root = write_synthetic_imagenet(sys.argv[1], 2, 4, 2, 32, 40)\n"
        "StopSignals().install()\n"
        "for _ in range(120):\n"
        "    verify(root, decoder='pillow', workers=2)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "data")], start_new_session=True)
    try:
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
