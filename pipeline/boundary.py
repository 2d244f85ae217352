"""The rules at a step boundary: stop signals, checkpoint cadence and a finite loss, decided alike on every rank.

Every rank must act at the same step: a rank that checkpoints or stops alone leaves the others waiting in a
collective. The ranks agree through one small all-reduce (MAX) of their flags, and no step waits for it: the
reduction of step s is started at step s and read at step s + 1, so it has a whole step of compute to travel.

Why this is safe: every rank starts exactly one reduction per step, at the same step, on the same process
group, and waits for it at the next step before starting the next one; so every rank reads the same result at
the same step, and the collectives of the group stay in the same order on every rank. The rule that keeps it
so: nothing else is sent on the group while a reduction is in flight. Every path that sends something else
reads the one in flight first: a checkpoint (:meth:`StepBoundary.before_save`, before its gather of the
random states), a divergence stop (:meth:`StepBoundary.stop_diverged`, before it gathers the reason), and
the end of an epoch. A stop signal that arrives during step s is in step s's flags and is acted on at step
s + 1: the stop checkpoint holds at most 2 steps more than the signal's. At an epoch's last step the
reduction is read at once (one blocking round trip per epoch), so an epoch never ends with a decision in
flight, and validation's collectives never meet one.

The loss is checked without a host sync: its value (and, fp16, whether the grad scaler skipped the step: the
unscaled gradients' norm is not finite, see :func:`pipeline.engine.train_step`) is copied to pinned host memory
without blocking and read one step later, when the GPU has long finished that step. (A norm can also overflow
float32 with every gradient finite, above about 1.8e19: such a step counts as skipped though it was applied.)
The loss of step s is so checked at step s + 1 and travels in that step's flags: every rank stops at step s + 2
at the latest. A non-finite loss, or (fp16)
more than ``max_skipped`` steps in a row skipped by the grad scaler, stops every rank with
:class:`NonFiniteLoss`; before any checkpoint the loss of the current step and the weights are checked
(blocking, once per checkpoint), so no checkpoint of a step after the bad one is ever written.

At a log step the reduction carries more: a slot pair per rank, which each rank fills at its own index with its
own time and data wait per step (int32 microseconds; the other slots 0, so MAX gathers them all). The same
steps are log steps on every rank, so every rank sends a buffer of the same length; other steps send the three
flags alone. Every rank then holds every rank's figures (:meth:`StepBoundary.take_figures`) when it reads that
reduction, one step later.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline import collective
from pipeline.stragglers import RankFigures

NONFINITE_EXIT_CODE = 3  # neither 0 (done) nor 75 (stopped to resume): the run diverged, do not restart it


class NonFiniteLoss(RuntimeError):
    """The loss (or the weights) stopped being finite; the run stopped without checkpointing it."""


@dataclass(frozen=True)
class Decision:
    """What every rank does at this step boundary."""
    stop: bool = False  # a stop signal reached some rank: checkpoint and stop
    save: bool = False  # checkpoint now (checkpoint.every_steps, or every_minutes on some rank)


class LossWatch:
    """A step's loss (and, fp16, whether the grad scaler skipped it), read one step later without waiting for
    the device (on a CPU, at once)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        # two slots in turn of (loss, skipped), pinned: a copy into them does not wait for the device
        self._slots = [torch.zeros(2, dtype=torch.float32, pin_memory=self.cuda) for _ in range(2)]
        self._events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self._step: list[int | None] = [None, None]
        self._skip_known = [False, False]
        self._next = 0

    def record(self, step: int, loss: torch.Tensor,
               skipped: torch.Tensor | None = None) -> list[tuple[int, float, bool | None]]:
        """Keep step ``step``'s loss and skip flag; return what the previous step kept (read now)."""
        previous = self.read(1 - self._next)
        slot = self._next
        values = loss.detach().float().reshape(1) if skipped is None else \
            torch.stack([loss.detach().float(), skipped.float()])
        if self.cuda:
            self._slots[slot][:values.numel()].copy_(values, non_blocking=True)
            self._events[slot].record()
        else:
            self._slots[slot] = values  # already on the host
        self._step[slot], self._skip_known[slot] = step, skipped is not None
        self._next = 1 - slot
        return previous

    def read(self, slot: int) -> list[tuple[int, float, bool | None]]:
        """``[(step, loss, skipped or None)]`` of what ``slot`` keeps (``[]`` if nothing), and frees it."""
        if self._step[slot] is None:
            return []
        if self.cuda:
            self._events[slot].synchronize()  # that step finished long ago: no wait in steady state
        values = self._slots[slot].tolist()
        step, self._step[slot] = self._step[slot], None
        return [(step, values[0], bool(values[1]) if self._skip_known[slot] else None)]

    def read_all(self) -> list[tuple[int, float, bool | None]]:
        """Everything kept so far, now (a host sync), in step order."""
        return self.read(1 - self._next) + self.read(self._next)


