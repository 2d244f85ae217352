"""RandAugment, TrivialAugment-wide, AutoAugment and random erasing: drawn as torchvision draws them, from
(seed, epoch, id) alone, and executed alike by DALI and by torchvision's functional ops on real JPEGs.

Tolerances, DALI against torchvision on the same decoded uint8 image:
- pointwise ops (Brightness, Color, Contrast, Sharpness, Posterize, Solarize, AutoContrast, Invert): DALI
  redoes Pillow's arithmetic (float32 blends truncated, integer luma, float64 AutoContrast table), so at most
  1 level on at most 0.1% of the values, for float rounding; seen here: identical.
- geometric ops (Shear, Translate, Rotate; nearest neighbour): DALI samples with a float32 matrix and
  coordinates, Pillow in float64; a source coordinate that falls exactly on a pixel boundary (frequent with
  the tables' round magnitudes, e.g. shear 0.12) may take the neighbouring pixel. At most 3% of pixels
  differ; seen here: up to 2%.
- Equalize: DALI's operator uses OpenCV's table (round((cdf - cdf_min) * 255 / (n - cdf_min))), Pillow's
  is ((n_excl + step // 2) // step) with step = (n - count of the top value) // 256: mean difference at most
  12 levels (seen: 2 on the photo, 8 on a low-contrast image), and both are increasing maps of each channel.
- erasing: the same pixels, exactly.
"""

import types

import numpy as np
import pytest
import torch
import torchvision.transforms.autoaugment as tv_autoaugment
import torchvision.transforms.transforms as tv_transforms
from matplotlib import cbook
from nvidia.dali import fn, pipeline_def
from PIL import Image, ImageDraw, ImageFilter
from torchvision.transforms import (
    AutoAugment,
    AutoAugmentPolicy,
    InterpolationMode,
    RandAugment,
    RandomErasing,
    TrivialAugmentWide,
)

from pipeline.config import load_config
from pipeline.data import dali_augment
from pipeline.data.augment import (
    ERASE_SALT,
    IMAGENET_POLICY,
    OP_NAMES,
    OPS_SALT,
    Augmentation,
    AugmentSpec,
    apply_ops,
    augmentation_space,
    check_augmentation,
    dali_params,
    draw,
    erase,
    erase_boxes,
    keyed_uniforms,
    op_draws,
)
from pipeline.data.loaders import build_loaders
from pipeline.data.order import ATTEMPTS, uniforms
from pipeline.data.synthetic import write_synthetic_imagenet
from pipeline.distributed import DistInfo

SIZE = 64
POINTWISE = ("Identity", "Brightness", "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast",
             "Invert")
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
TORCHVISION = {"ra": lambda: RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=31),
               "ta_wide": lambda: TrivialAugmentWide(num_magnitude_bins=31),
               "imagenet": lambda: AutoAugment(AutoAugmentPolicy.IMAGENET)}


