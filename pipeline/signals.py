"""Stop signals (SIGTERM, SIGUSR1, SIGUSR2): the handler only notes the time; the loop acts on it."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import signal
import time

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def default_signal_handlers(*_) -> None:
    """For a forked worker process of a pool that must die with its job (``verify``'s decoders).

    The parent's handlers only take notes, so a worker that inherited them would outlive SIGTERM and
    hang its pool's shutdown or a scheduler's kill; with the defaults back, it dies of the signal.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def ignore_stop_signals(*_) -> None:
    """For a DataLoader worker (its ``worker_init_fn``).

    SLURM and ``kill -- -PGID`` signal every process of the job, workers included. A worker that died of
    the signal would make PyTorch's loader raise in the training process before it reaches the step
    boundary where it checkpoints; ignoring it, the worker goes on feeding that step, and the training
    process ends its workers when it stops (``close()`` of the loader). SIGKILL still ends it.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_ending_workers = False


def end_workers_at_exit() -> None:
    """In the process that starts workers with :func:`ignore_stop_signals`: at exit, SIGKILL the worker
    processes still alive. multiprocessing ends its daemonic children with SIGTERM and then waits for
    them, which would wait forever for a worker that ignores it (this hook runs first: atexit is LIFO)."""
    global _ending_workers
    if not _ending_workers:
        atexit.register(_kill_daemonic_children)
        _ending_workers = True


def _kill_daemonic_children() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler would raise for each worker killed
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


class StopRequested(Exception):
    """A stop signal arrived; the run checkpointed and should be started again to resume.

    ``signal`` names it (SIGTERM, SIGUSR1, SIGUSR2) as the first rank to receive it saw it.
    """

    def __init__(self, signal_name: str = ""):
        super().__init__(signal_name or "stop signal")
        self.signal = signal_name


class StopSignals:
    """Installs handlers that record the first stop signal; ``received`` is when it came (or None)."""

    def __init__(self) -> None:
        self.received: float | None = None
        self.name = ""
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = time.monotonic()
            self.name = signal.Signals(signum).name

    def install(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
