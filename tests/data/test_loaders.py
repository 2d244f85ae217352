"""Both real loaders (DALI and torchvision) over real JPEG files, as each rank of a world would see them."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, load_config
from pipeline.data.imagenet import verify
from pipeline.data.index import load_index
from pipeline.data.loaders import build_loaders
from pipeline.data.order import epoch_order, train_steps
from pipeline.data.synthetic import class_names, write_synthetic_imagenet
from pipeline.data.views import Views
from pipeline.distributed import DistInfo

BACKENDS = ["dali", "torchvision"]
PER_CLASS = 7


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_synthetic_imagenet(tmp_path_factory.mktemp("data") / "tree", num_classes=10, train_per_class=7,
                                    val_per_class=5, min_side=20, max_side=60)


@pytest.fixture(scope="module")
def id_tree(tmp_path_factory):
    """Each image one solid colour that encodes its class and number: any crop of it tells which file it is."""
    root = tmp_path_factory.mktemp("ids") / "tree"
    rng = np.random.default_rng(0)
    for split, count in (("train", PER_CLASS), ("val", 3)):
        for c, wnid in enumerate(class_names(10)):
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(20, 70)), int(rng.integers(20, 70)))
                Image.new("RGB", size, (20 + 20 * c, 30 + 25 * i, 128)).save(root / split / wnid / f"{i}.JPEG",
                                                                          quality=100)
    verify(root, workers=2)
    return root


def identities(images):
    """(class, number) of each image of a batch, from its mean colour."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = ((images * std + mean) * 255).mean(dim=(2, 3))
    return [(round((r - 20) / 20), round((g - 30) / 25)) for r, g, _ in rgb.tolist()]


def name_identity(name):
    """(class, number) of ``train/<wnid>/<number>.JPEG``."""
    _, wnid, file = name.split("/")
    return class_names(10).index(wnid), int(file.split(".")[0])


def config(tree, backend, **overrides):
    words = [f"data.root={tree}", f"data.backend={backend}", "data.image_size=24", "data.workers=1",
             "model.num_classes=10", *[f"{k}={v}" for k, v in overrides.items()]]
    return load_config(None, words)


def rank(r, world):
    return DistInfo(rank=r, world_size=world, local_rank=r, device=torch.device("cpu"))