def photo_like(path, rng):
    """A JPEG with what photos have: gradients, hard edges, texture, noise; in a narrow range (40-190), so that
    AutoContrast and Equalize have work to do."""
    yy, xx = np.mgrid[0:180, 0:240] / 180.0
    base = np.stack([0.4 + 0.3 * xx, 0.3 + 0.4 * yy, 0.6 - 0.2 * xx * yy], -1)
    image = Image.fromarray((255 * base).astype(np.uint8))
    draw_on = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, 240), rng.integers(0, 180)
        box = [x, y, x + rng.integers(10, 80), y + rng.integers(10, 60)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw_on.ellipse if rng.random() < 0.5 else draw_on.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    pixels = np.asarray(image).astype(float) + rng.normal(0, 6, (180, 240, 3))
    Image.fromarray((40 + np.clip(pixels, 0, 255) * 150 / 255).astype(np.uint8)).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real JPEGs decoded by Pillow, cut square and resized to SIZE: a photo and a low-contrast drawing."""
    drawn = photo_like(tmp_path_factory.mktemp("jpeg") / "drawn.jpg", np.random.default_rng(0))
    decoded = []
    for path in (cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), drawn):
        with Image.open(path) as image:
            image = image.convert("RGB")
            side = min(image.size)
            decoded.append(np.asarray(image.crop((0, 0, side, side)).resize((SIZE, SIZE), Image.BILINEAR)))
    return decoded


def augmentation(ops):
    """An Augmentation of one op per sample, from (name, magnitude) pairs; no erasing."""
    return Augmentation(np.array([[OP_NAMES.index(name)] for name, _ in ops], np.int32),
                        np.array([[m] for _, m in ops], float), np.zeros((len(ops), 4), np.int32))


def dali_apply(images, aug):
    """DALI's result of each sample's ops, the samples as a batch through ``dali_augment.apply_ops``."""
    params = dali_params(aug, SIZE)
    n, slots = aug.op.shape
    columns = [np.ascontiguousarray(a[:, k]) for k in range(slots) for a in (params.kind, params.factor, params.matrix)]

    @pipeline_def(batch_size=n, num_threads=2, device_id=None, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: list(images), batch=True, layout="HWC")
        fed = [fn.external_source(source=[column], batch=True) for column in columns]
        kinds, factors, matrices = fed[0::3], fed[1::3], fed[2::3]
        return dali_augment.apply_ops(x, kinds, factors, matrices, SIZE)

    p = pipe()
    p.build()
    return [np.asarray(sample) for sample in p.run()[0]]


def torchvision_apply(images, aug):
    return [np.asarray(apply_ops(Image.fromarray(image), aug.op[i], aug.magnitude[i]))
            for i, image in enumerate(images)]


def magnitudes(name):
    """A few magnitudes of ``name`` from the RandAugment and TrivialAugment tables, both signs where signed."""
    picked = set()
    for policy in ("ra", "ta_wide"):
        values, signed = augmentation_space(policy, 31, SIZE).get(name, (np.zeros(()), False))
        for b in ((3, 9, 30) if values.ndim else ()):
            picked |= {float(values[b]), -float(values[b])} if signed else {float(values[b])}
    return sorted(picked) or [0.0]


def cases(names, images):
    """(image, op, magnitude) for each image, op of ``names`` and its magnitudes: one batch for DALI."""
    return [(image, (name, m)) for name in names for m in magnitudes(name) for image in images]


# ---------------------------------------------------------------- the tables and the ops, as torchvision's

@pytest.mark.parametrize("policy", ["ra", "ta_wide", "imagenet"])
def test_op_tables_are_torchvisions(policy):
    theirs = TORCHVISION[policy]()
    if policy == "ta_wide":
        space = theirs._augmentation_space(31)
    else:
        space = theirs._augmentation_space(10 if policy == "imagenet" else 31, (SIZE, SIZE))
    ours = augmentation_space(policy, 31, SIZE)
    assert list(ours) == list(space)  # the same ops in the same order: a drawn op index means the same op
    for name, (values, signed) in space.items():
        assert ours[name][1] == signed, name
        np.testing.assert_array_equal(ours[name][0], values.double().numpy(), err_msg=name)


def test_the_torchvision_backend_applies_ops_as_torchvisions_apply_op(images):
    for name in OP_NAMES:
        for m in magnitudes(name):
            ours = apply_ops(Image.fromarray(images[1]), np.array([OP_NAMES.index(name)]), np.array([m]))
            theirs = tv_autoaugment._apply_op(Image.fromarray(images[1]), name, m, InterpolationMode.NEAREST, None)
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (name, m)


# ---------------------------------------------------------------- DALI against torchvision, op by op

def compare(names, images):
    """(op, input, DALI's output, torchvision's output) for every image and op of ``names`` at its magnitudes."""
    batch = cases(names, images)
    aug = augmentation([op for _, op in batch])
    inputs = [image for image, _ in batch]
    return [(op, image, a.astype(int), b.astype(int)) for (image, op), a, b
            in zip(batch, dali_apply(inputs, aug), torchvision_apply(inputs, aug), strict=True)]


def test_dali_runs_pointwise_ops_as_pillow_does(images):
    for op, _, a, b in compare(POINTWISE, images):
        diff = np.abs(a - b)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.001, (op, diff.max(), (diff > 0).mean())


def test_dali_runs_geometric_ops_as_pillow_does_but_for_pixels_on_a_boundary(images):
    for op, _, a, b in compare(GEOMETRIC, images):
        moved = (a != b).any(-1).mean()
        assert moved <= 0.03, (op, moved)


def test_dali_equalizes_by_opencvs_table_near_pillows(images):
    for op, image, a, b in compare(["Equalize"], images):
        assert np.abs(a - b).mean() <= 12, (op, np.abs(a - b).mean())
        for out in (a, b):  # each an increasing map of each channel's values, spread over the range
            for c in range(3):
                order = np.argsort(image[..., c], axis=None, kind="stable")
                assert (np.diff(out[..., c].ravel()[order]) >= 0).all()
            assert out.max() - out.min() >= 230


def test_dali_runs_a_samples_ops_in_their_order(images):
    names = [("Rotate", 30.0), ("Invert", 0.0)]  # the corners the rotation fills: black, or inverted to white
    aug = Augmentation(np.array([[OP_NAMES.index(n) for n, _ in names], [OP_NAMES.index(n) for n, _ in names[::-1]]],
                                np.int32), np.array([[m for _, m in names], [m for _, m in names[::-1]]]),
                       np.zeros((2, 4), np.int32))
    ours, theirs = dali_apply([images[0]] * 2, aug), torchvision_apply([images[0]] * 2, aug)
    assert not np.array_equal(theirs[0], theirs[1])  # the order matters to these two
    for a, b in zip(ours, theirs, strict=True):
        assert (a != b).any(-1).mean() <= 0.03


def test_both_backends_erase_the_same_pixels():
    boxes = erase_boxes(1.0, 0, 0, np.arange(16), SIZE)
    assert (boxes[:, 2] > 0).all()
    rng = np.random.default_rng(0)
    normalised = [rng.normal(0, 1, (SIZE, SIZE, 3)).astype(np.float32) for _ in boxes]

    @pipeline_def(batch_size=len(boxes), num_threads=2, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: normalised, batch=True, layout="HWC")
        anchor = fn.external_source(source=lambda: [b[:2].astype(np.float32) for b in boxes], batch=True)
        shape = fn.external_source(source=lambda: [b[2:].astype(np.float32) for b in boxes], batch=True)
        return dali_augment.erase(x, anchor, shape)

    p = pipe()
    p.build()
    for image, box, out in zip(normalised, boxes, p.run()[0], strict=True):
        theirs = erase(torch.from_numpy(image.copy()).permute(2, 0, 1), box).permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(out), theirs)
        assert (theirs == 0).all(-1).sum() == box[2] * box[3]


# ---------------------------------------------------------------- the draws: torchvision's, from (seed, epoch, id)

class Draws:
    """A stand-in for ``torch`` inside torchvision's policy modules: its random calls return values taken from
    one sample's uniforms, in the layout of ``pipeline.data.augment``; everything else is torch's."""

    def __init__(self, policy, u):
        self.policy, self.u, self.calls = policy, list(u), 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def randint(self, high, size, **kwargs):
        return torch.tensor([int(v * high) for v in self._take(high)])

    def rand(self, size):
        return torch.tensor(self._take(None))

    def _take(self, high):
        if self.policy == "ra":  # per op: (op, sign); the sign drawn only for a signed op
            if high != 2:
                self.calls += 1
            return [self.u[2 * (self.calls - 1) + (high == 2)]]
        if self.policy == "ta_wide":  # op, bin (an op with bins), sign (a signed op)
            slot = 2 if high == 2 else self.calls
            self.calls += high != 2
            return [self.u[slot]]
        taken = {25: [0], None: [1, 2], 2: [3, 4]}[high]  # imagenet: sub-policy, two probabilities, two signs
        return [self.u[k] for k in taken]


@pytest.mark.parametrize("policy", ["ra", "ta_wide", "imagenet"])
def test_drawn_ops_are_what_torchvision_chooses_from_the_same_numbers(policy, monkeypatch):
    spec = AugmentSpec(policy, image_size=SIZE)
    ids = np.arange(300)
    aug = draw(spec, 5, 2, ids)
    u = keyed_uniforms(5, OPS_SALT, 2, ids, op_draws(spec))
    image = Image.new("RGB", (SIZE, SIZE))
    applied = []
    monkeypatch.setattr(tv_autoaugment, "_apply_op", lambda img, name, m, **kw: applied.append((name, m)) or img)
    for i in ids:
        applied.clear()
        monkeypatch.setattr(tv_autoaugment, "torch", Draws(policy, u[i]))
        TORCHVISION[policy]()(image)
        ours = [(OP_NAMES[c], m) for c, m in zip(aug.op[i].tolist(), aug.magnitude[i].tolist(), strict=True)]
        if policy == "imagenet":  # an op its probability skips is an Identity slot here, absent there
            ours = [op for op in ours if op[0] != "Identity"]
        assert ours == applied, i


@pytest.mark.parametrize("policy", ["ra", "ta_wide", "imagenet"])
def test_draws_reach_every_op_and_bin_with_balanced_signs(policy):
    spec = AugmentSpec(policy, image_size=SIZE)
    aug = draw(spec, 0, 0, np.arange(20000))
    space = augmentation_space(policy, 31, SIZE)
    names = [OP_NAMES[c] for c in aug.op.ravel()]
    if policy == "imagenet":  # the sub-policies' ops, and Identity for one a probability skips
        assert set(names) == {name for pair in IMAGENET_POLICY for name, _, _ in pair} | {"Identity"}
    else:
        assert set(names) == set(space)
    for name, (values, signed) in space.items():
        drawn = aug.magnitude.ravel()[[n == name for n in names]]
        assert set(np.abs(drawn)) <= set(np.abs(np.atleast_1d(values))), name
        if policy == "ta_wide" and values.ndim:
            assert set(np.abs(drawn)) == set(np.abs(values)), name  # every bin
        nonzero = drawn[drawn != 0]
        if signed and len(nonzero) > 200:
            assert abs((nonzero < 0).mean() - 0.5) < 0.06, name
        elif not signed:
            assert (drawn >= 0).all(), name


def test_autoaugment_applies_each_op_with_its_probability():
    spec = AugmentSpec("imagenet", image_size=SIZE)
    aug = draw(spec, 0, 0, np.arange(40000))
    u = keyed_uniforms(0, OPS_SALT, 0, np.arange(40000), op_draws(spec))
    first_of_first_policy = np.floor(u[:, 0] * 25) == 0  # ("Posterize", 0.4, 8)
    assert abs((aug.op[first_of_first_policy, 0] != 0).mean() - 0.4) < 0.05


def test_draws_depend_on_seed_epoch_and_id_only():
    spec = AugmentSpec("ra", erase=0.5, image_size=SIZE)
    ids = np.random.default_rng(0).permutation(500)
    whole = draw(spec, 3, 7, ids)
    parts = [draw(spec, 3, 7, part) for part in np.array_split(ids, [1, 17, 300])]  # any batch split, any order
    for field in range(3):
        np.testing.assert_array_equal(np.concatenate([p[field] for p in parts]), whole[field])
    other_epoch, other_seed = draw(spec, 3, 8, ids), draw(spec, 4, 7, ids)
    for other in (other_epoch, other_seed):
        assert (other.op != whole.op).mean() > 0.5 and (other.box != whole.box).any(1).mean() > 0.3


def test_augmentation_draws_share_no_number_with_the_crop_windows():
    ids = np.arange(3000)
    crop = uniforms(0, 1, ids, 2 * ATTEMPTS + 3)  # the windows' draws
    policy = keyed_uniforms(0, OPS_SALT, 1, ids, op_draws(AugmentSpec("ra")))
    boxes = keyed_uniforms(0, ERASE_SALT, 1, ids, 23)
    assert not np.intersect1d(crop, policy).size and not np.intersect1d(crop, boxes).size
    assert not np.intersect1d(policy, boxes).size


class Erasing(Draws):
    """``torch`` inside torchvision's transforms module, for RandomErasing: the coin, then per attempt an area
    and an aspect, then top and left; in float64."""

    def __init__(self, u):
        super().__init__("erase", u)
        self.uniform_calls, self.randint_calls = 0, 0

    def tensor(self, data, **kwargs):
        return torch.tensor(data, dtype=kwargs.pop("dtype", torch.float64), **kwargs)

    def rand(self, shape):
        return torch.tensor([self.u[0]])

    def empty(self, *shape):
        k = self.uniform_calls
        self.uniform_calls += 1
        u = self.u[1 + k // 2 + 10 * (k % 2)]
        return types.SimpleNamespace(uniform_=lambda lo, hi: torch.tensor(float(lo) + (float(hi) - float(lo)) * u,
                                                                          dtype=torch.float64))

    def randint(self, low, high, size):
        self.randint_calls += 1
        return torch.tensor([low + int(self.u[20 + self.randint_calls] * (high - low))])


def test_erase_boxes_are_torchvisions_random_erasing_from_the_same_numbers(monkeypatch):
    ids = np.arange(2000)
    boxes = erase_boxes(0.5, 1, 3, ids, SIZE)
    u = keyed_uniforms(1, ERASE_SALT, 3, ids, 23)
    erasing = RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)
    for i in ids:
        monkeypatch.setattr(tv_transforms, "torch", Erasing(u[i]))
        erased = (erasing(torch.ones(3, SIZE, SIZE)) == 0).all(0).numpy()
        top, left, height, width = boxes[i]
        ours = np.zeros((SIZE, SIZE), bool)
        ours[top:top + height, left:left + width] = True
        assert np.array_equal(erased, ours), i
    area = boxes[:, 2] * boxes[:, 3] / SIZE**2
    aspect = boxes[:, 2] / np.maximum(boxes[:, 3], 1)
    done = boxes[:, 2] > 0
    assert abs(done.mean() - 0.5) < 0.04
    assert (area[done] > 0.015).all() and (area[done] < 0.36).all() and (aspect[done] < 3.9).all()


def test_bad_boxes_are_refused_before_dali_sees_them():
    aug = Augmentation(np.zeros((1, 0), np.int32), np.zeros((1, 0)), np.array([[60, 0, 10, 10]], np.int32))
    with pytest.raises(ValueError, match="outside a 64x64 image"):
        check_augmentation(aug, SIZE)


# ---------------------------------------------------------------- the loaders

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from pipeline.data.imagenet import verify

    root = write_synthetic_imagenet(tmp_path_factory.mktemp("data") / "tree", num_classes=10, train_per_class=7,
                                    val_per_class=2, min_side=30, max_side=80)
    verify(root, workers=2)
    return root


def first_batch(tree, backend, epoch=1, **overrides):
    words = [f"data.root={tree}", f"data.backend={backend}", "data.image_size=32", "data.workers=1",
             "model.num_classes=10", *[f"{k}={v}" for k, v in overrides.items()]]
    train, _ = build_loaders(load_config(None, words), DistInfo(0, 1, 0, torch.device("cpu")), 16)
    train.set_epoch(epoch)
    return next(iter(train))[0]


PROGRESSIVE = {"data.progressive.enabled": "true", "data.progressive.min_size": 16, "data.progressive.max_size": 32,
               "data.progressive.start_epoch": 0, "data.progressive.end_epoch": 2, "data.progressive.step": 8}


@pytest.mark.parametrize("epoch, size", [(0, 16), (1, 24), (2, 32)])
def test_both_loaders_give_the_same_batch_with_repeats_augmentation_and_the_epochs_size(tree, epoch, size):
    on = {"data.auto_augment": "ta_wide", "data.random_erase": 0.25, "data.aug_repeats": 2, **PROGRESSIVE}
    dali_batch, folder = (first_batch(tree, backend, epoch, **on) for backend in ("dali", "torchvision"))
    assert dali_batch.shape == folder.shape == (16, 3, size, size)
    erased = (folder == 0).all(1, keepdim=True)
    assert torch.equal((dali_batch == 0).all(1, keepdim=True), erased)
    assert (dali_batch - folder).abs().mean().item() < 0.05
    # the batch holds 8 samples twice (copies in its two halves), each copy cropped and augmented on its own
    assert all((folder[k] - folder[k + 8]).abs().mean() > 0.05 for k in range(8))


@pytest.mark.parametrize("policy", ["ra", "ta_wide", "imagenet", "none"])
def test_both_loaders_give_the_same_augmented_batch(tree, policy):
    on = {"data.auto_augment": policy, "data.random_erase": 0.25}
    dali_batch, folder = first_batch(tree, "dali", **on), first_batch(tree, "torchvision", **on)
    plain = first_batch(tree, "torchvision")
    erased = (folder == 0).all(1, keepdim=True)
    assert erased.any() and torch.equal((dali_batch == 0).all(1, keepdim=True), erased)  # the same boxes, exactly
    # different resamplers before the ops (as without augmentation: < 0.05), the same ops after them; AutoAugment's
    # ImageNet policy equalizes often, by another table in DALI
    assert (dali_batch - folder).abs().mean().item() < (0.1 if policy == "imagenet" else 0.05)
    if policy == "none":  # erasing alone: the rest of each image as it was
        assert torch.equal(folder.masked_fill(erased, 0), plain.masked_fill(erased, 0))
    else:
        assert (plain - folder).abs().mean().item() > 0.2  # the ops changed the images
