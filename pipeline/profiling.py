"""Profiles on demand: ``torch.profiler`` over a window of global steps, written to ``run.dir/profile/``.

Each rank writes ``rank-N.trace.json`` (a Chrome trace: open it at https://ui.perfetto.dev or chrome://tracing),
``rank-N.ops.txt`` (the operators with the most self time) and, on CUDA, ``rank-N.memory.pickle`` (a memory
snapshot for https://pytorch.org/memory_viz). Outside the window no profiler exists: the training steps pay one
comparison of integers each. The window is the global steps ``profile.start_step`` to ``start_step + steps - 1``;
it begins only when the step about to run is its first (a resume past it records nothing) and ends early with
the epoch (or the run).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from pipeline.checkpoint import atomic_write_bytes

log = logging.getLogger("pipeline.train")

TOP_OPERATORS = 40  # rows of the operators' table
MEMORY_EVENTS = 100_000  # allocations and frees the CUDA memory history keeps (PyTorch's documented example)


class StepProfiler:
    """The profiler of one rank over ``profile_cfg``'s window of global steps."""

    def __init__(self, profile_cfg, run_dir: Path, rank: int, device: torch.device):
        self.first = profile_cfg.start_step
        self.last = profile_cfg.start_step + profile_cfg.steps - 1
        self.folder, self.rank, self.device = Path(run_dir) / "profile", rank, device
        self._profiler = None  # made at the window's start, dropped at its end
        self._until = 0  # the last step recorded

    def before_step(self, step: int) -> None:
        """Start recording if global step ``step`` (about to run) is the window's first."""
        if self.first and step == self.first and self._profiler is None:
            self._start()

    def after_step(self, step: int) -> list[Path]:
        """Mark the end of global step ``step``; at the window's last, stop and write (the files written)."""
        if self._profiler is None:
            return []
        self._profiler.step()
        self._until = step
        return self.finish() if step >= self.last else []

    def finish(self) -> list[Path]:
        """Stop recording (if it is) and write this rank's files; returns them. A profile never stops a run: one
        that cannot be written (a full disk) is a warning."""
        if self._profiler is None:
            return []
        profiler, self._profiler = self._profiler, None
        cuda = self.device.type == "cuda"
        written: list[Path] = []
        try:  # also while a stop or an error unwinds: nothing here may replace that exception
            profiler.stop()
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"rank-{self.rank}"
            trace = self.folder / f"{name}.trace.json"
            _write_whole(trace, lambda tmp: profiler.export_chrome_trace(str(tmp)))
            table = profiler.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                                  row_limit=TOP_OPERATORS)
            ops = self.folder / f"{name}.ops.txt"
            atomic_write_bytes(ops, table.encode())
            written += [trace, ops]
            if cuda:
                snapshot = self.folder / f"{name}.memory.pickle"
                _write_whole(snapshot, lambda tmp: torch.cuda.memory._dump_snapshot(str(tmp)))
                written.append(snapshot)
            log.info("Profiled global steps %d-%d: %s", self.first, self._until, ", ".join(map(str, written)))
        except Exception as err:  # noqa: BLE001 - a profile is not worth a run
            log.warning("Could not write the profile of global steps %d-%d into %s (%s); training goes on.",
                        self.first, self._until, self.folder, err)
        finally:
            if cuda:
                try:
                    torch.cuda.memory._record_memory_history(enabled=None)
                except Exception as err:  # noqa: BLE001 - the history only costs memory if it stays on
                    log.warning("Could not stop recording the CUDA memory history (%s).", err)
        return written

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_EVENTS)
        self._profiler = profile(activities=activities, record_shapes=True)
        self._profiler.start()


def _write_whole(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``: a reader (rank 0, uploading) sees whole files only."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
