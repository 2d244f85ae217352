"""A rank that stops making progress ends itself: every thread's stack in its log, then exit 75 (resume me).

A hung rank (a read stuck on NFS, a driver hang, a peer stopped mid-collective) leaves every other rank waiting in
its next collective until ``run.dist_timeout_s``, 30 minutes by default, with no word of where it waits. The
watch is a thread that every training step and validation batch touches; when none touched it for
``run.hang_timeout_s``, it logs what the rank was doing (every thread's Python stack, the main thread's first),
ends the rank's
child processes and exits the process with status 75. The ranks that wait for a hung one are idle too, so
their watches fire as well; whichever exits first ends the job: torchrun stops the other ranks of its node, and
under SLURM ``srun --kill-on-bad-exit`` the whole step, whose job then requeues itself and resumes from its
last checkpoint (``launch.slurm``). A rank stopped outright (SIGSTOP) cannot dump; the ranks waiting for it do.

The watch is armed by the first step of an attempt: a first step that compiles the model, and everything before
it (the rendezvous, the dataset checks), are bounded by ``run.dist_timeout_s`` instead.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator

import psutil

from pipeline.checkpoint import RESUME_EXIT_CODE

log = logging.getLogger(__name__)


class HangWatch:
    """Ends this process when :meth:`beat` was not called for ``timeout_s`` seconds once armed; 0 turns it off."""

    def __init__(self, timeout_s: float, rank: int, poll_s: float = 1.0):
        self.timeout_s = timeout_s
        self.rank = rank
        self.poll_s = min(poll_s, timeout_s / 4) if timeout_s else poll_s
        self.linger_s = min(5.0, timeout_s / 4)
        self.step: int | None = None  # the last step that finished; None until the watch is armed
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, step: int | None = None) -> None:
        """Progress (a step or a batch finished); a step number also arms the watch."""
        self._last = time.monotonic()
        if step is not None:
            self.step = step

    def watch(self, batches: Iterable) -> Iterator:
        """``batches``, with a beat after each one (validation)."""
        for batch in batches:
            yield batch
            self.beat()

    def start(self) -> HangWatch:
        if self.timeout_s and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hang-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._done.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if self.step is not None and idle > self.timeout_s:
                self._end(idle)

    def _end(self, idle: float) -> None:
        # should logging itself block (a log file on a hung filesystem), faulthandler's own thread, which needs no
        # interpreter lock, dumps the stacks to stderr and ends the process (status 1: a fault all the same)
        faulthandler.dump_traceback_later(60, exit=True)
        log.error("rank %d on %s: no training step finished for %.0fs (run.hang_timeout_s=%g; the last one was "
                  "global step %d). This rank, or one it waits for, is stuck; the threads of this rank were here:\n"
                  "%s\nStopping (exit %d): the job resumes from its last checkpoint when started again (under "
                  "SLURM it requeues itself).", self.rank, socket.gethostname(), idle, self.timeout_s, self.step,
                  thread_stacks(), RESUME_EXIT_CODE)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        # the ranks that wait for the same stuck one fire within a poll or a step of each other, and the first to
        # exit ends the job: a moment for the others (the stuck one among them) to log their stacks too
        time.sleep(self.linger_s)
        for child in psutil.Process().children(recursive=True):  # loader workers: nothing left behind
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        os._exit(RESUME_EXIT_CODE)  # the main thread may be stuck in a collective: end the process from here


def thread_stacks() -> str:
    """Every other thread's Python stack, the main thread's first; threads with the same stack (a pool's idle
    workers) are shown once."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main, me = threading.main_thread().ident, threading.get_ident()
    stacks: dict[str, list[str]] = {}
    for ident, frame in sorted(sys._current_frames().items(), key=lambda item: item[0] != main):
        if ident != me:
            stacks.setdefault("".join(traceback.format_stack(frame)), []).append(names.get(ident, hex(ident)))
    parts = []
    for stack, who in stacks.items():
        more = ", ..." if len(who) > 3 else ""
        head = who[0] if len(who) == 1 else f"{len(who)} threads ({', '.join(who[:3])}{more})"
        parts.append(f"{head}, most recent call last:\n{stack}")
    return "\n".join(parts)
