"""Stop signals (SIGTERM, SIGUSR1, SIGUSR2): the handler only notes the time; the loop acts on it."""

from __future__ import annotations

import logging
import signal
import time

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def default_signal_handlers(*_) -> None:
    """For a forked worker process (a pool's or a DataLoader's initializer).

    The parent's handlers only take notes, so a worker that inherited them would outlive SIGTERM and
    hang its pool's shutdown or a scheduler's kill; with the defaults back, it dies of the signal.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


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
