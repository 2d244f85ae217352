"""The dataset index every rank agrees on, and a rank's train and val loaders for ``data.backend``."""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from pipeline import collective
from pipeline.data.augment import augment_spec
from pipeline.data.index import REPORT_NAME, DatasetIndex, has_index, index_tree, load_exclusions, load_index
from pipeline.data.layout import DatasetError
from pipeline.data.order import TrainPlan, train_image_size, train_steps, val_range
from pipeline.data.samples import SampleBytes, check_shards
from pipeline.data.synthetic import RandomBatches
from pipeline.data.views import Views
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


def _index_tree_once(root: Path, num_classes: int) -> DatasetIndex:
    log.warning("Dataset %s has no index: rank 0 indexes it now (one header read per file) and shares it with "
                "the other ranks. Run `python -m pipeline.data.imagenet verify %s` once: it decodes every file, "
                "leaves out the damaged ones and writes the index that later runs read at once.", root, root)
    exclude = load_exclusions(root)
    if exclude:
        log.warning("Leaving out %d undecodable files listed in %s", len(exclude), root / REPORT_NAME)
    return index_tree(root, num_classes, exclude=exclude)


def _describe(index: DatasetIndex, root: Path) -> None:
    counts = {s: len(ix) for s, ix in index.splits.items()}
    where = f"{len(index.shards)} shards" if index.packed else "a folder tree"
    log.info("Dataset %s: index %s, %d train and %d val samples in %d classes, in %s", root, index.hash[:16],
             counts["train"], counts["val"], len(index.classes), where)
    if not index.verified:
        fix = (f"Run `python -m pipeline.data.imagenet verify {root}` once to find such files." if not index.packed
               else "Pack it from a tree that `python -m pipeline.data.imagenet verify` has checked.")
        log.warning("Dataset %s is indexed but unverified: a damaged file would stop training when it is reached. "
                    "%s", root, fix)
    left_out = load_exclusions(root)
    if left_out:
        log.info("Leaving out %d undecodable files listed in %s", len(left_out), root / REPORT_NAME)


def dataset_index(cfg: DictConfig, dist: DistInfo) -> DatasetIndex:
    """The index at ``data.root`` (built by rank 0 alone for a tree without one), the same on every rank.

    Every rank checks its index hash against rank 0's, and a packed dataset's shards (every size; each
    shard's checksum by one rank of the job, or of each node: ``data.check_shards``), before any step; a
    problem on any rank stops every rank with a message.
    """
    root = Path(cfg.data.root).absolute()
    here = socket.gethostname()
    index, problem = None, None
    if collective.broadcast_from_main(has_index(root)):  # rank 0's answer decides for every rank
        try:
            index = load_index(root)
        except Exception as err:  # any error: the other ranks go on to the agreement below
            problem = f"rank {dist.rank} on {here}: {err}" if dist.world_size > 1 else str(err)
        collective.first_problem_stops_all(problem, DatasetError)
        if dist.is_main:
            _describe(index, root)
    else:
        index = collective.decide_on_main(functools.partial(_index_tree_once, root, cfg.model.num_classes),
                                          DatasetError, dist.is_main)
    seen = collective.gather_to_main((index.hash, here, dist.rank))
    verdict, hosts = None, None
    if dist.is_main:
        other = [(h, host, r) for h, host, r in seen if h != index.hash]
        if other:
            verdict = (f"The ranks read different datasets at data.root='{root}': rank 0 has index {index.hash[:16]}, "
                       + ", ".join(f"rank {r} on {host} has {h[:16]}" for h, host, r in other[:8])
                       + ". Every node must see the same dataset: copy the same index/ (and shards) to each node, "
                       "or point data.root at one shared copy.")
        elif len(index.classes) != cfg.model.num_classes:
            verdict = (f"model.num_classes={cfg.model.num_classes} but the dataset at data.root='{root}' has "
                       f"{len(index.classes)} classes. Set model.num_classes={len(index.classes)}, or point "
                       "data.root at the intended dataset.")
        hosts = [host for _, host, _ in seen]
    verdict, hosts = collective.broadcast_from_main((verdict, hosts))
    if verdict:
        raise collective.on_every_rank(DatasetError(verdict))
    if index.packed:
        # which ranks share the reading of the checksums: all of the job's (one shared copy), or each node's own
        if cfg.data.check_shards == "node":
            mine = [r for r, host in enumerate(hosts) if host == here]
            part, parts = mine.index(dist.rank), len(mine)
        else:
            part, parts = dist.rank, dist.world_size
        problems = check_shards(root, index, part, parts, checksums=cfg.data.check_shards != "size",
                                per_node=cfg.data.check_shards == "node")
        where = f" on {here}" if dist.world_size > 1 else ""
        collective.first_problem_stops_all(
            f"The packed dataset at data.root='{root}' is damaged{where}: {'; '.join(problems[:8])}. Copy the named "
            "shards again from the original, or pack the dataset again with `python -m pipeline.data.imagenet pack`."
            if problems else None, DatasetError)
    return index