def batches(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


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
def test_ranks_together_read_each_training_file_once_per_epoch_by_identity(id_tree, backend, world):
    cfg = config(id_tree, backend)
    per_rank, epoch = 4, 1
    index = load_index(id_tree)
    steps = train_steps(70, world * per_rank)
    order = epoch_order(70, epoch, cfg.run.seed, world * per_rank)
    expected = [name_identity(index.splits["train"].name(i)) for i in order]
    read = []
    for r in range(world):
        train, _ = build_loaders(cfg, rank(r, world), per_rank)
        got = batches(train, epoch)
        assert len(got) == len(train) == steps and all(labels.numel() == per_rank for _, labels in got)
        for step, (images, labels) in enumerate(got):
            ids = identities(images)
            assert [c for c, _ in ids] == labels.tolist()
            read.append((step, r, ids))
    in_global_order = [i for _, _, ids in sorted(read) for i in ids]
    assert in_global_order == expected  # each file once, where the epoch's global order puts it
    assert len(set(in_global_order)) == steps * world * per_rank


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_batch_mixes_classes_and_epochs_differ(tree, backend):
    train, _ = build_loaders(config(tree, backend), rank(0, 1), 8)
    epoch0, epoch1 = batches(train, 0), batches(train, 1)
    assert len(set(epoch0[0][1].tolist())) >= 5
    assert [b.tolist() for _, b in epoch0] != [b.tolist() for _, b in epoch1]
    again = batches(train, 0)[0]
    assert torch.equal(again[0], epoch0[0][0]) and torch.equal(again[1], epoch0[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_counts_every_image_once_whatever_the_world_size(id_tree, backend, world):
    cfg = config(id_tree, backend)
    read = []
    for r in range(world):
        _, val = build_loaders(cfg, rank(r, world), 4, train=False)
        passes = [[i for images, _ in val for i in identities(images)] for _ in range(2)]
        assert passes[0] == passes[1]  # a second pass reads the same
        read += passes[0]
    assert read == [(c, i) for c in range(10) for i in range(3)]


def test_dali_and_torchvision_draw_the_same_crop_windows(tree):
    first = {}
    for backend in BACKENDS:
        train, _ = build_loaders(config(tree, backend, **{"data.image_size": 32}), rank(0, 1), 8)
        first[backend] = batches(train, 1)[0][0]
    dali, folder = first["dali"], first["torchvision"]
    # different resamplers, the same windows: the crops agree closely; a flip or another window would not
    assert (dali - folder).abs().mean().item() < 0.05
    assert (dali - folder.flip(-1)).abs().mean().item() > 0.1


def test_dali_and_torchvision_validation_crops_agree(tree):
    _, dali = build_loaders(config(tree, "dali"), rank(0, 1), 4, train=False)
    _, folder = build_loaders(config(tree, "torchvision"), rank(0, 1), 4, train=False)
    a, b = next(iter(dali))[0], next(iter(folder))[0]
    assert (a - b).abs().mean().item() < 0.05


def test_torchvision_workers_send_uint8_and_the_batch_is_normalised_and_erased_where_it_lands(tree):
    cfg = config(tree, "torchvision", **{"data.random_erase": 1.0})
    train, _ = build_loaders(cfg, rank(0, 1), 8)
    train.set_epoch(0)
    raw, _, _, boxes = next(iter(train.loader))  # what the workers send
    assert raw.dtype == torch.uint8 and raw.shape == (8, 24, 24, 3) and (boxes[:, 2] > 0).all()
    images, _ = next(iter(train))
    mean, std = (255 * torch.tensor(v) for v in (IMAGENET_MEAN, IMAGENET_STD))
    expected = ((raw.float() - mean) / std).permute(0, 3, 1, 2).clone()
    for image, (top, left, height, width) in zip(expected, boxes.tolist(), strict=True):
        image[:, top:top + height, left:left + width] = 0  # torchvision's RandomErasing(value=0), after normalising
    assert images.is_contiguous(memory_format=torch.channels_last) and torch.equal(images, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_ranks_own_loader_and_mixer_give_the_same_global_batches_at_world_sizes_1_2_and_3(tree, backend):
    """The README's "a global batch's samples and crops depend on nothing else: not the world size": every rank
    builds its own loader (its own plan) and mixer, and the decoded, augmented, erased and mixed tensors of each
    global batch, gathered in rank order, are bitwise the same at 1, 2 and 3 ranks."""
    from pipeline.mix import BatchMixer

    cfg = config(tree, backend, **{"data.auto_augment": "ra", "data.random_erase": 0.5, "data.aug_repeats": 2,
                                   "train.mix.mixup_alpha": 0.8, "train.mix.cutmix_alpha": 1.0,
                                   "train.mix.mode": "pair"})
    global_batch, epoch = 12, 1
    per_world = []
    for world in (1, 2, 3):
        parts = []  # per rank: per step (images, mixed images, soft targets)
        for r in range(world):
            train, _ = build_loaders(cfg, rank(r, world), global_batch // world)
            mixer = BatchMixer(cfg.train.mix, cfg.run.seed, r, global_batch // world, world, 10)
            parts.append([(images, *mixer(images, labels, epoch, step))
                          for step, (images, labels) in enumerate(batches(train, epoch))])
            train.close()
        per_world.append([[torch.cat(column) for column in zip(*steps, strict=True)]
                          for steps in zip(*parts, strict=True)])
    assert len(per_world[0]) == train_steps(70, global_batch) == 5
    for world, batches_at in zip((2, 3), per_world[1:], strict=True):
        for step, (ours, alone) in enumerate(zip(batches_at, per_world[0], strict=True)):
            for name, a, b in zip(("images", "mixed images", "soft targets"), ours, alone, strict=True):
                assert torch.equal(a, b), (f"{backend}: global batch {step} of epoch {epoch}, {name}, differs at "
                                           f"{world} ranks from 1 rank, first at sample "
                                           f"{int((a != b).flatten(1).any(1).nonzero()[0])}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_views_come_image_by_image_each_image_once_whatever_the_world_size(id_tree, backend, world):
    views = Views(resize=30, size=24, crops=10)
    read = []
    for r in range(world):
        _, val = build_loaders(config(id_tree, backend), rank(r, world), 4, train=False, views=views)
        for images, labels in val:
            assert images.shape == (10 * len(labels), 3, 24, 24)
            seen = identities(images)
            read += seen[::10]
            assert seen == [s for s in seen[::10] for _ in range(10)]  # an image's ten views, then the next's
    assert read == [(c, i) for c in range(10) for i in range(3)]


def test_dali_and_torchvision_cut_the_same_views_of_their_resized_images(tree):
    views = Views(resize=40, size=24, crops=10)
    batch = {}
    for backend in BACKENDS:
        _, val = build_loaders(config(tree, backend), rank(0, 1), 4, train=False, views=views)
        batch[backend] = next(iter(val))[0]
    dali, folder = batch["dali"], batch["torchvision"]
    assert (dali - folder).abs().mean().item() < 0.05  # different resamplers, the same windows
    assert (dali - folder.roll(1, 0)).abs().mean().item() > 0.1  # another view would not agree
