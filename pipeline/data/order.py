"""Which samples each step reads, and how each is cropped: pure functions of (seed, epoch, sample id; with
repeated augmentation, its copy).

- Order: each epoch is a fresh permutation of the split, cut into global batches; the last
  ``len(split) % global_batch`` samples of the permutation are left out of that epoch, so every rank
  runs the same number of full steps. Rank r of a world of W reads slice r of every global batch.
  A global batch holds the same samples whatever W is, so a run can resume on more or fewer ranks.
- Augmentation: torchvision's random-resized-crop rule (area 0.08-1 of the image, log-uniform aspect
  3/4-4/3, 10 attempts, then the centre-crop fallback) and a horizontal flip, drawn from a counter-based
  generator keyed by (seed, epoch, sample id), in pixels of the index's width and height. No state, no
  stream: the same sample in the same epoch gets the same window in any process, thread or restart.
- The augmentation policy and random erasing (:mod:`pipeline.data.augment`) are drawn the same way, under
  salts of the seed, so turning them on leaves the order and the windows as they were.
- Val: the split in order, cut into ``world`` contiguous chunks; every image counted exactly once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.data.augment import Augmentation, AugmentSpec

ATTEMPTS = 10
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
_DRAWS = 2 * ATTEMPTS + 3  # area and aspect per attempt, then top, left, flip


def train_steps(num_samples: int, global_batch: int) -> int:
    """Full global batches in one epoch."""
    return num_samples // global_batch


def epoch_order(num_samples: int, epoch: int, seed: int, global_batch: int, repeats: int = 1) -> np.ndarray:
    """The sample ids of ``epoch`` in reading order, whole global batches only (int32 or int64).

    With ``repeats`` k > 1 (repeated augmentation), each global batch holds ``global_batch / k`` samples of
    the permutation k times: copy j of them fills the j-th k-th of the batch, in an order of its own, so a
    sample's copies sit at different positions (on different ranks while the per-rank batch is at most
    ``global_batch / k``, as torchvision's RASampler spreads them) with different neighbours to be mixed with,
    and the epoch keeps its number of steps.
    """
    if global_batch % repeats:
        raise ValueError(f"a global batch of {global_batch} does not divide into {repeats} copies")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    steps, unique = train_steps(num_samples, global_batch), global_batch // repeats
    order = torch.randperm(num_samples, generator=generator)[:steps * unique].numpy()
    if repeats > 1:
        blocks = order.reshape(steps, 1, unique)
        shuffles = torch.rand(steps, repeats - 1, unique, generator=generator).argsort(dim=-1).numpy()
        copies = np.take_along_axis(np.broadcast_to(blocks, shuffles.shape), shuffles, axis=-1)
        order = np.concatenate([blocks, copies], axis=1).reshape(-1)
    return order.astype(np.int32) if num_samples < 2**31 else order


def repeat_copies(global_batch: int, repeats: int) -> np.ndarray:
    """Which copy (0 .. repeats - 1) of its sample each position of a global batch holds."""
    if global_batch % repeats:
        raise ValueError(f"a global batch of {global_batch} does not divide into {repeats} copies")
    return np.arange(global_batch) // (global_batch // repeats)


def val_sizes(data_cfg) -> tuple[int, int]:
    """The validation centre crop (``data.val_image_size``, else ``data.image_size``) and the shorter side it is
    resized to first (``data.val_resize``, else 256/224 of the crop, as torchvision's 224/256)."""
    size = data_cfg.val_image_size or data_cfg.image_size
    return size, data_cfg.val_resize or round(size * 256 / 224)


def train_image_size(data_cfg, epoch: int) -> int:
    """The training image size of ``epoch``: ``data.image_size``, or with ``data.progressive`` FFCV's schedule,
    ``min_size`` up to ``start_epoch``, then a linear ramp to ``max_size`` at ``end_epoch``, rounded to a
    multiple of ``step``."""
    ramp = data_cfg.progressive
    if not ramp.enabled:
        return data_cfg.image_size
    size = np.interp(epoch, [ramp.start_epoch, ramp.end_epoch], [ramp.min_size, ramp.max_size])
    return int(round(size / ramp.step)) * ramp.step


def rank_batch(order: np.ndarray, step: int, rank: int, world_size: int, per_rank_batch: int) -> np.ndarray:
    """The sample ids rank ``rank`` reads at ``step`` of the epoch: slice ``rank`` of that global batch."""
    start = (step * world_size + rank) * per_rank_batch
    return order[start:start + per_rank_batch]


def val_range(num_samples: int, rank: int, world_size: int) -> range:
    """This rank's contiguous chunk of the validation split; the chunks cover it exactly once."""
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that scatters nearby counters far apart."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, ids: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniforms in [0, 1) per sample id, shape ``(len(ids), count)``: a hash of (seed, epoch, id, k)."""
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch % 2**64))
        counters = np.asarray(ids, dtype=np.uint64)[:, None] * np.uint64(count) + np.arange(count, dtype=np.uint64)
        bits = _mix(_mix(counters ^ key) + key)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