def build_loaders(cfg: DictConfig, dist: DistInfo, batch_size: int, index: DatasetIndex | None = None, *,
                  train: bool = True, reader: Callable[..., SampleBytes] = SampleBytes, views: Views | None = None):
    """This rank's (train, val) loaders; ``batch_size`` is the per-rank batch. ``train=False``: train is None.

    ``index`` defaults to :func:`dataset_index`; the synthetic backend needs none. ``reader``: what reads the
    samples' bytes, called as ``reader(root, index, split)`` (``bench feed`` gives one whose reads wait like a
    network filesystem's). ``views``: the val loader yields each image's views instead of its centre crop
    (:mod:`pipeline.data.views`), ``views.count`` images per sample, sample by sample.
    """
    backend = resolve_backend(cfg.data.backend)
    if cfg.data.backend == "dali":  # a node without DALI must not decode differently from the rest
        found = collective.gather_to_main((backend, socket.gethostname()))
        lacking = sorted({host for b, host in found if b != "dali"}) if found else []
        verdict = None
        if lacking and len(lacking) < len({host for _, host in found}):
            verdict = (f"NVIDIA DALI cannot be imported on {', '.join(lacking[:8])}, but can on the other nodes "
                       "(data.backend=dali): install nvidia-dali-cuda130 there (or -cuda120 for CUDA 12), or set "
                       "data.backend=torchvision for the whole run.")
        collective.main_decides(verdict, DatasetError)
    val_batch = cfg.data.val_batch_size or batch_size
    if backend == "synthetic":
        make = functools.partial(RandomBatches, image_size=cfg.data.image_size, num_classes=cfg.model.num_classes,
                                 device=dist.device, channels_last=cfg.train.channels_last)
        return (make(batch_size, steps=cfg.data.synthetic_steps, seed=cfg.run.seed),
                make(val_batch, steps=max(1, cfg.data.synthetic_steps // 10), seed=cfg.run.seed + 1))
    index = index or dataset_index(cfg, dist)
    root = Path(cfg.data.root).absolute()
    train_split, val_split = index.splits["train"], index.splits["val"]
    plan = None
    if train:
        global_batch = batch_size * dist.world_size
        if train_steps(len(train_split), global_batch) == 0:
            raise collective.on_every_rank(DatasetError(
                f"'{root}' holds {len(train_split)} usable training images, fewer than one global batch "
                f"(train.batch_size={global_batch}). Lower train.batch_size."))
        plan = TrainPlan(train_split.width, train_split.height, cfg.run.seed, dist.rank, dist.world_size, batch_size,
                         augment_spec(cfg.data), cfg.data.aug_repeats, functools.partial(train_image_size, cfg.data))
    readers = reader(root, index, "train"), reader(root, index, "val")
    val_ids = val_range(len(val_split), dist.rank, dist.world_size)
    if backend == "dali":
        from pipeline.data.dali import build_dali_loaders

        return build_dali_loaders(cfg.data, plan, *readers, val_ids, val_batch, dist.device,
                                  cfg.train.channels_last, views=views)
    from pipeline.data.folder import build_folder_loaders

    return build_folder_loaders(cfg.data, plan, *readers, val_ids, val_batch, dist.device, cfg.train.channels_last,
                                views)
