"""The DALI side of :mod:`pipeline.data.augment`: torchvision's ops as DALI operators, fed per-sample arguments.

Each op reproduces what torchvision has Pillow do, in Pillow's arithmetic: a blend ``degenerate + factor *
(image - degenerate)`` in float32, truncated and clipped to uint8 (``Image.blend``); the grey of ``Color`` with
Pillow's integer luma weights; ``Contrast`` about the rounded mean grey; ``Sharpness`` against Pillow's 3x3
smoothing with the 1-pixel border kept; ``AutoContrast`` in float64 as Pillow's Python code computes its table;
the geometric ops as ``warp_affine`` with Pillow's destination-to-source matrix, nearest neighbour, fill 0.
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


def _to_uint8(values):
    """Pillow's conversion of a blend: clipped to 0-255, then truncated."""
    return fn.cast(dmath.floor(dmath.clamp(values, 0.0, 255.0)), dtype=types.UINT8)


def _blend(degenerate, images, factor):
    return _to_uint8(degenerate + factor * (images - degenerate))


def _grey(images):
    """Pillow's ``convert("L")``: (R*19595 + G*38470 + B*7471 + 2**15) >> 16, exact in float32 (below 2**24)."""
    x = _float(images)
    weighted = x[:, :, 0] * 19595.0 + x[:, :, 1] * 38470.0 + x[:, :, 2] * 7471.0 + 32768.0
    return dmath.floor(weighted / 65536.0)


def _identity(images, factor, matrix, size):
    return images


def _affine(images, factor, matrix, size):
    return fn.warp_affine(images, matrix=matrix, fill_value=0, interp_type=types.INTERP_NN)


def _brightness(images, factor, matrix, size):
    return _to_uint8(_on(images, factor) * _float(images))


def _color(images, factor, matrix, size):
    grey = fn.expand_dims(_grey(images), axes=[2], new_axis_names="C")
    return _blend(grey, _float(images), _on(images, factor))


def _contrast(images, factor, matrix, size):
    mean = dmath.floor(fn.reductions.mean(_grey(images)) + 0.5)  # Pillow: int(mean of the grey + 0.5)
    return _blend(mean, _float(images), _on(images, factor))


def _sharpness(images, factor, matrix, size):
    x = _float(images)
    blended = _float(_blend(_float(fn.filter(images, _SMOOTH)), x, _on(images, factor)))
    interior = np.zeros((size, size, 1), np.float32)
    interior[1:-1, 1:-1] = 1  # Pillow's smoothing leaves the border as it was, so the blend does too
    return fn.cast(x + types.Constant(interior, device=images.device) * (blended - x), dtype=types.UINT8)


def _posterize(images, factor, matrix, size):
    step = _on(images, factor)  # 2 ** (8 - bits): keeping the high bits is flooring to a multiple of it
    return fn.cast(dmath.floor(_float(images) / step) * step, dtype=types.UINT8)


def _solarize(images, factor, matrix, size):
    x = _float(images)
    return fn.cast(x + (x >= _on(images, factor)) * (255.0 - 2.0 * x), dtype=types.UINT8)


def _autocontrast(images, factor, matrix, size):
    x = fn.cast(images, dtype=types.FLOAT64)
    lo = fn.cast(fn.reductions.min(images, axes=[0, 1], keep_dims=True), dtype=types.FLOAT64)
    hi = fn.cast(fn.reductions.max(images, axes=[0, 1], keep_dims=True), dtype=types.FLOAT64)
    spread = hi > lo  # a flat channel stays as it is
    scale = spread * (255.0 / dmath.max(hi - lo, 1.0)) + (spread ^ True) * 1.0
    offset = -(lo * spread) * scale
    return fn.cast(dmath.floor(dmath.clamp(x * scale + offset, 0.0, 255.0)), dtype=types.UINT8)


def _equalize(images, factor, matrix, size):
    return fn.equalize(images)


def _invert(images, factor, matrix, size):
    return fn.cast(255.0 - _float(images), dtype=types.UINT8)


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
