"""The views of a validation image that an evaluation averages over, as the DenseNet paper reports them.

The image's shorter side is resized to ``resize`` (torchvision's ``Resize(resize)``); then the views are
square crops of ``size``: the centre crop, or with ``crops=10`` the four corners and the centre of the image and
of its mirror image (torchvision's ``TenCrop``, in its order); ``flip`` adds the mirror image's centre crop to
the centre crop. The windows follow torchvision's arithmetic exactly, and are cut from the resized batch on the
device, so both backends see the same windows of their own resized images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CROPS = (1, 10)


@dataclass(frozen=True)
class Views:
    """``resize``: the shorter side; ``size``: the square crop; ``crops``: 1 or 10; ``flip``: with the mirror."""

    resize: int
    size: int
    crops: int = 1
    flip: bool = False

    @property
    def count(self) -> int:
        """Views per image."""
        return 10 if self.crops == 10 else 1 + self.flip

    @property
    def centre(self) -> int:
        """Which view is the image's own centre crop (the single-crop view)."""
        return 4 if self.crops == 10 else 0

    def windows(self, height: int, width: int) -> list[tuple[int, int, bool]]:
        """Each view's (top, left, mirrored) in an image of ``height`` x ``width`` (resized): the window's
        top-left pixel in the image itself; a mirrored view is that window mirrored."""
        size = self.size
        centre = (int(round((height - size) / 2.0)), int(round((width - size) / 2.0)))
        # torchvision's five_crop order: top-left, top-right, bottom-left, bottom-right, centre
        five = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), centre]
        own = five if self.crops == 10 else [centre]
        mirrored = own if self.crops == 10 or self.flip else []
        # the mirror image's window at left x covers the image's columns width - x - size to width - x
        return [(top, left, False) for top, left in own] + [(top, width - left - size, True)
                                                             for top, left in mirrored]

    def cut(self, images: torch.Tensor, sizes: np.ndarray) -> torch.Tensor:
        """The views of a batch of resized NHWC images (padded at the bottom and right to one shape), each
        image's ``sizes`` row its (height, width) before padding: ``count`` crops per image, image by image."""
        crops = []
        for image, (height, width) in zip(images, sizes.tolist(), strict=True):
            for top, left, mirrored in self.windows(height, width):
                crop = image[top:top + self.size, left:left + self.size]
                crops.append(crop.flip(1) if mirrored else crop)
        return torch.stack(crops)
