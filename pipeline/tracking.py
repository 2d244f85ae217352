"""Where a run's numbers go: ``metrics.jsonl`` in the run directory, written by rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsFile:
    """Appends one JSON object per event (``train``, ``val``, ...) to ``run.dir/metrics.jsonl``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most one line

    def log(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")

    def close(self) -> None:
        self._file.close()
