"""Where a run's numbers go: ``metrics.jsonl`` in the run directory, written by rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.checkpoint import atomic_write_bytes


class MetricsFile:
    """Appends one JSON object per event (``train``, ``val``, ...) to ``run.dir/metrics.jsonl``.

    ``keep`` lines of an earlier attempt are kept and the rest dropped, so a run resumed from a
    checkpoint that was saved after ``keep`` lines logs each step exactly once.
    """

    def __init__(self, path: str | Path, keep: int = 0):
        self.path = Path(path)
        kept = self.path.read_text().splitlines(keepends=True)[:keep] if self.path.exists() else []
        atomic_write_bytes(self.path, "".join(kept).encode())
        self.lines = len(kept)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most one line

    def log(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
        self.lines += 1

    def close(self) -> None:
        self._file.close()
