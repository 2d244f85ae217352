"""Builds a rank's train and val loaders for ``data.backend``: dali, torchvision or synthetic."""

from __future__ import annotations

import functools
import logging

from omegaconf import DictConfig

from pipeline.data.files import FileList, load_exclusions, scan_split, train_indices, train_steps, val_indices
from pipeline.data.layout import DatasetError, check_image_folder
from pipeline.data.synthetic import RandomBatches
from pipeline.distributed import DistInfo

log = logging.getLogger(__name__)


def resolve_backend(backend: str) -> str:
    """``dali`` unless DALI cannot be imported, then ``torchvision`` with a warning."""
    if backend != "dali":
        return backend
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        log.warning("NVIDIA DALI could not be imported (%s): using data.backend=torchvision instead. Install "
                    "nvidia-dali-cuda130 (or -cuda120 for CUDA 12) for the faster DALI loader.", err)
        return "torchvision"
    return backend


def build_loaders(cfg: DictConfig, dist: DistInfo, batch_size: int, *, train: bool = True):
    """This rank's (train, val) loaders; ``batch_size`` is the per-rank batch. ``train=False`` skips train."""
    backend = resolve_backend(cfg.data.backend)
    val_batch = cfg.data.val_batch_size or batch_size
    if backend == "synthetic":
        make = functools.partial(RandomBatches, image_size=cfg.data.image_size, num_classes=cfg.model.num_classes,
                                 device=dist.device, channels_last=cfg.train.channels_last)
        return (make(batch_size, steps=cfg.data.synthetic_steps, seed=cfg.run.seed),
                make(val_batch, steps=max(1, cfg.data.synthetic_steps // 10), seed=cfg.run.seed + 1))

    classes = check_image_folder(cfg.data.root, cfg.model.num_classes)
    exclude = load_exclusions(cfg.data.root, warn=dist.is_main)
    val_all = scan_split(f"{cfg.data.root}/val", classes, exclude)
    val_files = val_all.take(val_indices(len(val_all), dist.rank, dist.world_size))
    all_train = scan_split(f"{cfg.data.root}/train", classes, exclude) if train else FileList([], [])
    if train and train_steps(len(all_train), dist.world_size, batch_size) == 0:
        raise DatasetError(f"'{cfg.data.root}/train' holds {len(all_train)} usable images, fewer than one global "
                           f"batch (train.batch_size={batch_size * dist.world_size}). Lower train.batch_size.")

    @functools.lru_cache(maxsize=2)
    def indices_for(epoch: int) -> list[int]:
        return train_indices(len(all_train), epoch, cfg.run.seed, dist.rank, dist.world_size, batch_size)

    @functools.lru_cache(maxsize=2)
    def train_files_for(epoch: int) -> FileList:
        return all_train.take(indices_for(epoch))

    seed = cfg.run.seed * 4096 + dist.rank  # each rank draws its own augmentations
    if backend == "dali":
        from pipeline.data.dali import build_dali_loaders

        return build_dali_loaders(cfg.data, train_files_for, val_files, batch_size, val_batch, dist.local_rank,
                                  dist.device, cfg.train.channels_last, seed)
    from pipeline.data.folder import build_folder_loaders

    return build_folder_loaders(cfg.data, all_train, indices_for, val_files, batch_size, val_batch, dist.device,
                                cfg.train.channels_last, seed)
