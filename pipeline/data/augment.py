"""RandAugment, TrivialAugment-wide, AutoAugment (ImageNet policy) and random erasing, as data.

torchvision's op tables and draw rules (``torchvision.transforms.RandAugment``, ``TrivialAugmentWide``,
``AutoAugment(AutoAugmentPolicy.IMAGENET)``, ``RandomErasing``), with every random number taken from the
counter-based generator of :mod:`pipeline.data.order` keyed by (seed, epoch, sample id), under salts of its
own so the crop windows stay what they were. A sample's ops are fixed-size arrays, Identity-padded: the
torchvision backend applies them with torchvision's functional ops on the Pillow image (:func:`apply_ops`,
as torchvision's ``_apply_op`` does), the DALI backend with DALI operators fed the same parameters
(:mod:`pipeline.data.dali_augment`, from :func:`dali_params`). Order, as torchvision's reference recipe:
random-resized crop, flip, the policy on uint8, to float and normalise, random erasing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from pipeline.data.order import uniforms

# torchvision's reference scripts' --auto-augment names: RandAugment, TrivialAugmentWide, AutoAugment(IMAGENET)
POLICIES = ("none", "ra", "ta_wide", "imagenet")
# every op of the three tables; a drawn op is an index into this tuple, 0 (Identity) pads and skips
OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
            "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10
AUTOAUGMENT_BINS = 10  # AutoAugment's policy indexes a table of 10 bins, whatever magnitude_bins is
# torchvision's AutoAugmentPolicy.IMAGENET: two (op, probability, magnitude bin) per sub-policy
IMAGENET_POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
# salts of the seed: the policy's and the erasing's draws share no number with the crop windows' or each other's
OPS_SALT = 0x6A09E667F3BCC909
ERASE_SALT = 0xBB67AE8584CAA73B


@dataclass(frozen=True)
class AugmentSpec:
    """What ``data.auto_augment`` and ``data.random_erase`` ask for, at the training image size."""

    policy: str = "none"
    num_ops: int = 2  # RandAugment's num_ops
    magnitude: int = 9  # RandAugment's magnitude (a bin index)
    bins: int = 31  # num_magnitude_bins of RandAugment and TrivialAugmentWide
    erase: float = 0.0  # RandomErasing's p
    image_size: int = 224

    @property
    def slots(self) -> int:
        """Ops per sample: the width of the drawn arrays."""
        return {"none": 0, "ra": self.num_ops, "ta_wide": 1, "imagenet": 2}[self.policy]


def augment_spec(data_cfg) -> AugmentSpec | None:
    """The augmentation ``data_cfg`` asks for, or None when it is all off."""
    spec = AugmentSpec(data_cfg.auto_augment, data_cfg.ra_num_ops, data_cfg.ra_magnitude, data_cfg.magnitude_bins,
                       float(data_cfg.random_erase), data_cfg.image_size)
    return spec if spec.slots or spec.erase else None


class Augmentation(NamedTuple):
    """Per sample: its ops (indices into :data:`OP_NAMES`, Identity-padded) and their signed magnitudes, shape
    ``(N, slots)``, as torchvision's ``_apply_op`` receives them; and its erase box (top, left, height, width)
    in pixels of the output image, shape ``(N, 4)``, height 0 for none."""

    op: np.ndarray
    magnitude: np.ndarray
    box: np.ndarray


def _bins(end: float, bins: int) -> np.ndarray:
    return torch.linspace(0.0, end, bins).double().numpy()  # torchvision's float32 values, exactly


def _posterize_bits(bins: int, span: int) -> np.ndarray:
    return (8 - (torch.arange(bins) / ((bins - 1) / span)).round().int()).double().numpy()


def _table(bins: int, shear: float, translate: tuple[float, float], rotate: float, enhance: float,
           posterize_span: int) -> dict[str, tuple[np.ndarray, bool]]:
    """torchvision's ``_augmentation_space`` layout: op name -> (magnitude per bin, signed); no bins: 0.0."""
    return {
        "ShearX": (_bins(shear, bins), True),
        "ShearY": (_bins(shear, bins), True),
        "TranslateX": (_bins(translate[0], bins), True),
        "TranslateY": (_bins(translate[1], bins), True),
        "Rotate": (_bins(rotate, bins), True),
        "Brightness": (_bins(enhance, bins), True),
        "Color": (_bins(enhance, bins), True),
        "Contrast": (_bins(enhance, bins), True),
        "Sharpness": (_bins(enhance, bins), True),
        "Posterize": (_posterize_bits(bins, posterize_span), False),
        "Solarize": (torch.linspace(255.0, 0.0, bins).double().numpy(), False),
        "AutoContrast": (np.zeros(()), False),
        "Equalize": (np.zeros(()), False),
    }


