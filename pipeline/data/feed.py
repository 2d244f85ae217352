"""The inputs of the next batches, prepared ahead of the training thread on a few threads of our own.

A batch's inputs (its samples' encoded bytes, crop windows, augmentation arguments) are a pure function of
its position, so they can be prepared before anyone asks: file reads wait on the filesystem, and the training
thread, which launches the kernels, should not. DALI's own ``parallel=True`` external source runs its callbacks
in worker processes; plain threads suffice here (reads release the GIL) and keep errors and ids in this process.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

JOIN_TIMEOUT_S = 5.0  # close() waits this long for a read in progress; the threads are daemons past it


def _work(jobs: queue.SimpleQueue) -> None:
    """A feed thread: runs ``(future, make, k)`` jobs until it is handed None. It holds no reference to its
    feed, so a feed nobody closed is still collected (and its finalizer stops the threads)."""
    while (job := jobs.get()) is not None:
        future, make, k = job
        if not future.set_running_or_notify_cancel():
            continue  # a pass given up before its turn came
        try:
            future.set_result(make(k))
        except BaseException as err:  # noqa: BLE001 - handed to the caller, on its own thread
            future.set_exception(err)


def _stop(jobs: queue.SimpleQueue, threads: list[threading.Thread], timeout: float | None = None) -> None:
    """Tells each thread to end; waits ``timeout`` seconds for them (None: not at all, as a finalizer, which may
    run on one of them)."""
    for _ in threads:
        jobs.put(None)
    if timeout is not None:
        for thread in threads:
            thread.join(timeout)
    threads.clear()


class BatchFeed:
    """Hands out ``batches(0), batches(1), ...`` of a pass (``None`` ends it), one per call: the callable that
    DALI's ``external_source`` pulls from. With ``depth`` > 0 each batch is prepared up to ``depth`` calls ahead
    on ``depth`` daemon threads; with 0, on the caller's thread when it calls (the loader's old behaviour).

    A batch whose preparation raised ends the pass there: the call raises StopIteration and ``error`` holds the
    exception, for the loader to raise on its own thread once the batches before it are consumed. ``on_fed`` is
    called with each batch handed out (the loader remembers the ids DALI holds).
    """

    def __init__(self, depth: int, on_fed: Callable[[tuple], None], name: str = "batch-feed"):
        self.depth, self.name, self._on_fed = depth, name, on_fed
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._ahead: deque[Future] = deque()
        self._batches: Callable[[int], tuple | None] | None = None
        self._next = 0
        self.error: BaseException | None = None
        weakref.finalize(self, _stop, self._jobs, self._threads)

    def begin(self, batches: Callable[[int], tuple | None]) -> None:
        """Starts a pass over ``batches`` (the one before, if any, is given up) and starts preparing its first
        ``depth`` batches."""
        self._give_up()
        self._batches, self._next, self.error = batches, 0, None
        if self.depth and not self._threads:
            for k in range(self.depth):
                thread = threading.Thread(target=_work, args=(self._jobs,), name=f"{self.name}-{k}", daemon=True)
                thread.start()
                self._threads.append(thread)
        for k in range(self.depth):
            self._submit(k)

    def _submit(self, k: int) -> None:
        future: Future = Future()
        self._jobs.put((future, self._batches, k))
        self._ahead.append(future)

    def _give_up(self) -> None:
        while self._ahead:
            self._ahead.popleft().cancel()  # one already running finishes, and nobody reads it

    def __call__(self) -> tuple:
        if self._batches is None:
            raise StopIteration
        try:
            if self.depth:
                ready = self._ahead.popleft()
                self._submit(self._next + self.depth)
                batch = ready.result()
            else:
                batch = self._batches(self._next)
        except Exception as err:  # a read failed: the batches before it are still delivered
            self.error, self._batches = err, None
            self._give_up()
            raise StopIteration from None
        if batch is None:
            self._give_up()
            raise StopIteration
        self._next += 1
        self._on_fed(batch)
        return batch

    def failure(self) -> BaseException | None:
        """The error that ended the pass, if one did, handed over once (the pass is over)."""
        error, self.error, self._batches = self.error, None, None
        return error

    def close(self) -> None:
        """Gives up the pass and ends the threads (waiting up to ``JOIN_TIMEOUT_S`` for a read in progress; they
        are daemons, so a read that hangs longer never blocks the process's exit). A later pass starts new ones."""
        self._give_up()
        self._batches = None
        _stop(self._jobs, self._threads, JOIN_TIMEOUT_S)
