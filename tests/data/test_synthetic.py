import numpy as np
import torch
from PIL import Image

from pipeline.data.synthetic import RandomBatches, class_names, ensure_generated, write_synthetic_imagenet


def test_tree_has_imagenet_layout_and_decodable_jpegs_of_varied_shapes(tmp_path):
    root = write_synthetic_imagenet(tmp_path / "mini", num_classes=4, train_per_class=6, val_per_class=2)
    assert sorted(p.name for p in (root / "train").iterdir()) == class_names(4)
    assert sorted(p.name for p in (root / "val").iterdir()) == class_names(4)
    files = sorted(root.rglob("*.JPEG"))
    assert len(files) == 4 * (6 + 2)
    shapes = set()
    for f in files:
        with Image.open(f) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            shapes.add(image.size)
    ratios = {round(w / h, 1) for w, h in shapes}
    assert len(shapes) > 10 and min(ratios) < 0.9 and max(ratios) > 1.1


def test_classes_are_separable_by_colour(tmp_path):
    # the mean hue of each class differs: a learnable signal that survives random crops and flips
    root = write_synthetic_imagenet(tmp_path / "mini", num_classes=5, train_per_class=8, val_per_class=1)
    means = []
    for wnid in class_names(5):
        pixels = [np.asarray(Image.open(f)).reshape(-1, 3).mean(0) for f in (root / "train" / wnid).iterdir()]
        means.append(np.mean(pixels, axis=0))
    distances = [np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1:]]
    assert min(distances) > 10


def test_same_seed_writes_the_same_files(tmp_path):
    a = write_synthetic_imagenet(tmp_path / "a", 2, 3, 1, seed=5)
    b = write_synthetic_imagenet(tmp_path / "b", 2, 3, 1, seed=5)
    for fa in sorted(a.rglob("*.JPEG")):
        assert fa.read_bytes() == (b / fa.relative_to(a)).read_bytes()


def test_ensure_generated_leaves_an_existing_tree_alone(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "keep.txt").write_text("mine")

    class Gen:
        train_per_class, val_per_class, min_side, max_side = 1, 1, 16, 16

    ensure_generated(root, 3, Gen, seed=0)
    assert [p.name for p in root.iterdir()] == ["keep.txt"]
    ensure_generated(tmp_path / "new", 3, Gen, seed=0)
    assert len(list((tmp_path / "new").rglob("*.JPEG"))) == 6


def test_random_batches_are_made_once_on_the_device_in_channels_last():
    batches = RandomBatches(4, 16, 10, steps=3, device=torch.device("cpu"), channels_last=True)
    seen = list(batches)
    assert len(seen) == len(batches) == 3
    images, labels = seen[0]
    assert images.shape == (4, 3, 16, 16) and images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.max() < 10