def augmentation_space(policy: str, bins: int, image_size: int) -> dict[str, tuple[np.ndarray, bool]]:
    """The op table of ``policy`` in torchvision's order (the draw's op index counts in it), with its bins
    (``bins`` of them; AutoAugment's always 10)."""
    identity = {"Identity": (np.zeros(()), False)}
    if policy == "ra":  # RandAugment: translations in pixels of the image the policy sees
        return {**identity, **_table(bins, 0.3, (150 / 331 * image_size,) * 2, 30.0, 0.9, 4)}
    if policy == "ta_wide":
        return {**identity, **_table(bins, 0.99, (32.0, 32.0), 135.0, 0.99, 6)}
    if policy == "imagenet":
        return {**_table(AUTOAUGMENT_BINS, 0.3, (150 / 331 * image_size,) * 2, 30.0, 0.9, 4),
                "Invert": (np.zeros(()), False)}
    raise ValueError(f"unknown augmentation policy {policy!r}; known: {', '.join(POLICIES[1:])}")


class _Table(NamedTuple):
    op: np.ndarray  # (n,) index into OP_NAMES of each entry of the policy's table
    magnitude: np.ndarray  # (n, bins), zeros for an op without magnitudes
    signed: np.ndarray  # (n,)


@functools.lru_cache(maxsize=16)
def _arrays(policy: str, bins: int, image_size: int) -> _Table:
    space = augmentation_space(policy, bins, image_size)
    width = AUTOAUGMENT_BINS if policy == "imagenet" else bins
    magnitude = np.stack([np.broadcast_to(m, (width,)) for m, _ in space.values()])
    return _Table(np.array([OP_NAMES.index(name) for name in space]), magnitude,
                  np.array([signed for _, signed in space.values()]))


def keyed_uniforms(seed: int, salt: int, epoch: int, ids: np.ndarray, count: int) -> np.ndarray:
    """:func:`pipeline.data.order.uniforms` under a salt of the seed: a stream no other draw shares."""
    return uniforms(seed ^ salt, epoch, ids, count)


def op_draws(spec: AugmentSpec) -> int:
    """Uniforms per sample the policy draws: RandAugment (op, sign) per op; TrivialAugment op, bin, sign;
    AutoAugment sub-policy, two probabilities, two signs."""
    return {"ra": 2 * spec.num_ops, "ta_wide": 3, "imagenet": 5}[spec.policy]


def draw_ops(spec: AugmentSpec, seed: int, epoch: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's ops and signed magnitudes, shape ``(len(ids), spec.slots)``: what torchvision's policy
    draws from ``torch.randint``/``torch.rand`` here comes from (seed, epoch, id)."""
    ids = np.asarray(ids)
    if not spec.slots:
        return np.zeros((len(ids), 0), np.int32), np.zeros((len(ids), 0))
    u = keyed_uniforms(seed, OPS_SALT, epoch, ids, op_draws(spec))
    if spec.policy == "imagenet":
        return _draw_autoaugment(u, spec.image_size)
    table = _arrays(spec.policy, spec.bins, spec.image_size)
    if spec.policy == "ra":
        u = u.reshape(len(ids), spec.num_ops, 2)
        pick = np.floor(u[..., 0] * len(table.op)).astype(np.int64)
        magnitude = table.magnitude[pick, spec.magnitude]
        negate = u[..., 1] >= 0.5  # torch.randint(2) == 1 negates
    else:  # ta_wide: one op, a random bin
        pick = np.floor(u[:, :1] * len(table.op)).astype(np.int64)
        magnitude = table.magnitude[pick, np.floor(u[:, 1:2] * spec.bins).astype(np.int64)]
        negate = u[:, 2:3] >= 0.5
    magnitude = np.where(table.signed[pick] & negate, -magnitude, magnitude)
    return table.op[pick].astype(np.int32), magnitude


@functools.lru_cache(maxsize=1)
def _imagenet_policy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sub-policy and op: its entry in AutoAugment's table, its probability, its bin (-1: none)."""
    names = list(augmentation_space("imagenet", AUTOAUGMENT_BINS, 1))
    return (np.array([[names.index(name) for name, _, _ in pair] for pair in IMAGENET_POLICY]),
            np.array([[p for _, p, _ in pair] for pair in IMAGENET_POLICY]),
            np.array([[-1 if b is None else b for _, _, b in pair] for pair in IMAGENET_POLICY]))


def _draw_autoaugment(u: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    table = _arrays("imagenet", AUTOAUGMENT_BINS, image_size)
    policy, chance, bin_ = _imagenet_policy()
    which = np.floor(u[:, 0] * len(IMAGENET_POLICY)).astype(np.int64)
    pick, bins = policy[which], bin_[which]
    applied = u[:, 1:3] <= chance[which]  # torchvision applies an op when its draw is <= its probability
    magnitude = np.where(bins >= 0, table.magnitude[pick, np.maximum(bins, 0)], 0.0)
    negate = table.signed[pick] & (u[:, 3:5] < 0.5)  # torch.randint(2) == 0 negates
    magnitude = np.where(negate, -magnitude, magnitude)
    return np.where(applied, table.op[pick], 0).astype(np.int32), np.where(applied, magnitude, 0.0)


def erase_boxes(p: float, seed: int, epoch: int, ids: np.ndarray, size: int) -> np.ndarray:
    """torchvision's ``RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3))`` boxes in a ``size`` x ``size``
    image, shape ``(len(ids), 4)``: (top, left, height, width), all 0 when not erased (the coin, or no
    attempt of 10 fitting)."""
    ids = np.asarray(ids)
    u = keyed_uniforms(seed, ERASE_SALT, epoch, ids, 1 + 2 * ERASE_ATTEMPTS + 2)
    area = size * size * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[:, 1:1 + ERASE_ATTEMPTS])
    log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 1 + ERASE_ATTEMPTS:1 + 2 * ERASE_ATTEMPTS])
    h = np.rint(np.sqrt(area * aspect))  # torchvision's round(): half to even; the height takes the aspect
    w = np.rint(np.sqrt(area / aspect))
    fits = (h < size) & (w < size)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(ids))
    h, w = h[rows, first], w[rows, first]
    erased = (u[:, 0] < p) & fits[rows, first] & (h > 0) & (w > 0)  # an empty box erases nothing
    top = np.floor(u[:, -2] * (size - h + 1))
    left = np.floor(u[:, -1] * (size - w + 1))
    return np.where(erased[:, None], np.stack([top, left, h, w], 1), 0).astype(np.int32)


