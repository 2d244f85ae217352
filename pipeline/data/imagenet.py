"""ImageNet on disk: ``prepare`` the official archives, ``verify`` every file, ``pack`` it into shards.

    python -m pipeline.data.imagenet prepare --train-tar ILSVRC2012_img_train.tar \\
        --val-tar ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz --out /data/imagenet
    python -m pipeline.data.imagenet prepare --devkit ILSVRC2012_devkit_t12.tar.gz --val-flat /data/imagenet/val
    python -m pipeline.data.imagenet verify /data/imagenet
    python -m pipeline.data.imagenet pack /data/imagenet --out /data/imagenet-packed [--shard-size 1GiB]

``verify`` decodes every file with DALI's CPU decoder (or Pillow's with ``--decoder pillow``) in
worker processes on all cores; a file that crashes the decoder kills only a worker, and is listed.
It writes the dataset index (``index/``, the undecodable files left out) and ``verify.json``: the
counts per split and class, the undecodable files and why, and the PNG, CMYK and grayscale files
named ``.JPEG`` (these decode to RGB and train normally). ``pack`` writes the indexed images into a
few large shard files with the same index (the same hash) and a SHA-256 per shard. ``prepare --val-flat``
sorts a val folder extracted flat (ILSVRC2012_val_*.JPEG) into class folders by the devkit's labels.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.checkpoint import atomic_write_bytes
from pipeline.cli import command
from pipeline.data.index import (
    CMYK,
    GRAYSCALE,
    INDEX_DIR,
    PNG_AS_JPEG,
    REPORT_NAME,
    DatasetIndex,
    SplitIndex,
    decode_with_pillow,
    finish,
    has_index,
    index_tree,
    inspect_file,
    load_index,
    make_split,
    save_index,
    scan_tree,
    tree_classes,
    usable_cpus,
)
from pipeline.data.layout import RAW_VAL_NAME, SPLITS, DatasetError, short_reason
from pipeline.data.samples import SHARD_DIR
from pipeline.signals import default_signal_handlers

IMAGENET_1K = {"train": 1_281_167, "val": 50_000, "classes": 1000}
DECODE_BATCH = 64
log = logging.getLogger("pipeline.data.imagenet")


def prepare(train_tar: str | Path | None, val_tar: str | Path | None, devkit: str | Path | None,
            out: str | Path | None) -> Path:
    """Extract the official archives into ``out/train/<wnid>/`` and ``out/val/<wnid>/`` with torchvision's parsers,
    then write the dataset index from the files' headers. On a failure, what it wrote into ``out`` is removed (and
    ``out`` itself, if it made it)."""
    from torchvision.datasets.imagenet import parse_devkit_archive, parse_train_archive, parse_val_archive

    archives = {"--train-tar": train_tar, "--val-tar": val_tar, "--devkit": devkit, "--out": out}
    for flag, path in archives.items():
        if path is None:
            raise DatasetError(f"prepare needs {flag}: --train-tar, --val-tar, --devkit and --out (or --devkit with "
                               "--val-flat DIR alone, to sort an already extracted flat val folder).")
    archives = {flag: Path(path) for flag, path in archives.items() if flag != "--out"}
    for flag, path in archives.items():
        if not path.is_file():
            raise DatasetError(f"{flag} '{path}' does not exist. Download it from image-net.org "
                               "(ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz).")
    out = Path(out).absolute()
    for split in SPLITS:
        if (out / split).exists():
            raise DatasetError(f"'{out / split}' already exists: prepare writes a new tree. Remove it or choose "
                               "another --out.")
    before = set(os.listdir(out)) if out.is_dir() else None
    out.mkdir(parents=True, exist_ok=True)
    # the small archives first: a damaged one is found before hours of extracting the train archive
    steps = [(parse_devkit_archive, archives["--devkit"], "devkit"), (parse_val_archive, archives["--val-tar"], "val"),
             (parse_train_archive, archives["--train-tar"], "train")]
    try:
        for parse, archive, key in steps:
            _parse_archive(parse, archive, key, out)
        save_index(index_tree(out), out)  # from the headers; verify replaces it after decoding every file
    except BaseException:
        _remove_new(out, before)
        raise
    return out


def _parse_archive(parse, archive: Path, key: str, root: Path) -> None:
    """torchvision's ``parse`` of ``archive`` into ``root``; an archive whose MD5 is not the official one is refused
    with both sums."""
    from torchvision.datasets.imagenet import ARCHIVE_META
    from torchvision.datasets.utils import calculate_md5

    log.info("Checking and extracting %s", archive)
    try:  # torchvision joins root and file; an absolute file path is used as is
        parse(str(root), str(archive.absolute()))
    except RuntimeError as err:  # torchvision says "not present ... or corrupted" for both
        name, expected = ARCHIVE_META[key]
        log.info("%s does not match the official checksum; reading it again to report its own", archive)
        found = calculate_md5(archive) if archive.is_file() else None
        if found is not None and found != expected:
            raise DatasetError(f"'{archive}' has the MD5 checksum {found}, but the official {name} has {expected}: "
                               "the file is damaged, incomplete or another file. Download it again from "
                               "image-net.org.") from None
        raise DatasetError(f"Could not use '{archive}': {err} Re-download it if it is damaged.") from None


def _remove_new(out: Path, before: set[str] | None) -> None:
    """Remove ``out`` if it did not exist (``before`` None), else the entries that were not in it before."""
    new = [out] if before is None else [out / name for name in set(os.listdir(out)) - before]
    for path in new:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def sort_val_folder(devkit: str | Path, folder: str | Path) -> dict[str, int]:
    """Move the flat ``folder`` of ImageNet's val images (ILSVRC2012_val_00000001.JPEG ...) into
    ``folder/<wnid>/`` by the devkit's labels (torchvision's devkit parser); returns the images per class.

    Files are moved in place, so a sort that was cut short is finished by running it again.
    """
    from torchvision.datasets.imagenet import load_meta_file, parse_devkit_archive

    devkit, folder = Path(devkit), Path(folder).absolute()
    if not devkit.is_file():
        raise DatasetError(f"--devkit '{devkit}' does not exist. Download ILSVRC2012_devkit_t12.tar.gz from "
                           "image-net.org: it holds the val images' labels.")
    if not folder.is_dir():
        raise DatasetError(f"--val-flat '{folder}' is not a folder: give the folder that holds the extracted "
                           "ILSVRC2012_val_*.JPEG files.")
    images = sorted(e.name for e in os.scandir(folder) if e.is_file() and RAW_VAL_NAME.fullmatch(e.name))
    if not images and any(e.is_dir() and e.name.startswith("n") for e in os.scandir(folder)):
        raise DatasetError(f"--val-flat '{folder}' holds class folders and no ILSVRC2012_val_*.JPEG files beside "
                           f"them: it is sorted already. Next: python -m pipeline.data.imagenet verify "
                           f"{folder.parent}")
    if not images:
        raise DatasetError(f"--val-flat '{folder}' holds no ILSVRC2012_val_*.JPEG files: give the folder that the "
                           "val archive (ILSVRC2012_img_val.tar) was extracted into.")
    with tempfile.TemporaryDirectory() as tmp:
        _parse_archive(parse_devkit_archive, devkit, "devkit", Path(tmp))
        wnids = load_meta_file(tmp)[1]  # the class of val image i + 1, from the devkit's ground truth
    numbers = [int(RAW_VAL_NAME.fullmatch(name).group(1)) for name in images]
    unknown = [name for name, n in zip(images, numbers, strict=True) if not 1 <= n <= len(wnids)]
    if unknown:
        raise DatasetError(f"The devkit labels {len(wnids)} val images, but '{folder}' holds {len(unknown)} with other "
                           f"numbers ({', '.join(unknown[:3])}): is it ImageNet-1k's (2012) val folder?")
    counts: Counter = Counter()
    for name, n in zip(images, numbers, strict=True):
        wnid = wnids[n - 1]
        (folder / wnid).mkdir(exist_ok=True)
        os.replace(folder / name, folder / wnid / name)
        counts[wnid] += 1
    if len(images) < len(wnids):
        log.warning("'%s' held %d of the devkit's %d val images; verify counts what the dataset holds.", folder,
                    len(images), len(wnids))
    return dict(counts)


def sorted_summary(folder: str | Path, counts: dict[str, int]) -> str:
    """What ``prepare --val-flat`` did, and the next command."""
    folder = Path(folder).absolute()
    root = folder.parent if folder.name == "val" else "<the folder holding train/ and this folder as val/>"
    return (f"Sorted {sum(counts.values())} val images in {folder} into {len(counts)} class folders with the "
            f"devkit's labels. Next: python -m pipeline.data.imagenet verify {root}")


_pipe = None  # a worker's DALI decode pipeline, built on its first batch


def _dali_pipe():
    global _pipe
    if _pipe is None:
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=DECODE_BATCH, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def decode():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)

        _pipe = decode()
        _pipe.build()
    return _pipe


def _dali_errors(paths: list[str], sizes: list[tuple[int, int]]) -> list[str | None]:
    """DALI's CPU decode of ``paths`` as one batch; on a failure, each file again in a fresh pipeline."""
    global _pipe
    if not paths:
        return []

    def shapes(batch: list[str]) -> list[tuple[int, ...]]:
        pipe = _dali_pipe()
        pipe.feed_input("encoded", [np.fromfile(p, dtype=np.uint8) for p in batch])
        return [tuple(shape) for shape in pipe.run()[0].shape()]

    try:
        decoded = shapes(paths)
        errors: list[str | None] = [None] * len(paths)
    except Exception:
        decoded, errors = [], []
        for path in paths:  # a pipeline that failed is not reused
            _pipe = None
            try:
                decoded += shapes([path])
                errors.append(None)
            except Exception as err:
                decoded.append(())
                errors.append(short_reason(str(err)))
        _pipe = None
    for i, ((width, height), shape) in enumerate(zip(sizes, decoded, strict=True)):
        if errors[i] is None and shape[:2] != (height, width):
            errors[i] = f"DALI decodes it to {shape[1]}x{shape[0]} pixels, its header says {width}x{height}"
    return errors