class Windows(NamedTuple):
    """Per sample: the crop's top-left corner (``x``, ``y``), size (``w``, ``h``) in pixels, and ``flip``."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    h: np.ndarray
    flip: np.ndarray


def crop_windows(seed: int, epoch: int, ids: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> Windows:
    """Random-resized-crop windows and flips of samples ``ids`` (of sizes ``widths`` x ``heights``)."""
    ids = np.asarray(ids)
    width = np.asarray(widths, dtype=np.float64)[:, None]
    height = np.asarray(heights, dtype=np.float64)[:, None]
    u = uniforms(seed, epoch, ids, _DRAWS)
    area = width * height * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[:, :ATTEMPTS])
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, ATTEMPTS:2 * ATTEMPTS])
    w = np.rint(np.sqrt(area * aspect))  # round half to even, as Python's round() in torchvision
    h = np.rint(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(fits, axis=1)
    found = fits[np.arange(len(ids)), first]
    w, h = w[np.arange(len(ids)), first], h[np.arange(len(ids)), first]
    width, height = width[:, 0], height[:, 0]
    y = np.floor(u[:, -3] * (height - h + 1))
    x = np.floor(u[:, -2] * (width - w + 1))
    # the centre crop torchvision falls back on when no attempt fits
    in_ratio = width / np.maximum(height, 1)
    fw = np.where(in_ratio < RATIO[0], width, np.where(in_ratio > RATIO[1], np.rint(height * RATIO[1]), width))
    fh = np.where(in_ratio < RATIO[0], np.rint(width / RATIO[0]), height)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    x = np.where(found, x, (width - fw) // 2)
    y = np.where(found, y, (height - fh) // 2)
    as_int = [a.astype(np.int32) for a in (x, y, w, h)]
    return Windows(*as_int, flip=u[:, -1] < 0.5)


def check_windows(windows: Windows, widths: np.ndarray, heights: np.ndarray) -> None:
    """Every window inside its image: a decoder given one outside may crash instead of raising."""
    x, y, w, h, _ = windows
    inside = (x >= 0) & (y >= 0) & (w > 0) & (h > 0) & (x + w <= widths) & (y + h <= heights)
    if not inside.all():
        bad = int(np.argmin(inside))
        raise ValueError(f"crop window {x[bad]},{y[bad]} {w[bad]}x{h[bad]} outside a {widths[bad]}x{heights[bad]} "
                         "image")


class TrainPlan:
    """One rank's view of the training order: which ids it reads at each step, their windows and their
    augmentation (``augment``; None: crop and flip only), at the epoch's image size (``image_size``, a
    function of the epoch).

    The loader's state is only ``(epoch, step)``, the number of global batches consumed: at any world
    size, step ``s`` of an epoch is the same global batch, with the same crops and ops. With ``repeats``
    copies of each sample in a batch (repeated augmentation), each copy draws its own crop and ops: the
    draws are keyed by ``id * repeats + copy`` (:meth:`keys`) instead of the id.
    """

    def __init__(self, widths: np.ndarray, heights: np.ndarray, seed: int, rank: int, world_size: int,
                 per_rank_batch: int, augment: AugmentSpec | None = None, repeats: int = 1,
                 image_size: Callable[[int], int] | None = None):
        self.widths, self.heights, self.seed, self.augment = widths, heights, seed, augment
        self.rank, self.world_size, self.per_rank_batch = rank, world_size, per_rank_batch
        self.repeats, self._image_size = repeats, image_size
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_rank_batch

    @property
    def steps(self) -> int:
        return train_steps(len(self.widths), self.global_batch)

    def order(self, epoch: int) -> np.ndarray:
        cached = self._cached  # one read: batches of two epochs may be prepared on two threads at once
        if cached is None or cached[0] != epoch:
            cached = (epoch, epoch_order(len(self.widths), epoch, self.seed, self.global_batch, self.repeats))
            self._cached = cached
        return cached[1]

    def image_size(self, epoch: int) -> int:
        """The side of the training images in ``epoch`` (without ``image_size``: the augmentation's)."""
        if self._image_size is not None:
            return self._image_size(epoch)
        if self.augment is None:
            raise ValueError("this TrainPlan was given no image size")
        return self.augment.image_size

    def ids(self, epoch: int, step: int) -> np.ndarray:
        return rank_batch(self.order(epoch), step, self.rank, self.world_size, self.per_rank_batch)

    def keys(self, epoch: int, step: int) -> np.ndarray:
        """What this rank's samples at ``step`` draw their crops and ops from: the id, or with repeated
        augmentation ``id * repeats + copy``."""
        ids = self.ids(epoch, step).astype(np.int64)
        if self.repeats == 1:
            return ids
        start = self.rank * self.per_rank_batch
        return ids * self.repeats + repeat_copies(self.global_batch, self.repeats)[start:start + len(ids)]

    def windows(self, epoch: int, ids: np.ndarray, keys: np.ndarray | None = None) -> Windows:
        """The crop windows and flips of samples ``ids``, drawn by their ``keys`` (default: the ids)."""
        widths, heights = self.widths[ids], self.heights[ids]
        windows = crop_windows(self.seed, epoch, ids if keys is None else keys, widths, heights)
        check_windows(windows, widths, heights)
        return windows

    def augmentation(self, epoch: int, keys: np.ndarray) -> Augmentation | None:
        """The policy's ops and the erase boxes drawn by ``keys`` in ``epoch``, at the epoch's image size;
        None without augmentation."""
        if self.augment is None:
            return None
        from pipeline.data.augment import check_augmentation, draw

        spec = dataclasses.replace(self.augment, image_size=self.image_size(epoch))
        augmentation = draw(spec, self.seed, epoch, keys)
        check_augmentation(augmentation, spec.image_size)
        return augmentation
