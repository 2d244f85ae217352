"""Every random generator a training step could draw from (Python's, numpy's, torch's on the CPU and CUDA, DALI's):
each is saved in the checkpoint and restored, or shown not to change the step.

A step here is the run's: the first batch of the loader (crop, flip, RandAugment, random erasing), mixed (mixup,
CutMix), through a DenseNet-BC with dropout, and an SGD step. A generator "used" is one whose state, changed before
the step, changes it; "restored" means the state saved with the checkpoint's ``rng_state()`` and loaded back
(``weights_only=True``) gives the step again, bitwise.
"""

import random

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.checkpoint import rng_state, set_rng_state
from pipeline.config import load_config
from pipeline.data.loaders import build_loaders
from pipeline.data.synthetic import write_synthetic_imagenet
from pipeline.distributed import DistInfo
from pipeline.engine import build_scaler, train_step
from pipeline.mix import BatchMixer
from pipeline.optim import build_optimizer
from pipeline.train import build_net, seed_everything

BACKENDS = ["dali", "torchvision"]
BATCH = 8
CPU = torch.device("cpu")
# each generator as a test changes it: seeded anew, on its own (torch.manual_seed would seed CUDA's too)
DISTURB = {
    "python": lambda: random.seed(12345),
    "numpy": lambda: np.random.seed(12345),
    "torch": lambda: torch.default_generator.manual_seed(12345),
    "cuda": lambda: torch.cuda.manual_seed_all(12345),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_synthetic_imagenet(tmp_path_factory.mktemp("data") / "tree", num_classes=10, train_per_class=2,
                                    val_per_class=1, min_side=20, max_side=48)


def config(tree, backend):
    return load_config(None, [
        f"data.root={tree}", f"data.backend={backend}", "data.image_size=24", "data.workers=1",
        "data.auto_augment=ra", "data.random_erase=0.5", "train.mix.mixup_alpha=0.8", "train.mix.cutmix_alpha=1.0",
        "model.name=densenet_bc", "model.depth=10", "model.num_classes=10", "model.drop_rate=0.3"])


def one_step(tree, backend, device, prepare):
    """The run's first step after ``prepare()`` sets the generators (the model's weights come from a fixed seed
    first): the batch it trained on, its loss and the weights after it, on the CPU."""
    cfg = config(tree, backend)
    train, val = build_loaders(cfg, DistInfo(0, 1, device.index or 0, device), BATCH)
    torch.manual_seed(0)
    model = build_net(cfg.model, device, True, 1)
    optimizer = build_optimizer(model, cfg.optim, BATCH)
    mixer = BatchMixer(cfg.train.mix, cfg.run.seed, 0, BATCH, 1, 10)
    prepare()
    try:
        train.set_epoch(0)
        images, labels = next(iter(train))
        images, targets = mixer(images, labels, 0, 0)
        step = train_step(model, images, targets, nn.CrossEntropyLoss(), optimizer, build_scaler(device, "fp32"),
                          "fp32")
    finally:
        train.close()
        val.close()
    return [images.cpu(), step.loss.cpu(), *(p.detach().cpu() for p in model.parameters())]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def baseline(tree, tmp_path_factory):
    """Per (backend, device): the step from seeded generators, and the step after restoring those generators from
    a checkpoint file (written, then read back as a resume reads it), made once for the tests of the module."""
    made = {}

    def get(backend, device):
        if (backend, str(device)) not in made:
            seed_everything(1)
            path = tmp_path_factory.mktemp("rng") / "checkpoint.pt"
            torch.save({"ranks": [{"rng": rng_state()}]}, path)
            saved = torch.load(path, weights_only=True)["ranks"][0]["rng"]
            made[backend, str(device)] = (one_step(tree, backend, device, lambda: seed_everything(1)),
                                          one_step(tree, backend, device, lambda: set_rng_state(saved)))
        return made[backend, str(device)]

    return get


def check_generator(tree, baseline, backend, device, generator, used):
    reference, restored = baseline(backend, device)
    repeated = same(restored, reference)
    assert repeated, "the step after restoring the checkpoint's generators differs"
    disturbed = one_step(tree, backend, device, lambda: (seed_everything(1), DISTURB[generator]()))
    unchanged = same(disturbed, reference)
    if used:
        assert not unchanged, f"{generator}'s state does not change the step: is dropout on?"
    else:
        assert unchanged, f"{backend}: the step draws from {generator}'s global generator"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("generator, used", [("python", False), ("numpy", False), ("torch", True)])
def test_each_global_generator_is_restored_from_the_checkpoint_or_leaves_the_step_unchanged(tree, baseline, backend,
                                                                                            generator, used):
    check_generator(tree, baseline, backend, CPU, generator, used)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("generator, used", [("cuda", True), ("torch", False), ("python", False), ("numpy", False)])
def test_on_a_gpu_cudas_generator_drives_dropout_and_is_restored_and_the_others_leave_the_step_unchanged(
        tree, baseline, backend, generator, used):
    check_generator(tree, baseline, backend, torch.device("cuda", 0), generator, used)


@pytest.mark.parametrize("backend", BACKENDS)
def test_iterating_the_loaders_leaves_the_global_generators_as_they_were(tree, backend):
    """A loader that drew from torch's global generator (a DataLoader iterator drawing its workers' seed) would
    shift dropout's draws after a resume, where the iterator is made after the generators are restored."""
    train, val = build_loaders(config(tree, backend), DistInfo(0, 1, 0, CPU), BATCH)
    before = rng_state()
    for epoch in (0, 1):
        train.set_epoch(epoch)
        assert len(list(train)) == len(train) and len(list(val)) == len(val)
    after = rng_state()
    train.close()
    val.close()
    assert torch.equal(after["torch"], before["torch"]), f"{backend}: the loaders drew from torch's generator"
    assert after["python"] == before["python"] and torch.equal(after["numpy"][1], before["numpy"][1])


def test_dalis_own_seed_leaves_the_batches_unchanged(tree):
    """DALI's generator is not in the checkpoint: every random choice reaches DALI as data (windows, flips, ops,
    erase boxes), so the pipeline's seed changes nothing."""
    from pipeline.data.augment import augment_spec
    from pipeline.data.dali import build_dali_loaders
    from pipeline.data.loaders import dataset_index
    from pipeline.data.order import TrainPlan, train_image_size
    from pipeline.data.samples import SampleBytes

    cfg = config(tree, "dali")
    index = dataset_index(cfg, DistInfo(0, 1, 0, CPU))
    split = index.splits["train"]
    seen = []
    for seed in (0, 987654):
        plan = TrainPlan(split.width, split.height, cfg.run.seed, 0, 1, BATCH, augment_spec(cfg.data),
                         image_size=lambda epoch: train_image_size(cfg.data, epoch))
        train, val = build_dali_loaders(cfg.data, plan, SampleBytes(tree, index, "train"),
                                        SampleBytes(tree, index, "val"), range(10), BATCH, CPU, True, seed=seed)
        train.set_epoch(1)
        seen.append([images for images, _ in train])
        train.close()
        val.close()
    assert len(seen[0]) == 2 and all(torch.equal(a, b) for a, b in zip(*seen, strict=True))