def check_files(paths: list[str], decoder: str) -> list[tuple[int, int, int, int, str | None]]:
    """(width, height, bytes, flags, error) of each file: its header read, then decoded by ``decoder``."""
    results = [list(inspect_file(p)) for p in paths]
    ok = [i for i, r in enumerate(results) if r[4] is None]
    if decoder == "pillow":
        for i in ok:
            results[i][4] = decode_with_pillow(Path(paths[i]).read_bytes())
    else:
        errors = _dali_errors([paths[i] for i in ok], [(results[i][0], results[i][1]) for i in ok])
        for i, error in zip(ok, errors, strict=True):
            results[i][4] = error
    return [tuple(r) for r in results]


CRASHED = "the decoder crashed its process (a native fault, e.g. SIGSEGV) on this file alone"


def _executor(workers: int) -> ProcessPoolExecutor:
    # garbage first: a forked child that frees an inherited DALI pipeline (left in a reference cycle, e.g. by an
    # error's traceback) waits for its threads, which were not forked, for ever
    gc.collect()
    return ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=default_signal_handlers)


def _run_tasks(tasks: list[list[str]], decoder: str, workers: int, results: dict, bar) -> list[str]:
    """:func:`check_files` of each task on ``workers`` processes, at most two tasks a worker in flight.

    When a process dies, the pool is replaced and the tasks in flight are returned (their paths) to be
    tried again; the others go on.
    """
    lost: list[str] = []
    queue = list(reversed(tasks))
    while queue:
        pool, futures = _executor(workers), {}
        try:
            while queue or futures:
                while queue and len(futures) < 2 * workers:
                    task = queue.pop()
                    futures[pool.submit(check_files, task, decoder)] = task
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    task = futures.pop(future)
                    try:
                        results.update(zip(task, future.result(), strict=True))
                        bar.update(len(task))
                    except BrokenProcessPool:
                        broken = True
                        lost += task
                if broken:  # every task in flight died with the pool
                    lost += [p for task in futures.values() for p in task]
                    break
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return lost


