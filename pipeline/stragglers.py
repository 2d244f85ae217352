"""Which rank holds the job back: each rank's own time per step, the slowest rank named, a warning when one
stays slow.

In synchronous DDP every rank's wall time per step is the same: the fast ranks wait in the gradient
all-reduce for the slowest. A straggler shows in what is its OWN: the time it waits for its data (a slow
mount, a starved loader) and the time of its forward pass, which holds no collective (DDP is built with
``broadcast_buffers=False``). Own time per step = data wait + forward. With ``model.sync_bn`` the forward
waits for every rank at each SyncBatchNorm, so it is no rank's own: the own time is then the data wait alone.

Each rank's figures travel in the step boundary's reduction of a log step (:mod:`pipeline.boundary`), so no
collective is added: every rank knows every rank's figures one step later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

NOISE_FLOOR_MS = 1.0  # below a millisecond per step, timer and scheduler jitter outweigh any difference


class ForwardTimer:
    """Times every forward of ``net`` (hooks around its call): CUDA events read at the log line, whose host sync
    has completed them, so no sync is added; on a CPU, the host clock."""

    def __init__(self, net: nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pairs: list[tuple] = []  # (start, end) events of the window's forwards (CUDA)
        self._spare: list[tuple] = []
        self._began = 0.0
        self._seconds = 0.0
        self._handles = [net.register_forward_pre_hook(self._start), net.register_forward_hook(self._end)]

    def _start(self, module, args) -> None:
        if self.cuda:
            pair = self._spare.pop() if self._spare else (torch.cuda.Event(enable_timing=True),
                                                          torch.cuda.Event(enable_timing=True))
            pair[0].record()
            self._pairs.append(pair)
        else:
            self._began = time.perf_counter()

    def _end(self, module, args, output) -> None:
        if self.cuda:
            self._pairs[-1][1].record()
        else:
            self._seconds += time.perf_counter() - self._began

    def take(self) -> float:
        """Seconds spent in forwards since the last call (on CUDA: call after a host sync of the stream)."""
        if self.cuda:
            self._seconds = sum(start.elapsed_time(end) for start, end in self._pairs) / 1e3
            self._spare.extend(self._pairs)
            self._pairs.clear()
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass(frozen=True)
class RankFigures:
    """Every rank's own time and data wait per step (ms) over one log window, in rank order."""

    own_ms: np.ndarray
    wait_ms: np.ndarray

    @property
    def slowest(self) -> int:
        return int(np.argmax(self.own_ms))

    @property
    def own_median(self) -> float:
        return float(np.median(self.own_ms))

    @property
    def wait_median(self) -> float:
        return float(np.median(self.wait_ms))

    def metrics(self) -> dict[str, float]:
        """The figures as ``train/`` metrics: the slowest rank's own time, the largest data wait, the medians."""
        slowest = self.slowest
        return {"step_ms_max": float(self.own_ms[slowest]), "step_ms_median": self.own_median,
                "data_wait_ms_max": float(self.wait_ms.max()), "data_wait_ms_median": self.wait_median,
                "slowest_rank": slowest}

    def slow_ranks(self, above: float) -> np.ndarray:
        """The ranks whose own time is more than ``above`` (0.2: 20%) over the median (at least 1 ms)."""
        return np.flatnonzero(self.own_ms > (1 + above) * max(self.own_median, NOISE_FLOOR_MS))


class StragglerWatch:
    """Counts, per rank, the log windows in a row in which its own time is more than ``above`` over the median;
    warns when a rank's count reaches ``intervals``, and again each time that count doubles while it lasts."""

    def __init__(self, world_size: int, above: float, intervals: int):
        self.above, self.intervals = above, intervals
        self.streak = np.zeros(world_size, dtype=np.int64)

    def update(self, figures: RankFigures, hosts: list[str] | None) -> list[str]:
        """The warnings of this window (none, usually)."""
        if not self.intervals:
            return []
        slow = np.zeros_like(self.streak, dtype=bool)
        slow[figures.slow_ranks(self.above)] = True
        self.streak = np.where(slow, self.streak + 1, 0)
        warnings = []
        for rank in np.flatnonzero(slow):
            count = int(self.streak[rank])
            if count >= self.intervals and count % self.intervals == 0 and (count // self.intervals) & (
                    count // self.intervals - 1) == 0:  # at 1, 2, 4, 8 ... times the stretch
                host = hosts[rank] if hosts else "?"
                warnings.append(
                    f"Rank {rank} on {host} is a straggler: its own time per step (data wait + forward) has been "
                    f"more than {100 * self.above:.0f}% above the median for {count} log intervals in a row "
                    f"({figures.own_ms[rank]:.1f} ms against {figures.own_median:.1f} ms; data wait "
                    f"{figures.wait_ms[rank]:.1f} ms against {figures.wait_median:.1f} ms). Every rank waits for "
                    f"it at each step: look at {host}'s load, its data mount and its device.")
        return warnings
