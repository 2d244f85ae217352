"""A split's encoded samples by id: from the files of a folder tree, or from memory-mapped shards.

A packed dataset's shards are opened once per process and memory-mapped, so reading a sample opens
no file; the page cache holds one copy per node for every rank and loader worker on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.checkpoint import atomic_write_bytes
from pipeline.data.index import DatasetIndex, SplitIndex
from pipeline.data.layout import DatasetError

SHARD_DIR = "shards"
READ_THREADS = 8


class SampleBytes:
    """``read(i)`` gives sample ``i``'s encoded bytes as a uint8 array; ``path(i)`` names where they are."""

    def __init__(self, root: str | Path, index: DatasetIndex, split: str):
        self.root = Path(root).absolute()
        self.split: SplitIndex = index.splits[split]
        self.shard_files = [self.root / SHARD_DIR / s["file"] for s in index.shards]
        self._maps: list[mmap.mmap] | None = None
        self._pid = -1
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._lock = threading.Lock()

    def _shard_maps(self) -> list[mmap.mmap]:
        with self._lock:  # the first reads may come from several threads
            if self._maps is None or self._pid != os.getpid():  # a forked worker maps them itself
                maps = []
                for path in self.shard_files:
                    with open(path, "rb") as f:
                        maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
                self._maps, self._pid = maps, os.getpid()
            return self._maps

    def read(self, i: int) -> np.ndarray:
        """Sample ``i``'s bytes, as many as the index says it has (else a DatasetError names the file)."""
        if self.split.shard is None:
            try:
                data = np.fromfile(self.root / self.split.name(i), dtype=np.uint8)
            except (FileNotFoundError, NotADirectoryError) as err:
                raise DatasetError(self.changed(f"Cannot read {self.path(i)} ({err.strerror or err})")) from None
            except OSError as err:  # EIO, ESTALE, a timeout: the filesystem failed, not the dataset (a fault)
                raise OSError(err.errno, f"Cannot read {self.path(i)}: {err.strerror or err} (an error of the "
                                         "filesystem, not a change of the dataset: run the same command again to "
                                         "resume; under SLURM the job requeues itself)") from None
            if len(data) != int(self.split.nbytes[i]):
                raise DatasetError(self.changed(f"{self.path(i)} holds {len(data)} bytes, but the index says "
                                                f"{int(self.split.nbytes[i])} (truncated or replaced)"))
            return data
        data = self._shard_maps()[int(self.split.shard[i])]
        offset, size = int(self.split.offset[i]), int(self.split.nbytes[i])
        if offset + size > len(data):
            raise DatasetError(f"{self.path(i)} lies past the end of its shard ({len(data)} bytes): the shard is "
                               "truncated. Copy it again from the packed dataset.")
        return np.frombuffer(data, dtype=np.uint8, count=size, offset=offset)

    def read_many(self, ids: np.ndarray) -> list[np.ndarray]:
        """``read`` of each id. Files are read on threads: on a network filesystem each read waits for the
        server, and the waits overlap. From shards, the kernel is first asked to read ahead every sample's
        pages (``MADV_WILLNEED``), so they arrive together while the views are handed out."""
        if self.split.shard is not None:
            maps = self._shard_maps()
            for i in ids.tolist():
                offset = int(self.split.offset[i])
                start = offset - offset % mmap.PAGESIZE
                data = maps[int(self.split.shard[i])]
                if start < len(data):  # past the end, read() names the truncated shard
                    data.madvise(mmap.MADV_WILLNEED, start, min(len(data), offset + int(self.split.nbytes[i])) - start)
            return [self.read(i) for i in ids.tolist()]
        with self._lock:  # batches may be prepared on several threads
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool, self._pool_pid = ThreadPoolExecutor(READ_THREADS, "sample-read"), os.getpid()
            pool = self._pool
        return list(pool.map(self.read, ids.tolist()))

    def close(self) -> None:
        """Ends the read threads (a later read starts new ones); reads in progress finish."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=False, cancel_futures=True)

    def changed(self, what: str) -> str:
        """The message for a sample that is not what was indexed: ``what``, and the fix."""
        return (f"{what}: the dataset changed since it was indexed. Run `python -m pipeline.data.imagenet verify "
                f"{self.root}` to index it again (then resume with run.on_dataset_change=next_epoch).")

    def size_problem(self, i: int, width: int, height: int) -> str | None:
        """Why an image of ``width`` x ``height`` pixels is not sample ``i`` as indexed, or None if it is."""
        w, h = int(self.split.width[i]), int(self.split.height[i])
        if (width, height) == (w, h):
            return None
        return self.changed(f"{self.path(i)} is {width}x{height} pixels, but the index says {w}x{h}")

    def header_problem(self, i: int) -> str | None:
        """Sample ``i`` read again, alone, and compared with the index (bytes, and the size its header gives);
        None if it matches, or if its header cannot be read (a damaged file, for the decoder to name)."""
        from PIL import Image

        try:
            data = self.read(i)
        except DatasetError as err:
            return str(err)
        try:
            with Image.open(io.BytesIO(data.tobytes())) as image:
                return self.size_problem(i, *image.size)
        except Exception:  # Pillow raises several types for damaged files
            return None

    def path(self, i: int) -> str:
        """The file that holds sample ``i``: its own file, or its shard with the offset."""
        if self.split.shard is None:
            return str(self.root / self.split.name(i))
        return (f"{self.shard_files[int(self.split.shard[i])]} at byte {int(self.split.offset[i])} "
                f"({self.split.name(i)})")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None, "_pid": -1, "_pool": None, "_pool_pid": -1, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_shards(root: str | Path, index: DatasetIndex, rank: int = 0, world_size: int = 1,
                 checksums: bool = True, per_node: bool = False) -> list[str]:
    """Problems with a packed dataset's shards: every size checked here, and (``checksums``) the
    SHA-256 of shards ``rank``, ``rank + world_size``, ..., so the ranks share the reading.

    A shard whose checksum was found good is trusted on later starts while its size, modification time and
    inode are unchanged (:class:`ShardChecks`): a requeued job does not read the whole dataset again.
    ``per_node``: the shares are of this node's copy (``data.check_shards=node``), not of one shared copy."""
    problems = []
    folder = Path(root).absolute() / SHARD_DIR
    checked = ShardChecks(index.hash, f"{rank}-of-{world_size}" + (f"-{socket.gethostname()}" if per_node else ""))
    for number, shard in enumerate(index.shards):
        path = folder / shard["file"]
        try:
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif (stat := path.stat()).st_size != shard["bytes"]:
                problems.append(f"{path} holds {stat.st_size} bytes, not {shard['bytes']} (truncated or overwritten)")
            elif checksums and number % world_size == rank and not checked.trusted(path, stat, shard["sha256"]):
                if file_sha256(path) == shard["sha256"]:
                    checked.good(path, stat, shard["sha256"])
                else:
                    problems.append(f"{path} fails its SHA-256 checksum (damaged)")
        except OSError as err:  # a failing disk or a permission: the damage this looks for
            problems.append(f"{path} cannot be read ({err.strerror or err})")
    checked.save()
    return problems


class ShardChecks:
    """The shards found good by one share of the reading (``share``: "3-of-8", and the host for node-local
    copies), by path, size, modification time and inode (a copy, a rewrite or a touch changes one), kept per
    dataset index under ``$XDG_CACHE_HOME`` (or ``~/.cache``)/densenet-pipeline/shards/: one small file per
    share, read by the rank that has that share, on whichever node it runs after a requeue."""

    def __init__(self, index_hash: str, share: str):
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.path = cache / "densenet-pipeline" / "shards" / f"{index_hash[:16]}-{share}.json"
        try:
            self.known: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    @staticmethod
    def _key(stat: os.stat_result, sha256: str) -> list:
        return [stat.st_size, stat.st_mtime_ns, stat.st_ino, sha256]

    def trusted(self, path: Path, stat: os.stat_result, sha256: str) -> bool:
        return self.known.get(str(path)) == self._key(stat, sha256)

    def good(self, path: Path, stat: os.stat_result, sha256: str) -> None:
        self.known[str(path)], self.changed = self._key(stat, sha256), True

    def save(self) -> None:
        if not self.changed:
            return
        try:  # a cache that cannot be written only costs the checksums again next time
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(self.known).encode())
        except OSError:
            pass