def _decode_all(paths: list[str], decoder: str, workers: int, bar) -> dict[str, tuple]:
    """:func:`check_files` of every path, in batches on ``workers`` processes that a decoder crash may kill.

    The files of the batches in flight when a process died are decoded again one file per task; a file
    whose process dies then is decoded once more alone in a fresh process, and if that process dies too
    it is listed as undecodable.
    """
    results: dict[str, tuple] = {}
    batches = [paths[i:i + DECODE_BATCH] for i in range(0, len(paths), DECODE_BATCH)]
    lost = _run_tasks(batches, decoder, workers, results, bar)
    if lost:
        log.warning("A decoder process died on a batch of %d files; decoding them one at a time", len(lost))
        lost = _run_tasks([[p] for p in lost], decoder, workers, results, bar)
    for path in lost:
        if _run_tasks([[path]], decoder, 1, results, bar):
            results[path] = (0, 0, 0, 0, CRASHED)
            bar.update(1)
    return results


def default_decoder() -> str:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "pillow"
    return "dali"


def verify(root: str | Path, decoder: str | None = None, workers: int | None = None) -> dict:
    """Count, decode and classify every image under ``root``; writes the index and the ``verify.json`` report.

    The index leaves out the files that cannot be decoded; the report lists them, with why.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DatasetError(f"Dataset folder '{root}' does not exist.")
    classes = tree_classes(root)
    decoder = decoder or default_decoder()
    workers = workers or usable_cpus()
    scanned = {split: scan_tree(root, classes, split) for split in SPLITS}
    names = [n for split_names, _ in scanned.values() for n in split_names]
    log.info("Verifying %d images in %s with the %s decoder on %d cores", len(names), root, decoder, workers)
    with tqdm(total=len(names), desc="decoding", unit="img", disable=None, mininterval=2) as bar:
        checked = _decode_all([str(root / n) for n in names], decoder, workers, bar)
    by_name = {n: checked[str(root / n)] for n in names}
    failures = {n: r[4] for n, r in by_name.items() if r[4]}

    splits = {}
    for split, (split_names, labels) in scanned.items():
        keep = [(n, lab) for n, lab in zip(split_names, labels, strict=True) if n not in failures]
        rows = [by_name[n] for n, _ in keep]
        splits[split] = make_split([n for n, _ in keep], [lab for _, lab in keep], [r[0] for r in rows],
                                   [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    index = finish(classes, splits, verified=True)
    save_index(index, root)

    def flagged(bit: int) -> list[str]:
        return sorted(n for n, r in by_name.items() if not r[4] and r[3] & bit)

    counts = {split: len(split_names) for split, (split_names, _) in scanned.items()}
    report = {
        "root": str(root),
        "decoder": decoder,
        "counts": {**counts, "classes": len(classes)},
        "per_class": {split: dict(Counter(classes[i] for i in labels)) for split, (_, labels) in scanned.items()},
        "imagenet_1k": counts == {"train": IMAGENET_1K["train"], "val": IMAGENET_1K["val"]}
        and len(classes) == IMAGENET_1K["classes"],
        "undecodable": sorted(failures),
        "errors": dict(sorted(failures.items())),
        "png_as_jpeg": flagged(PNG_AS_JPEG),
        "cmyk": flagged(CMYK),
        "grayscale": flagged(GRAYSCALE),
        "index": {"hash": index.hash, "counts": {s: len(ix) for s, ix in splits.items()}},
    }
    atomic_write_bytes(root / REPORT_NAME, json.dumps(report, indent=1).encode())
    return report


SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
              "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """``1GiB``, ``512MiB``, ``100MB`` or a number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise DatasetError(f"--shard-size {text!r} is not a size: use e.g. 1GiB, 512MiB or a number of bytes.")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])
    if size < 1:
        raise DatasetError(f"--shard-size {text!r} must be at least one byte.")
    return size


