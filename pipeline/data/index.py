"""The dataset index: the one description of each split that every rank reads, and its content hash.

Per split, numpy arrays with one entry per sample: ``label``, ``width``, ``height``, ``nbytes``,
``flags`` (PNG named .JPEG, CMYK, grayscale), the sample's name (its path relative to the dataset
root, as one byte blob and end offsets: no Python string per sample) and, for a packed dataset,
``shard`` and ``offset``. The classes, the shards (name, size, SHA-256) and the hash go in
``index/index.json``; each array is its own ``.npy`` file, memory-mapped on load, so the ranks and
loader workers of a node share one copy in the page cache.

The hash covers the classes and each sample's name, label, size and byte length, not where its
bytes are: a folder tree, its packed copy and a node-local copy of either have the same hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.checkpoint import atomic_write_bytes
from pipeline.data.layout import IMAGE_EXTENSIONS, SPLITS, DatasetError, check_image_folder

INDEX_DIR = "index"
META = "index.json"
INDEX_VERSION = 1
log = logging.getLogger(__name__)

# bits of ``flags``: files that decode to RGB and train normally, listed by verify
PNG_AS_JPEG, CMYK, GRAYSCALE = 1, 2, 4
DTYPES = {"label": np.int32, "width": np.uint16, "height": np.uint16, "nbytes": np.uint32, "flags": np.uint8,
          "name_end": np.int64, "names": np.uint8, "shard": np.uint16, "offset": np.uint64}
HASHED = ("label", "width", "height", "nbytes", "name_end", "names")


@dataclass
class SplitIndex:
    """One split's samples as numpy arrays; sample ``i`` is entry ``i`` of each."""

    label: np.ndarray
    width: np.ndarray
    height: np.ndarray
    nbytes: np.ndarray
    flags: np.ndarray
    names: np.ndarray  # the UTF-8 names, concatenated
    name_end: np.ndarray  # where each name ends in ``names``
    shard: np.ndarray | None = None  # packed datasets: which shard, and where in it
    offset: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def name(self, i: int) -> str:
        """Sample ``i``'s path relative to the dataset root (``train/<class>/<file>``)."""
        start = int(self.name_end[i - 1]) if i else 0
        return bytes(self.names[start:int(self.name_end[i])]).decode()

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in DTYPES if getattr(self, k) is not None}

    def per_class(self, num_classes: int) -> list[int]:
        return np.bincount(self.label, minlength=num_classes).tolist()


@dataclass
class DatasetIndex:
    """The classes, each split's :class:`SplitIndex`, the shards of a packed dataset, and the hash."""

    classes: list[str]
    splits: dict[str, SplitIndex]
    shards: list[dict] = field(default_factory=list)  # {"file", "bytes", "sha256"}
    hash: str = ""
    verified: bool = False  # every file decoded by verify (else indexed from headers alone)

    @property
    def packed(self) -> bool:
        return bool(self.shards)

    def summary(self) -> dict:
        """What a checkpoint records of the dataset: the hash, and counts per split and class."""
        return {"hash": self.hash, "classes": list(self.classes),
                "counts": {s: len(ix) for s, ix in self.splits.items()},
                "per_class": {s: ix.per_class(len(self.classes)) for s, ix in self.splits.items()}}


def digests(classes: list[str], splits: dict[str, SplitIndex]) -> tuple[str, str]:
    """(content hash, arrays checksum), in one pass over the arrays. The content hash is the dataset's
    identity: the classes and each sample's name, label, size and byte length. The checksum covers every
    array (where the bytes lie too), to check that the files are whole."""
    content = hashlib.sha256(json.dumps(classes).encode())
    everything = content.copy()
    for split in SPLITS:
        for key in DTYPES:
            if getattr(splits[split], key) is None:
                continue
            array = np.ascontiguousarray(getattr(splits[split], key), dtype=DTYPES[key])
            for digest in (content, everything) if key in HASHED else (everything,):
                digest.update(f"{split}.{key}:{len(array)}".encode())
                digest.update(memoryview(array).cast("B"))
    return content.hexdigest(), everything.hexdigest()


