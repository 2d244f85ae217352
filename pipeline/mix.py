"""Mixup and CutMix with soft targets, as timm's ``Mixup`` (modes batch, pair, elem) with torchvision's rules.

Each mixing decision, lambda and box is drawn from the counter-based generator of :mod:`pipeline.data.order`,
keyed by (seed, epoch, step, position in the global batch): nothing depends on the world size, a rank's share
or a restart. Position ``p`` of the global batch is mixed with ``p ^ 1`` (its neighbour in the pair (2k,
2k + 1)); with an even per-rank batch both are always on the same rank, so the mixed global batch is the same
at any world size. The mode says who shares a draw: the whole global batch (``batch``), a pair (``pair``: both
images of a pair mixed with one lambda), or each image alone (``elem``).

Mixup (Zhang et al. 2018): ``lam * x + (1 - lam) * partner``, lam ~ Beta(alpha, alpha). CutMix (Yun et al.
2019): the partner's pixels in a box of area ``1 - lam`` centred at a uniform pixel and clipped to the image,
the target's lambda corrected to the box's real area; the box follows torchvision's ``v2.CutMix``. With both
on, ``switch_prob`` picks CutMix. Targets are mixed one-hot vectors; the loss applies label smoothing to them.
The draws are a few numbers per image computed on the host; the images are mixed on the device, no host sync.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.special import betaincinv

from pipeline.data.order import uniforms

_SALT = 0x6D6978  # the mixing draws' own stream, apart from the crops'
_DRAWS = 6  # mix or not, cutmix or mixup, mixup's lambda, cutmix's lambda, the box's centre x and y


class MixParams(NamedTuple):
    """Per image of a rank's batch: mixup's weight of the image itself (1: none), the target's weight of the
    image's own class, and the CutMix box ``(x1, y1, x2, y2)`` (empty: none)."""

    mixup_lam: np.ndarray
    target_lam: np.ndarray
    boxes: np.ndarray


def beta(alpha: float, u: np.ndarray) -> np.ndarray:
    """Beta(alpha, alpha) samples from uniforms ``u`` (the inverse of its distribution function)."""
    return betaincinv(alpha, alpha, u)


def cutmix_box(lam: np.ndarray, ux: np.ndarray, uy: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's CutMix box for ``lam``, centred at the pixel ``(floor(ux W), floor(uy H))``: (N, 4)."""
    cx, cy = np.floor(ux * width), np.floor(uy * height)
    r = 0.5 * np.sqrt(1.0 - lam)
    half_w, half_h = np.trunc(r * width), np.trunc(r * height)
    return np.stack([np.maximum(cx - half_w, 0), np.maximum(cy - half_h, 0),
                     np.minimum(cx + half_w, width), np.minimum(cy + half_h, height)], 1).astype(np.int64)


def mix_params(mix_cfg, seed: int, epoch: int, step: int, positions: np.ndarray, global_batch: int,
               height: int, width: int) -> MixParams:
    """The mixing of the images at ``positions`` of the global batch of ``step`` in ``epoch``."""
    positions = np.asarray(positions, dtype=np.int64)
    key = {"batch": np.zeros_like(positions), "pair": positions // 2, "elem": positions}[mix_cfg.mode]
    u = uniforms(seed ^ _SALT, epoch, step * global_batch + key, _DRAWS)
    mixed = u[:, 0] < mix_cfg.prob
    mixup_on, cutmix_on = mix_cfg.mixup_alpha > 0, mix_cfg.cutmix_alpha > 0
    cutmix = mixed & cutmix_on & (~mixup_on | (u[:, 1] < mix_cfg.switch_prob))
    mixup = mixed & mixup_on & ~cutmix
    ones = np.ones(len(positions))
    mixup_lam = np.where(mixup, beta(mix_cfg.mixup_alpha, u[:, 2]) if mixup_on else ones, 1.0)
    lam = beta(mix_cfg.cutmix_alpha, u[:, 3]) if cutmix_on else ones
    boxes = np.where(cutmix[:, None], cutmix_box(lam, u[:, 4], u[:, 5], height, width), 0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    target_lam = np.where(cutmix, 1.0 - area / (height * width), mixup_lam)
    return MixParams(mixup_lam, target_lam, boxes)


def mix(images: torch.Tensor, labels: torch.Tensor, params: MixParams, num_classes: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Each image mixed with its pair's other image (index ``i ^ 1``), and the soft targets, on the device."""
    device, batch = images.device, images.shape[0]
    partner = torch.arange(batch, device=device) ^ 1
    mixup_lam, target_lam, boxes = _draws_on(device, params)
    weight = mixup_lam.to(images.dtype).view(-1, 1, 1, 1)
    other = images[partner]
    # torchvision's order of operations (v2.MixUp): partner * (1 - lam) + image * lam
    out = other.mul(1.0 - weight).add_(images.mul(weight))
    rows = torch.arange(images.shape[2], device=device).view(1, -1, 1)
    cols = torch.arange(images.shape[3], device=device).view(1, 1, -1)
    x1, y1, x2, y2 = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    inside = ((rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)).unsqueeze(1)
    out = torch.where(inside, other, out)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).float()
    lam = target_lam.float().view(-1, 1)
    targets = one_hot[partner].mul(1.0 - lam).add_(one_hot.mul(lam))
    return out.contiguous(memory_format=_format_of(images)), targets


def _format_of(images: torch.Tensor) -> torch.memory_format:
    channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) and \
        not images.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _draws_on(device: torch.device, params: MixParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``params`` on ``device`` in one copy: mixup's lambdas, the targets' lambdas, the boxes (as integers)."""
    table = torch.from_numpy(np.column_stack([params.mixup_lam, params.target_lam, params.boxes]))
    if device.type == "cuda":  # a pinned buffer: the copy is queued on the stream, the host does not wait
        table = table.pin_memory().to(device, non_blocking=True)
    return table[:, 0], table[:, 1], table[:, 2:].long()


class BatchMixer:
    """Mixes one rank's share of each global batch (``train.mix``); its draws need no state."""

    def __init__(self, mix_cfg, seed: int, rank: int, per_rank_batch: int, world_size: int, num_classes: int):
        self.cfg, self.seed, self.num_classes = mix_cfg, seed, num_classes
        self.global_batch = per_rank_batch * world_size
        self.positions = np.arange(rank * per_rank_batch, (rank + 1) * per_rank_batch)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
        params = mix_params(self.cfg, self.seed, epoch, step, self.positions, self.global_batch, images.shape[2],
                            images.shape[3])
        return mix(images, labels, params, self.num_classes)


def mixing_enabled(mix_cfg) -> bool:
    """Whether ``train.mix`` mixes anything."""
    return mix_cfg.prob > 0 and (mix_cfg.mixup_alpha > 0 or mix_cfg.cutmix_alpha > 0)
