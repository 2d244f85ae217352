"""One run per run dir: rank 0 holds a POSIX lock on ``run.dir/run.lock`` for the whole run.

The lock is an ``fcntl`` record lock, which NFS (v4, or v3 with lockd), GPFS, CephFS and Lustre mounted
with ``-o flock`` hold across nodes. Lustre's ``localflock`` and BeeGFS without global file locks hold it
on one node only: a second run from another node is then not stopped. A filesystem without locks is
warned about and the run goes on. The kernel (or the NFS server, when the lease of a dead node expires)
releases the lock when its process ends, however it ends, so a crashed run leaves no stale lock. A requeued
attempt of the same SLURM job waits for its earlier attempt's lock for a grace period, then takes it over (a lost
node's lock can outlast it); a run of another job is refused at once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# a requeued job may start again while the NFS server still holds its dead attempt's lock (lease: 90 s)
SAME_JOB_GRACE_S = 150.0


def holds_files(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` exists and holds anything but its lock file (what run.resume=never refuses)."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir())


class RunDirLocked(RuntimeError):
    """Another run holds the run dir."""


def holder() -> dict:
    """Who this process is, as written into the lock file."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def describe(who: dict) -> str:
    job = f", SLURM job {who['slurm_job_id']}" if who.get("slurm_job_id") else ""
    return f"pid {who.get('pid', '?')} on {who.get('host', '?')}{job}, since {who.get('since', '?')}"


class RunDirLock:
    """Held while the run lasts; :meth:`release` (or the process ending) lets the next run in."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, grace_s: float = SAME_JOB_GRACE_S) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        me, deadline = holder(), time.monotonic() + grace_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    log.warning("The filesystem of %s does not support file locks (%s): a second run into this "
                                "run dir would not be stopped.", self.path.parent, os.strerror(err.errno))
                    os.close(fd)
                    return self
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                other = self._read(fd)
                # an earlier attempt of this very job (requeued), not another run inside the same allocation
                earlier = me["slurm_job_id"] and other.get("slurm_job_id") == me["slurm_job_id"] \
                    and int(other.get("slurm_restart") or 0) < me["slurm_restart"]
                if earlier and time.monotonic() < deadline:
                    time.sleep(min(2, grace_s / 4))  # not released yet (an NFS server waits for the lease to end)
                    continue
                os.close(fd)
                if earlier:  # a lost node's attempt, whose lock its filesystem still holds: take it over
                    return self._take_over(other, me, grace_s)
                raise RunDirLocked(
                    f"run.dir='{self.path.parent}' is in use by another run ({describe(other)}). Two runs in one "
                    "dir would overwrite each other's metrics and checkpoints. Wait for it to end (or cancel "
                    "it: python -m launch.slurm cancel RUN_DIR, or stop that process), or choose another "
                    "run.dir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
        os.fsync(fd)  # so a run on another node reads who holds it
        self._fd = fd
        return self

    def _take_over(self, other: dict, me: dict, grace_s: float) -> RunDirLock:
        """A new lock file, locked and naming this process, renamed over the old one: every later opener of
        ``run.lock`` opens the new file, whose lock is ours; the old file's lock, which a dead node may hold for
        minutes more (an NFS lease, a Lustre eviction), no longer stands for the run dir."""
        fresh = self.path.with_name(f".{LOCK_FILE}.{me['host']}.{me['pid']}")
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(fd, json.dumps({**me, "took_over": describe(other)}).encode() + b"\n", 0)
            os.fsync(fd)
            os.replace(fresh, self.path)
        except OSError:
            os.close(fd)
            fresh.unlink(missing_ok=True)
            raise
        self._fd = fd
        log.warning("Took over %s from the earlier attempt of this job that held it (%s, attempt %d): it was not "
                    "released within %.0fs, as when that attempt's node was lost.", self.path,
                    describe(other), int(other.get("slurm_restart") or 0) + 1, grace_s)
        return self

    def taken_over(self) -> dict | None:
        """Who holds ``run.lock`` now if a later attempt took it over from this one (a node thought lost that
        came back), else None. Cheap (a stat); the file is opened only when it is another than ours: closing a
        descriptor of the file this process locked would release the lock."""
        if self._fd is None:
            return None
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                return None
            with open(self.path, "rb") as f:
                return json.loads(f.read(4096).decode() or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the lock; the file stays, naming the last holder
            self._fd = None