def make_split(names: list[str], labels, widths, heights, nbytes, flags=None, shard=None,
               offset=None) -> SplitIndex:
    """A :class:`SplitIndex` from per-sample lists (built once, when indexing)."""
    encoded = [n.encode() for n in names]
    too_big = [n for n, w, h in zip(names, widths, heights, strict=True) if max(w, h) > 65535]
    if too_big:
        raise DatasetError(f"{too_big[0]} is larger than 65535 pixels on a side (JPEG's own limit); the index "
                           "cannot hold it. Resize or remove it, then index again.")
    return SplitIndex(
        label=np.asarray(labels, dtype=np.int32), width=np.asarray(widths, dtype=np.uint16),
        height=np.asarray(heights, dtype=np.uint16), nbytes=np.asarray(nbytes, dtype=np.uint32),
        flags=np.zeros(len(names), np.uint8) if flags is None else np.asarray(flags, dtype=np.uint8),
        names=np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
        name_end=np.cumsum([len(e) for e in encoded], dtype=np.int64),
        shard=None if shard is None else np.asarray(shard, dtype=np.uint16),
        offset=None if offset is None else np.asarray(offset, dtype=np.uint64))


def finish(classes: list[str], splits: dict[str, SplitIndex], shards: list[dict] | None = None,
           verified: bool = False) -> DatasetIndex:
    return DatasetIndex(list(classes), splits, shards or [], digests(classes, splits)[0], verified)


def save_index(index: DatasetIndex, root: str | Path) -> Path:
    """Write ``root/index/``: each array atomically, ``index.json`` last (it names the hash)."""
    folder = Path(root) / INDEX_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for split, ix in index.splits.items():
        for key, array in ix.arrays().items():
            buffer = _npy_bytes(array)
            atomic_write_bytes(folder / f"{split}.{key}.npy", buffer)
    meta = {"version": INDEX_VERSION, "hash": index.hash, "verified": index.verified, "classes": index.classes,
            "shards": index.shards, "counts": {s: len(ix) for s, ix in index.splits.items()},
            "arrays_sha256": digests(index.classes, index.splits)[1]}
    atomic_write_bytes(folder / META, json.dumps(meta, indent=1).encode())
    return folder


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def has_index(root: str | Path) -> bool:
    return (Path(root) / INDEX_DIR / META).is_file()


def load_index(root: str | Path) -> DatasetIndex:
    """``root/index/``, memory-mapped; a missing or inconsistent file is named with the fix."""
    folder = Path(root) / INDEX_DIR
    fix = (f"Run `python -m pipeline.data.imagenet verify {root}` to index a folder tree again, or copy the "
           "packed dataset's index/ folder again.")
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"Cannot read the dataset index {folder / META}: {err}. {fix}") from None
    if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else None
        raise DatasetError(f"{folder / META} is not an index of this format (version {version}). {fix}")
    try:
        return _load_arrays(folder, meta, fix)
    except (KeyError, TypeError, AttributeError) as err:
        raise DatasetError(f"{folder / META} is damaged ({type(err).__name__}: {err}). {fix}") from None


def _load_arrays(folder: Path, meta: dict, fix: str) -> DatasetIndex:
    splits = {}
    for split in SPLITS:
        arrays = {}
        for key in DTYPES:
            path = folder / f"{split}.{key}.npy"
            if key in ("shard", "offset") and not meta["shards"]:
                continue
            try:
                arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DatasetError(f"Dataset index file {path} is missing or damaged ({err}). {fix}") from None
        lengths = {k: len(v) for k, v in arrays.items() if k != "names"}
        if set(lengths.values()) != {meta["counts"][split]}:
            raise DatasetError(f"The dataset index in {folder} is inconsistent ({split}: {lengths}, expected "
                               f"{meta['counts'][split]} entries each). {fix}")
        splits[split] = SplitIndex(**arrays)
    if digests(meta["classes"], splits) != (meta["hash"], meta["arrays_sha256"]):  # one read of the mapped arrays
        raise DatasetError(f"The dataset index in {folder} is damaged: its arrays do not give the checksums "
                           f"that {META} records. {fix}")
    return DatasetIndex(meta["classes"], splits, meta["shards"], meta["hash"], meta.get("verified", False))


# ---------------------------------------------------------------- indexing a folder tree

def scan_tree(root: Path, classes: list[str], split: str) -> tuple[list[str], list[int]]:
    """Every image under ``root/split/<class>/``, sorted: names relative to ``root``, and labels."""
    names, labels = [], []
    for label, name in enumerate(classes):
        with os.scandir(root / split / name) as entries:
            files = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        names += [f"{split}/{name}/{f}" for f in files]
        labels += [label] * len(files)
    return names, labels