def draw(spec: AugmentSpec, seed: int, epoch: int, ids: np.ndarray) -> Augmentation:
    """The ops and erase boxes drawn by ``ids`` (the samples' draw keys) in ``epoch``: a pure function of (seed,
    epoch, key)."""
    op, magnitude = draw_ops(spec, seed, epoch, ids)
    return Augmentation(op, magnitude, erase_boxes(spec.erase, seed, epoch, ids, spec.image_size))


def check_augmentation(aug: Augmentation, size: int) -> None:
    """Every op known, every magnitude finite and every box inside the image: DALI may crash on bad ones."""
    box = aug.box
    inside = (box >= 0).all(1) & (box[:, 0] + box[:, 2] <= size) & (box[:, 1] + box[:, 3] <= size)
    if not inside.all():
        raise ValueError(f"erase box {box[np.argmin(inside)].tolist()} (top, left, height, width) outside a "
                         f"{size}x{size} image")
    if not ((aug.op >= 0) & (aug.op < len(OP_NAMES))).all() or not np.isfinite(aug.magnitude).all():
        raise ValueError(f"augmentation ops {aug.op.tolist()} with magnitudes {aug.magnitude.tolist()}: "
                         f"an op outside 0..{len(OP_NAMES) - 1} or a magnitude that is not finite")


# ---------------------------------------------------------------- torchvision: as torchvision's _apply_op

NEAREST = InterpolationMode.NEAREST


def _shear(image, degrees: list[float]):
    return F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=degrees, interpolation=NEAREST,
                    fill=None, center=[0, 0])


def _translate(image, pixels: list[int]):
    return F.affine(image, angle=0.0, translate=pixels, scale=1.0, interpolation=NEAREST, shear=[0.0, 0.0],
                    fill=None)


TORCHVISION_OPS = {
    "Identity": lambda image, m: image,
    "ShearX": lambda image, m: _shear(image, [math.degrees(math.atan(m)), 0.0]),
    "ShearY": lambda image, m: _shear(image, [0.0, math.degrees(math.atan(m))]),
    "TranslateX": lambda image, m: _translate(image, [int(m), 0]),
    "TranslateY": lambda image, m: _translate(image, [0, int(m)]),
    "Rotate": lambda image, m: F.rotate(image, m, interpolation=NEAREST, fill=None),
    "Brightness": lambda image, m: F.adjust_brightness(image, 1.0 + m),
    "Color": lambda image, m: F.adjust_saturation(image, 1.0 + m),
    "Contrast": lambda image, m: F.adjust_contrast(image, 1.0 + m),
    "Sharpness": lambda image, m: F.adjust_sharpness(image, 1.0 + m),
    "Posterize": lambda image, m: F.posterize(image, int(m)),
    "Solarize": lambda image, m: F.solarize(image, m),
    "AutoContrast": lambda image, m: F.autocontrast(image),
    "Equalize": lambda image, m: F.equalize(image),
    "Invert": lambda image, m: F.invert(image),
}


