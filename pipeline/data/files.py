"""The list of samples of a split, and which of them each rank reads in each epoch.

Both loaders (DALI and torchvision) read from an explicit file list built here, so the
order and the sharding are the same for both and derive from (seed, epoch) alone:

- train: each epoch is a fresh permutation of the whole split, cut into global batches of
  ``world * per_rank_batch``; rank r reads slice r of every global batch. The last
  ``len(split) % global_batch`` samples of the permutation (fewer than one global batch) are
  left out of that epoch, so every rank runs the same number of full steps; a new permutation
  each epoch leaves out different ones.
- val: the split in order, cut into ``world`` contiguous chunks; every image counted exactly once.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.data.layout import IMAGE_EXTENSIONS

REPORT_NAME = "verify.json"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileList:
    """Absolute paths and their class indices, in a fixed (sorted) order."""

    paths: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, indices: list[int]) -> FileList:
        return FileList([self.paths[i] for i in indices], [self.labels[i] for i in indices])


def scan_split(split_dir: str | Path, classes: list[str], exclude: frozenset[str] = frozenset()) -> FileList:
    """Every image under ``split_dir/<class>/``, sorted, less the paths in ``exclude``."""
    split_dir = Path(split_dir).absolute()
    paths, labels = [], []
    for label, name in enumerate(classes):
        with os.scandir(split_dir / name) as entries:
            names = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        for file_name in names:
            path = str(split_dir / name / file_name)
            if path not in exclude:
                paths.append(path)
                labels.append(label)
    return FileList(paths, labels)


def load_exclusions(root: str | Path, warn: bool = True) -> frozenset[str]:
    """Absolute paths of the files that ``verify`` found undecodable; warns when there is no report."""
    root = Path(root).absolute()
    report = root / REPORT_NAME
    if not report.is_file():
        if warn:
            log.warning("Dataset %s is unverified: a damaged file would stop training when it is reached. "
                        "Run `python -m pipeline.data.imagenet verify %s` once to find such files.", root, root)
        return frozenset()
    bad = json.loads(report.read_text()).get("undecodable", [])
    if bad and warn:
        log.warning("Leaving out %d undecodable files listed in %s", len(bad), report)
    return frozenset(str(root / rel) for rel in bad)


def train_steps(num_samples: int, world_size: int, per_rank_batch: int) -> int:
    """Full global batches in one epoch."""
    return num_samples // (world_size * per_rank_batch)


def train_indices(num_samples: int, epoch: int, seed: int, rank: int, world_size: int,
                  per_rank_batch: int) -> list[int]:
    """This rank's sample indices for ``epoch``, in the order it reads them."""
    steps = train_steps(num_samples, world_size, per_rank_batch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator)[: steps * world_size * per_rank_batch]
    return order.view(steps, world_size, per_rank_batch)[:, rank].reshape(-1).tolist()


def val_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """This rank's contiguous chunk of the validation split; the chunks cover it exactly once."""
    start = num_samples * rank // world_size
    return list(range(start, num_samples * (rank + 1) // world_size))