def usable_cpus() -> int:
    """The CPUs this process may run on: a SLURM task's (its CPU mask), not the node's, which os.cpu_count gives."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no CPU masks on this platform (macOS)
        return os.cpu_count() or 1


def inspect_file(path: str) -> tuple[int, int, int, int, str | None]:
    """(width, height, bytes, flags, error) of one file, from its header: Pillow reads no pixels here."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return 0, 0, 0, 0, "empty file (0 bytes)"
        with Image.open(path) as image:
            flags = 0
            if image.format == "PNG" and path.lower().endswith((".jpeg", ".jpg")):
                flags |= PNG_AS_JPEG
            if image.mode == "CMYK":
                flags |= CMYK
            if image.mode in ("L", "LA", "I;16", "1"):
                flags |= GRAYSCALE
            return image.size[0], image.size[1], size, flags, None
    except Exception as err:  # Pillow raises several types for damaged files
        return 0, 0, 0, 0, f"{type(err).__name__}: {err}"


def tree_classes(root: Path, num_classes: int | None = None) -> list[str]:
    """The class folders of ``root`` (train and val must agree); ``num_classes`` None takes any number."""
    if num_classes is None:
        train = root / "train"
        num_classes = len([e for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")]) \
            if train.is_dir() else 0
    return check_image_folder(root, num_classes)


def index_tree(root: str | Path, num_classes: int | None = None, workers: int | None = None,
               exclude: frozenset[str] = frozenset()) -> DatasetIndex:
    """Index a folder tree from its files' headers (no decoding), on ``workers`` processes.

    ``exclude`` names (relative to ``root``) are left out; so are files whose header cannot be read.
    """
    from pipeline.signals import default_signal_handlers

    root = Path(root).absolute()
    classes = tree_classes(root, num_classes)
    scanned = {split: scan_tree(root, classes, split) for split in SPLITS}
    paths = [str(root / n) for names, _ in scanned.values() for n in names]
    # close + join, never terminate: the workers finish their queue and exit on their own
    pool = Pool(workers or usable_cpus(), initializer=default_signal_handlers)
    try:
        headers = iter(pool.imap(inspect_file, paths, chunksize=256))
        splits, unreadable = {}, []
        for split, (names, labels) in scanned.items():
            rows = [(n, lab, next(headers)) for n, lab in zip(names, labels, strict=True)]
            unreadable += [f"{n} ({h[4]})" for n, _, h in rows if h[4] is not None]
            keep = [row for row in rows if row[2][4] is None and row[0] not in exclude]
            splits[split] = make_split([k[0] for k in keep], [k[1] for k in keep], [k[2][0] for k in keep],
                                       [k[2][1] for k in keep], [k[2][2] for k in keep], [k[2][3] for k in keep])
    finally:
        pool.close()
        pool.join()
    if unreadable:
        log.warning("Left out %d files whose header cannot be read: %s", len(unreadable),
                    "; ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else ""))
    return finish(classes, splits)


def describe_change(old: dict, new: dict) -> str:
    """What differs between two :meth:`DatasetIndex.summary` records: counts per split and class."""
    parts = []
    for split in SPLITS:
        a, b = old["counts"].get(split, 0), new["counts"].get(split, 0)
        if a != b:
            parts.append(f"{split}: {a} -> {b} samples")
        if old["classes"] != new["classes"]:
            continue
        diffs = [f"{name} {x} -> {y}" for name, x, y in zip(new["classes"], old["per_class"][split],
                                                              new["per_class"][split], strict=True) if x != y]
        if diffs:
            parts.append(f"{split} classes changed: {', '.join(diffs[:5])}" + (" ..." if len(diffs) > 5 else ""))
    if old["classes"] != new["classes"]:
        parts.append(f"classes: {len(old['classes'])} -> {len(new['classes'])}")
    return "; ".join(parts) or "the same counts; sample names, sizes or byte lengths changed"


REPORT_NAME = "verify.json"


def load_exclusions(root: str | Path) -> frozenset[str]:
    """Names (relative to ``root``) of the files an older ``verify`` report found undecodable."""
    report = Path(root) / REPORT_NAME
    if not report.is_file():
        return frozenset()
    try:
        return frozenset(json.loads(report.read_text()).get("undecodable", []))
    except (OSError, ValueError, AttributeError) as err:
        log.warning("Cannot read %s (%s): no files left out by it. Run verify again to rewrite it.", report, err)
        return frozenset()


def decode_with_pillow(data: bytes) -> str | None:
    """Why Pillow cannot decode ``data`` to RGB, or None if it can."""
    import io

    if not data:
        return "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB").load()
    except Exception as err:  # Pillow raises several types for damaged files
        return f"{type(err).__name__}: {err}"
    return None