def apply_ops(image: Image.Image, op: np.ndarray, magnitude: np.ndarray) -> Image.Image:
    """One sample's drawn ops applied in turn to its uint8 RGB image, with torchvision's functional ops."""
    for code, m in zip(op.tolist(), magnitude.tolist(), strict=True):
        image = TORCHVISION_OPS[OP_NAMES[code]](image, m)
    return image


def erase(image: torch.Tensor, box: np.ndarray) -> torch.Tensor:
    """``image`` (normalised, CHW or a CHW view) with its box set to 0, in place, as ``RandomErasing`` does."""
    top, left, height, width = (int(v) for v in box)
    if height:
        F.erase(image, top, left, height, width, torch.zeros(()), inplace=True)
    return image


# ---------------------------------------------------------------- DALI: what its operators are given

DALI_KINDS = ("identity", "affine", "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
              "autocontrast", "equalize", "invert")
_KIND = {"Identity": "identity", "ShearX": "affine", "ShearY": "affine", "TranslateX": "affine",
         "TranslateY": "affine", "Rotate": "affine", "Brightness": "brightness", "Color": "color",
         "Contrast": "contrast", "Sharpness": "sharpness", "Posterize": "posterize", "Solarize": "solarize",
         "AutoContrast": "autocontrast", "Equalize": "equalize", "Invert": "invert"}
_ENHANCE = ("Brightness", "Color", "Contrast", "Sharpness")


class DaliOps(NamedTuple):
    """Per sample and slot: the DALI op kind (index into :data:`DALI_KINDS`), its scalar (a blend factor,
    posterize's bit mask, solarize's threshold) and its 2x3 destination-to-source matrix (affine ops)."""

    kind: np.ndarray
    factor: np.ndarray
    matrix: np.ndarray


def inverse_affine(center: tuple[float, float], translate: tuple[float, float],
                   shear: tuple[float, float]) -> list[float]:
    """The destination-to-source matrix torchvision's ``F.affine`` hands Pillow (no rotation, scale 1)."""
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    a = math.cos(-sy) / math.cos(sy)
    b = -math.cos(-sy) * math.tan(sx) / math.cos(sy)
    c = math.sin(-sy) / math.cos(sy)
    d = -math.sin(-sy) * math.tan(sx) / math.cos(sy) + 1.0
    matrix = [d, -b, 0.0, -c, a, 0.0]
    (cx, cy), (tx, ty) = center, translate
    matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty) + cx
    matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty) + cy
    return matrix


def rotation(degrees: float, width: int, height: int) -> list[float]:
    """The destination-to-source matrix of Pillow's ``Image.rotate`` about the centre, counter-clockwise."""
    angle = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = width / 2.0, height / 2.0
    return [cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy]


def affine_matrix(name: str, magnitude: float, size: int) -> list[float]:
    """The matrix of a geometric op on a ``size`` x ``size`` image, as torchvision has Pillow apply it."""
    if name == "ShearX":
        return inverse_affine((0.0, 0.0), (0, 0), (math.degrees(math.atan(magnitude)), 0.0))
    if name == "ShearY":
        return inverse_affine((0.0, 0.0), (0, 0), (0.0, math.degrees(math.atan(magnitude))))
    if name == "TranslateX":
        return inverse_affine((size * 0.5, size * 0.5), (int(magnitude), 0), (0.0, 0.0))
    if name == "TranslateY":
        return inverse_affine((size * 0.5, size * 0.5), (0, int(magnitude)), (0.0, 0.0))
    return rotation(magnitude, size, size)


def dali_params(aug: Augmentation, size: int) -> DaliOps:
    """What the DALI pipeline executes for ``aug`` on ``size`` x ``size`` images: each op's kind, scalar and
    matrix, computed here in double precision (the factor as Pillow receives it: ``1.0 + magnitude``)."""
    n, slots = aug.op.shape
    kind = np.zeros((n, slots), np.int32)
    factor = np.zeros((n, slots), np.float32)
    matrix = np.tile(np.array([1, 0, 0, 0, 1, 0], np.float32), (n, slots, 1))
    for (i, k), code in np.ndenumerate(aug.op):
        name, m = OP_NAMES[code], float(aug.magnitude[i, k])
        kind[i, k] = DALI_KINDS.index(_KIND[name])
        if name in _ENHANCE:
            factor[i, k] = 1.0 + m
        elif name == "Posterize":  # the mask of the high bits kept
            factor[i, k] = 256 - 2 ** (8 - int(m))
        elif name == "Solarize":
            factor[i, k] = m
        elif _KIND[name] == "affine":
            matrix[i, k] = affine_matrix(name, m, size)
    if not (np.isfinite(factor).all() and np.isfinite(matrix).all()):
        raise ValueError(f"augmentation parameters that are not finite for ops {aug.op.tolist()}")
    return DaliOps(kind, factor, matrix.reshape(n, slots, 2, 3))
