"""The DALI side of :mod:`pipeline.data.augment`: torchvision's ops as DALI operators, fed per-sample arguments.

Each op reproduces what torchvision has Pillow do, in Pillow's arithmetic: a blend ``degenerate + factor *
(image - degenerate)`` in float32, clipped and truncated to uint8 (``Image.blend``); the grey of ``Color`` with
Pillow's integer luma weights; ``Contrast`` about the rounded mean grey; ``Sharpness`` against Pillow's 3x3
smoothing with the 1-pixel border kept; ``AutoContrast`` in float64 as Pillow's Python code computes its table;
``Posterize``, ``Solarize`` and ``Invert`` on the uint8 values; the geometric ops as ``warp_affine`` with
Pillow's destination-to-source matrix, nearest neighbour, fill 0.
``Equalize`` is DALI's own (OpenCV's formula, not Pillow's: see tests/data/test_augment.py for how far apart).
The per-sample choice of op is DALI's conditional execution (``enable_conditionals=True`` on the pipeline):
each ``if`` on a DataNode splits the batch, so every sample runs only its own op.
"""

from __future__ import annotations

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, types

from pipeline.data.augment import DALI_KINDS

_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13  # Pillow's ImageFilter.SMOOTH


def _on(images, node):
    """``node`` on the device of ``images``: arithmetic wants both operands on one device."""
    return node.gpu() if images.device == "gpu" else node


def _float(images):
    return fn.cast(images, dtype=types.FLOAT)


def _truncate(values):
    """Pillow's uint8 of a blend, clipped to 0-255 then truncated. DALI's cast saturates and rounds half away from
    zero, so the cast of ``values - 0.5`` is exactly that (the subtraction is exact below 256), and much cheaper
    on the CPU than ``floor`` and ``clamp``."""
    return fn.cast(values - 0.5, dtype=types.UINT8)


def _blend(degenerate, images, factor):
    """Pillow's ``Image.blend(degenerate, image, factor)``: ``degenerate + factor * (image - degenerate)``."""
    return _truncate(degenerate + factor * (_float(images) - degenerate))


def _grey(images):
    """Pillow's ``convert("L")``, (R*19595 + G*38470 + B*7471 + 2**15) >> 16, as HW1 uint8: the weights over 2**16
    and their sum are exact in float32, and the cast rounds half up as the added 2**15 does."""
    weights = types.Constant(np.array([19595, 38470, 7471], np.float32) / 65536, device=images.device)
    return fn.cast(fn.reductions.sum(images * weights, axes=[2], keep_dims=True), dtype=types.UINT8)


def _identity(images, factor, matrix, size):
    return images


def _affine(images, factor, matrix, size):
    return fn.warp_affine(images, matrix=matrix, fill_value=0, interp_type=types.INTERP_NN)


def _brightness(images, factor, matrix, size):
    # a blend with black, factor * x truncated: DALI's fused operator with a shift of -0.5 before its rounding
    # gives exactly that (checked against Pillow on every factor of the 31-bin tables), at a tenth of the cost
    return fn.brightness_contrast(images, brightness=factor, brightness_shift=-0.5 / 255)


def _color(images, factor, matrix, size):
    return _blend(_grey(images), images, _on(images, factor))


def _contrast(images, factor, matrix, size):
    # Pillow: a blend with the grey of int(mean grey + 0.5), which the rounding cast gives
    mean = fn.cast(fn.reductions.mean(_grey(images)), dtype=types.UINT8)
    return _blend(mean, images, _on(images, factor))


def _sharpness(images, factor, matrix, size):
    smooth = fn.filter(images, _SMOOTH, mode="valid")  # rounds as Pillow's filter does
    # Pillow smooths the interior only and keeps the 1-pixel border, so the blend leaves the border as it was
    middle = fn.cat(images[1:-1, 0:1], smooth, images[1:-1, size - 1:size], axis=1)
    degenerate = fn.cat(images[0:1], middle, images[size - 1:size], axis=0)
    return _blend(degenerate, images, _on(images, factor))


def _posterize(images, factor, matrix, size):
    return images & _on(images, fn.cast(factor, dtype=types.UINT8))  # the factor is the mask of the bits kept


def _solarize(images, factor, matrix, size):
    above = images >= _on(images, factor)  # Pillow inverts the values from the threshold up
    return images ^ (above * types.Constant(np.uint8(255), device=images.device))  # 255 - x is x ^ 255


def _autocontrast(images, factor, matrix, size):
    # Pillow's table, int(x * scale + offset) in double precision per channel; a flat channel stays as it is
    lo = fn.cast(fn.reductions.min(images, axes=[0, 1], keep_dims=True), dtype=types.FLOAT64)
    hi = fn.cast(fn.reductions.max(images, axes=[0, 1], keep_dims=True), dtype=types.FLOAT64)
    spread = hi > lo
    scale = spread * (255.0 / dmath.max(hi - lo, 1.0)) + (spread ^ True) * 1.0
    offset = -(lo * spread) * scale
    return _truncate(fn.cast(images, dtype=types.FLOAT64) * scale + offset)


def _equalize(images, factor, matrix, size):
    return fn.equalize(images)


def _invert(images, factor, matrix, size):
    return types.Constant(np.uint8(255), device=images.device) - images


_OPS = {"identity": _identity, "affine": _affine, "brightness": _brightness, "color": _color,
        "contrast": _contrast, "sharpness": _sharpness, "posterize": _posterize, "solarize": _solarize,
        "autocontrast": _autocontrast, "equalize": _equalize, "invert": _invert}


def _select(lo: int, hi: int, kind, images, factor, matrix, size: int):
    """The op ``DALI_KINDS[kind]`` of each sample, by halving the range of kinds (a tree of conditionals)."""
    if lo == hi:
        return _OPS[DALI_KINDS[lo]](images, factor, matrix, size)
    mid = (lo + hi) // 2
    if kind <= mid:
        out = _select(lo, mid, kind, images, factor, matrix, size)
    else:
        out = _select(mid + 1, hi, kind, images, factor, matrix, size)
    return out


def apply_ops(images, kinds: list, factors: list, matrices: list, size: int):
    """Each sample's ops, one slot after the other, on uint8 HWC ``images`` of ``size`` x ``size``.

    ``kinds``, ``factors`` and ``matrices`` hold one DataNode per slot (CPU, from ``external_source``), the
    per-sample values of :func:`pipeline.data.augment.dali_params`. Needs ``enable_conditionals=True``.
    """
    for slot in range(len(kinds)):  # not zip(): DALI's conditionals rewrite it into a version without strict=
        images = _select(0, len(DALI_KINDS) - 1, kinds[slot], images, factors[slot], matrices[slot], size)
    return images


def erase(images, anchor, shape):
    """``images`` (HWC) with each sample's box, (top, left) ``anchor`` and (height, width) ``shape`` as float
    DataNodes, set to 0; a (0, 0) shape erases nothing."""
    return fn.erase(images, anchor=anchor, shape=shape, axis_names="HW", fill_value=0)
