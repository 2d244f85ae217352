"""Synthetic data: a learnable ImageNet-style JPEG tree on disk, and random batches on the device.

The JPEG tree (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``) exercises the real decode and
augmentation path. Each class has its own hue and stripe orientation, with per-image jitter in
size, aspect ratio, brightness, phase and noise, so a small network learns it well above
chance within a few epochs, also from random-resized crops.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


def class_names(num_classes: int) -> list[str]:
    """WordNet-style folder names, sorted as the readers sort them."""
    return [f"n{10000000 + i:08d}" for i in range(num_classes)]


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def render_image(label: int, num_classes: int, rng: np.random.Generator, min_side: int, max_side: int) -> Image.Image:
    """One image of class ``label``: the class's hue and stripe angle, everything else random."""
    width = int(rng.integers(min_side, max_side + 1))
    aspect = float(np.exp(rng.uniform(np.log(3 / 5), np.log(5 / 3))))
    height = int(np.clip(round(width / aspect), min_side // 2, 2 * max_side))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = np.pi * ((label * 7) % num_classes) / num_classes
    period = rng.uniform(6, 12)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
                                 + rng.uniform(0, 2 * np.pi))
    hue = (label / num_classes + rng.normal(0, 0.45 / num_classes)) % 1.0
    saturation = 0.35 + 0.6 * stripes
    value = np.clip(rng.uniform(0.55, 1.0) * (0.6 + 0.4 * stripes) + rng.normal(0, 0.05, stripes.shape), 0, 1)
    rgb = _hsv_to_rgb(np.full_like(stripes, hue), saturation, value)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def write_synthetic_imagenet(root: str | Path, num_classes: int, train_per_class: int, val_per_class: int,
                             min_side: int = 40, max_side: int = 96, seed: int = 0) -> Path:
    """Write the JPEG tree at ``root``; built in a temporary sibling and renamed, so it is whole or absent."""
    root = Path(root)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, wnid in enumerate(class_names(num_classes)):
            folder = tmp / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = render_image(label, num_classes, rng, min_side, max_side)
                image.save(folder / f"{wnid}_{i}.JPEG", quality=int(rng.integers(80, 96)))
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return root


def ensure_generated(root: str | Path, num_classes: int, gen_cfg, seed: int) -> None:
    """Generate and verify the synthetic tree at ``root`` on first use; an existing tree is left alone."""
    root = Path(root)
    if root.exists():
        return
    from pipeline.data.imagenet import verify

    log.info("Writing a synthetic %d-class JPEG tree to %s (first use)", num_classes, root)
    write_synthetic_imagenet(root, num_classes, gen_cfg.train_per_class, gen_cfg.val_per_class,
                             gen_cfg.min_side, gen_cfg.max_side, seed)
    verify(root)


class RandomBatches:
    """``steps`` random batches made once on the device: the model's speed without any input pipeline."""

    def __init__(self, batch_size: int, image_size: int, num_classes: int, steps: int,
                 device: torch.device, channels_last: bool, seed: int = 0):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.images = images.to(device).contiguous(memory_format=memory_format)
        self.steps = steps
        self.epoch, self.start, self._consumed = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        """The same batches every epoch."""
        self.epoch, self.start, self._consumed = epoch, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.start + self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start, self._consumed = state["epoch"], state["position"], 0

    def __len__(self) -> int:
        return self.steps

    def close(self) -> None:
        """Nothing to release: the batches are freed with the loader."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._consumed = 0
        for _ in range(self.start, self.steps):
            self._consumed += 1
            yield self.images, self.labels
