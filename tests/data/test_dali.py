import pytest
import torch

from pipeline.config import load_config
from pipeline.data.dali import build_dali_loaders
from pipeline.data.synthetic import write_synthetic_imagenet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_synthetic_imagenet(tmp_path_factory.mktemp("data") / "tree", num_classes=3, train_per_class=7,
                                    val_per_class=5, min_side=20, max_side=60)


def loaders(tree, batch_size=4, channels_last=True, **overrides):
    words = [f"data.root={tree}", "data.image_size=24", "data.workers=1", "model.num_classes=3"]
    words += [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(None, words)
    return build_dali_loaders(cfg.data, batch_size, rank=0, world_size=1, local_rank=0, device=CPU,
                              channels_last=channels_last, seed=0)


def test_train_batches_are_normalised_channels_last_views_at_the_training_size(tree):
    train, _ = loaders(tree)
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    assert -3 < images.mean().item() < 3 and images.std().item() > 0.1


def test_channels_last_off_gives_contiguous_nchw(tree):
    train, _ = loaders(tree, channels_last=False)
    images, _ = next(iter(train))
    assert images.is_contiguous()


def test_each_epoch_sees_every_training_image_once_with_a_smaller_last_batch(tree):
    train, _ = loaders(tree)
    for _ in range(2):
        sizes = [labels.numel() for _, labels in train]
        assert sum(sizes) == 21 and sizes[-1] == 21 % 4
        assert len(train) == len(sizes) == 6


def test_train_labels_cover_every_class_in_equal_numbers(tree):
    train, _ = loaders(tree)
    labels = torch.cat([lab for _, lab in train])
    assert torch.bincount(labels, minlength=3).tolist() == [7, 7, 7]


def test_val_sees_every_image_once_in_a_fixed_order_with_centre_crops(tree):
    _, val = loaders(tree)
    first = [(images.clone(), labels.clone()) for images, labels in val]
    second = [(images.clone(), labels.clone()) for images, labels in val]
    labels = torch.cat([lab for _, lab in first])
    assert labels.tolist() == sorted(labels.tolist()) and labels.numel() == 15
    for (a, la), (b, lb) in zip(first, second, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert first[0][0].shape[-2:] == (24, 24)