class StepBoundary:
    """Decides, after each training step, whether every rank checkpoints, stops, or stops because the run
    diverged. ``blocking=True`` agrees within the step (one blocking round trip per step: the old design, kept
    as the baseline of ``bench boundary``)."""

    def __init__(self, signals, device: torch.device, every_steps: int = 0, every_minutes: float = 0.0,
                 max_skipped: int = 0, blocking: bool = False, clock: Callable[[], float] = time.monotonic):
        self.signals = signals
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.max_skipped = max_skipped
        self.blocking = blocking
        self.clock = clock
        self.loss = LossWatch(device)
        self.last_save = clock()
        self.skipped_in_a_row = 0
        self.problem: str | None = None  # this rank's reason to stop for divergence, once it has one
        self._pending: tuple[object, np.ndarray] | None = None
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # two flag buffers in turn (one may be in flight), written through numpy: no tensor made per step; the
        # longer ones carry every rank's figures at log steps
        self._buffers = [np.zeros(3, dtype=np.int32) for _ in range(2)]
        self._long = [np.zeros(3 + 2 * self.world_size, dtype=np.int32) for _ in range(2)]
        self._tensors = {id(b): torch.from_numpy(b) for b in (*self._buffers, *self._long)}
        self._turn = 0
        self.figures: list[RankFigures] = []  # every rank's, of each log step whose reduction was read, in order
        self.waited = 0.0  # seconds the last step boundary waited for the ranks' decision

    # ---------------------------------------------------------------- the flags of one rank

    def _flags(self, step: int, loss: torch.Tensor | None, skipped: torch.Tensor | None, now: bool) -> list[int]:
        if loss is not None:
            self._check(self.loss.record(step, loss, skipped))
        if now:
            self._check(self.loss.read_all())
        timed = self.every_minutes > 0 and self.clock() - self.last_save >= 60 * self.every_minutes
        return [int(self.signals.received is not None), int(timed), int(self.problem is not None)]

    def _check(self, seen: list[tuple[int, float, bool | None]]) -> None:
        """This rank's reason to stop, from the steps' losses and skips read now (in step order)."""
        for step, value, skipped in seen:
            if not math.isfinite(value) and self.problem is None:
                self.problem = f"the loss at step {step} is {value}"
            if skipped is None:
                continue
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
            if self.max_skipped and self.skipped_in_a_row > self.max_skipped and self.problem is None:
                self.problem = (f"the fp16 grad scaler skipped {self.skipped_in_a_row} steps in a row up to step "
                                f"{step} (more than train.max_skipped_steps={self.max_skipped}): every gradient "
                                "overflows")

    # ---------------------------------------------------------------- agreeing

    def _start(self, flags: list[int], figures: tuple[float, float] | None = None) -> None:
        buffer = (self._buffers if figures is None else self._long)[self._turn]
        self._turn = 1 - self._turn
        buffer[:3] = flags
        if figures is not None:
            buffer[3:] = 0
            buffer[3 + 2 * self.rank:5 + 2 * self.rank] = np.clip(np.round(np.multiply(figures, 1e6)), 0,
                                                                  np.iinfo(np.int32).max)
        work = dist.all_reduce(self._tensors[id(buffer)], op=dist.ReduceOp.MAX, group=collective.control_group(),
                               async_op=True) if dist.is_initialized() else None
        self._pending = (work, buffer)

    def _read(self) -> list[int]:
        if self._pending is None:
            return [0, 0, 0]
        work, buffer = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        if len(buffer) > 3:
            per_rank = buffer[3:].reshape(self.world_size, 2) / 1e3
            self.figures.append(RankFigures(own_ms=per_rank[:, 0], wait_ms=per_rank[:, 1]))
        return buffer[:3].tolist()

    def take_figures(self) -> list[RankFigures]:
        """Every rank's figures of each log step whose reduction was read since the last call, in step order."""
        figures, self.figures = self.figures, []
        return figures

    def after_step(self, step: int, loss: torch.Tensor | None = None, skipped: torch.Tensor | None = None,
                   last_in_epoch: bool = False, figures: tuple[float, float] | None = None) -> Decision:
        """The decision at the boundary after step ``step`` (``skipped``: fp16, whether the grad scaler skipped
        it, a device flag read with the loss). ``figures``: this rank's own time and data wait per step (seconds)
        over the log window that ends at this step; given at log steps only, the same steps on every rank."""
        now = self.blocking or last_in_epoch
        flags = self._flags(step, loss, skipped, now)
        began = time.perf_counter()
        if now:  # the one in flight and this step's, agreed within the step: a round trip waited for
            earlier = self._read()
            self._start([max(a, b) for a, b in zip(earlier, flags, strict=True)], figures)
            stop, timed, diverged = self._read()
            self.waited = time.perf_counter() - began
        else:  # the previous step's, started a step ago (only its end is waited for); this step's goes out
            stop, timed, diverged = self._read()
            self.waited = time.perf_counter() - began
            self._start(flags, figures)
        if diverged:
            self.stop_diverged()
        every = bool(self.every_steps) and step % self.every_steps == 0
        return Decision(stop=bool(stop), save=bool(timed) or every)

    # ---------------------------------------------------------------- checkpoints and divergence

    def before_save(self, step: int, weights_finite: Callable[[], bool]) -> bool:
        """Called by every rank before a checkpoint: read what is in flight and check the latest loss and the
        weights (blocking, once per checkpoint); a non-finite one stops every rank before anything is written.
        Returns whether a stop signal reached some rank, in flight or now (this checkpoint is then the stop's:
        the caller stops after it)."""
        stop, _, diverged = self._read()
        stop = max(stop, int(self.signals.received is not None))
        if self.problem is None:
            self._check(self.loss.read_all())
            if self.problem is None and not weights_finite():
                self.problem = f"the weights after step {step} hold non-finite values"
        self._start([stop, 0, int(diverged or self.problem is not None)])
        stop, _, diverged = self._read()
        if diverged:
            self.stop_diverged()
        return bool(stop)

    def saved(self) -> None:
        self.last_save = self.clock()

    def stop_diverged(self) -> None:
        """Every rank raises :class:`NonFiniteLoss`, with the first rank's reason (the reduction in flight is
        read first: the gather of the reason must not meet it on the group)."""
        self._read()
        reason = collective.first_problem(self.problem)
        raise collective.on_every_rank(NonFiniteLoss(
            f"Stopped: {reason or 'another rank saw a non-finite loss'}. No checkpoint of it was written; the "
            "newest checkpoint is the last finite one. Lower optim.lr, lengthen schedule.warmup_epochs, or use "
            "train.precision=bf16 (fp16 overflows sooner), then resume or start again."))
