"""Logging with a rank-aware prefix: every line says which rank wrote it."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int, world_size: int) -> None:
    """Rank 0 logs at INFO; other ranks log warnings only, so a 512-rank job stays readable."""
    prefix = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def add_log_file(path) -> None:
    """Also write this process's log lines to ``path`` (the run's ``train.log``), appending."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.getLogger().handlers[0].formatter)
    logging.getLogger().addHandler(handler)
