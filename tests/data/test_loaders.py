"""Both real loaders (DALI and torchvision) over real JPEG files, as each rank of a world would see them."""

from collections import Counter

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.files import scan_split
from pipeline.data.loaders import build_loaders
from pipeline.data.synthetic import class_names, write_synthetic_imagenet
from pipeline.distributed import DistInfo

BACKENDS = ["dali", "torchvision"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_synthetic_imagenet(tmp_path_factory.mktemp("data") / "tree", num_classes=10, train_per_class=7,
                                    val_per_class=5, min_side=20, max_side=60)


def config(tree, backend, **overrides):
    words = [f"data.root={tree}", f"data.backend={backend}", "data.image_size=24", "data.workers=1",
             "model.num_classes=10", *[f"{k}={v}" for k, v in overrides.items()]]
    return load_config(None, words)


def rank(r, world):
    return DistInfo(rank=r, world_size=world, local_rank=r, device=torch.device("cpu"))


def labels_of(loader, epoch=0):
    loader.set_epoch(epoch)
    return [labels for _, labels in loader]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_are_normalised_channels_last_at_the_training_size(tree, backend):
    train, val = build_loaders(config(tree, backend), rank(0, 1), 4)
    for loader in (train, val):
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.max() < 10
        assert -3 < images.mean().item() < 3 and images.std().item() > 0.1


def test_channels_last_off_gives_contiguous_nchw(tree):
    train, _ = build_loaders(config(tree, "dali", **{"train.channels_last": "false"}), rank(0, 1), 4)
    images, _ = next(iter(train))
    assert images.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_read_each_training_image_once_per_epoch(tree, backend, world):
    cfg = config(tree, backend)
    per_rank = 4
    steps = 70 // (world * per_rank)
    all_labels = Counter()
    for r in range(world):
        train, _ = build_loaders(cfg, rank(r, world), per_rank)
        batches = labels_of(train)
        assert len(batches) == len(train) == steps and all(b.numel() == per_rank for b in batches)
        all_labels.update(torch.cat(batches).tolist())
    assert sum(all_labels.values()) == steps * world * per_rank
    assert all(count <= 7 for count in all_labels.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_batch_mixes_classes_and_epochs_differ(tree, backend):
    train, _ = build_loaders(config(tree, backend), rank(0, 1), 8)
    epoch0, epoch1 = labels_of(train, 0), labels_of(train, 1)
    assert len(set(epoch0[0].tolist())) >= 5
    assert [b.tolist() for b in epoch0] != [b.tolist() for b in epoch1]
    assert labels_of(train, 0)[0].tolist() == epoch0[0].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_counts_every_image_once_whatever_the_world_size(tree, backend, world):
    cfg = config(tree, backend)
    labels = []
    for r in range(world):
        _, val = build_loaders(cfg, rank(r, world), 4, train=False)
        labels += torch.cat(labels_of(val)).tolist()
    assert labels == scan_split(tree / "val", class_names(10)).labels


def test_dali_and_torchvision_validation_crops_agree(tree):
    _, dali = build_loaders(config(tree, "dali"), rank(0, 1), 4, train=False)
    _, folder = build_loaders(config(tree, "torchvision"), rank(0, 1), 4, train=False)
    a, b = next(iter(dali))[0], next(iter(folder))[0]
    # different resamplers, the same geometry: the crops match closely on average
    assert (a - b).abs().mean().item() < 0.25