class _ShardWriter:
    """Appends samples to ``shard-NNNNN.bin`` files of at most ``limit`` bytes (one sample never spans two)."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.shards: list[dict] = []
        self._file, self._digest, self._size = None, None, 0

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = f"shard-{len(self.shards):05d}.bin"
        os.replace(self.folder / f".{name}.tmp", self.folder / name)
        self.shards.append({"file": name, "bytes": self._size, "sha256": self._digest.hexdigest()})
        self._file = None

    def add(self, data: bytes) -> tuple[int, int]:
        """Writes ``data``; returns (shard number, offset)."""
        if self._file is not None and self._size + len(data) > self.limit:
            self._close()
        if self._file is None:
            if len(self.shards) == 65535:
                raise DatasetError(f"--shard-size {self.limit} makes more than 65535 shards: choose a larger size.")
            self._file = open(self.folder / f".shard-{len(self.shards):05d}.bin.tmp", "wb")  # noqa: SIM115
            self._digest, self._size = hashlib.sha256(), 0
        at = self._size
        self._file.write(data)
        self._digest.update(data)
        self._size += len(data)
        return len(self.shards), at

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def pack(root: str | Path, out: str | Path, shard_size: int = 2**30, threads: int = 8) -> DatasetIndex:
    """Write the indexed samples of ``root`` into shards of about ``shard_size`` bytes in ``out/shards``, with
    the index (the same hash) and a SHA-256 per shard in ``out/index``."""
    root, out = Path(root).absolute(), Path(out).absolute()
    if not has_index(root):
        raise DatasetError(f"'{root}' has no dataset index. Run `python -m pipeline.data.imagenet verify {root}` "
                           "first: pack writes the files that verify found decodable.")
    index = load_index(root)
    if index.packed:
        raise DatasetError(f"'{root}' is already packed; copy it (index/ and shards/) instead of packing it again.")
    if not index.verified:
        log.warning("%s is indexed but unverified: a damaged file would be packed and stop training later. "
                    "Run verify first to leave such files out.", root)
    if (out / INDEX_DIR).exists() or (out / SHARD_DIR).exists():
        raise DatasetError(f"'{out}' already holds a packed dataset (index/ or shards/). Remove it or choose "
                           "another --out.")
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out / SHARD_DIR, shard_size)
    total = sum(len(ix) for ix in index.splits.values())
    splits = {}
    with ThreadPoolExecutor(threads) as pool, tqdm(total=total, desc="packing", unit="img", disable=None,
                                                   mininterval=2) as bar:
        for split, ix in index.splits.items():
            shard, offset = np.zeros(len(ix), np.uint16), np.zeros(len(ix), np.uint64)
            for start in range(0, len(ix), 1024):  # read ahead on threads, write in index order
                ids = range(start, min(start + 1024, len(ix)))
                for i, data in zip(ids, pool.map(lambda i, ix=ix: (root / ix.name(i)).read_bytes(), ids),
                                   strict=True):
                    if len(data) != ix.nbytes[i]:
                        raise DatasetError(f"{root / ix.name(i)} holds {len(data)} bytes, the index says "
                                           f"{int(ix.nbytes[i])}: the tree changed since it was indexed. Run "
                                           f"verify {root} again, then pack.")
                    shard[i], offset[i] = writer.add(data)
                bar.update(len(ids))
            splits[split] = SplitIndex(**{**{k: np.asarray(v) for k, v in ix.arrays().items()}, "shard": shard,
                                          "offset": offset})
    packed = finish(index.classes, splits, writer.finish(), verified=index.verified)
    assert packed.hash == index.hash  # where the bytes are is not part of the hash
    save_index(packed, out)
    if (root / REPORT_NAME).is_file():
        atomic_write_bytes(out / REPORT_NAME, (root / REPORT_NAME).read_bytes())
    return packed


def summarize(report: dict) -> str:
    counts = report["counts"]
    lines = [f"{report['root']}: {counts['train']} train and {counts['val']} val images in {counts['classes']} classes"
             + (" (the full ImageNet-1k)" if report["imagenet_1k"] else ""),
             f"  undecodable (left out of training): {len(report['undecodable'])}",
             f"  PNG named .JPEG: {len(report['png_as_jpeg'])}, CMYK: {len(report['cmyk'])}, "
             f"grayscale: {len(report['grayscale'])} (decoded to RGB, kept)"]
    lines += [f"    {path}: {err}" for path, err in list(report["errors"].items())[:20]]
    lines.append(f"  report: {Path(report['root']) / REPORT_NAME}")
    return "\n".join(lines)


@command()
def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.imagenet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="extract the official archives into train/<wnid>/ and val/<wnid>/")
    prep.add_argument("--train-tar")
    prep.add_argument("--val-tar")
    prep.add_argument("--devkit", required=True)
    prep.add_argument("--out")
    prep.add_argument("--val-flat", metavar="DIR", help="instead: sort this extracted flat val folder in place")
    ver = sub.add_parser("verify", help="count and decode every image; write verify.json beside the dataset")
    ver.add_argument("root")
    ver.add_argument("--decoder", choices=("dali", "pillow"), default=None, help="default: dali when installed")
    ver.add_argument("--workers", type=int, default=None, help="processes/threads (default: all cores)")
    pk = sub.add_parser("pack", help="write the verified images into large shard files, with the index")
    pk.add_argument("root")
    pk.add_argument("--out", required=True, help="the packed dataset's folder (data.root for training)")
    pk.add_argument("--shard-size", default="1GiB", help="about this many bytes per shard (default 1GiB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.command == "prepare" and args.val_flat:
        print(sorted_summary(args.val_flat, sort_val_folder(args.devkit, args.val_flat)))
    elif args.command == "prepare":
        out = prepare(args.train_tar, args.val_tar, args.devkit, args.out)
        print(f"Prepared {out} and its index. Next: python -m pipeline.data.imagenet verify {out}")
    elif args.command == "pack":
        packed = pack(args.root, args.out, parse_size(args.shard_size))
        counts = ", ".join(f"{len(ix)} {split}" for split, ix in packed.splits.items())
        print(f"Packed {counts} images into {len(packed.shards)} shards in {Path(args.out).absolute()} "
              f"(index {packed.hash[:16]}, the same as {Path(args.root).absolute()}'s). Train with "
              f"data.root={Path(args.out).absolute()}")
    else:
        print(summarize(verify(args.root, args.decoder, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
