"""Mixup and CutMix: torchvision's results for the same lambda and box, and the same global batch at any world
size, seen from each rank's own mixer."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms import v2

from pipeline.config import ConfigError, load_config
from pipeline.distributed import DistInfo
from pipeline.mix import BatchMixer, MixParams, cutmix_box, mix, mix_params
from pipeline.train import check_batch_settings

NUM_CLASSES = 10


def mix_config(**overrides):
    return OmegaConf.merge(load_config(None).train.mix, overrides)


def batch(size, height=12, width=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 3, height, width, generator=generator),
            torch.randint(0, NUM_CLASSES, (size,), generator=generator))


def test_mixup_equals_torchvisions_for_the_same_lambda():
    images, labels = batch(2)
    lam = 0.3
    mixup = v2.MixUp(alpha=0.2, num_classes=NUM_CLASSES)
    params = {"lam": lam, "labels": labels, "batch_size": 2}
    # for two images torchvision's roll(1) pairs them as we do (0 with 1)
    ours = mix(images, labels, MixParams(np.full(2, lam), np.full(2, lam), np.zeros((2, 4), np.int64)), NUM_CLASSES)
    assert torch.equal(ours[0], mixup.transform(images, params))
    assert torch.equal(ours[1], mixup.transform(labels, params))


class Draws:
    """Stands for torchvision's Beta distribution and torch.randint: returns the given values in turn."""

    def __init__(self, *values):
        self.values = iter(values)

    def sample(self, *args, **kwargs):
        return torch.tensor(next(self.values))

    def randint(self, *args, **kwargs):
        return torch.tensor([next(self.values)])


def test_cutmix_box_and_targets_equal_torchvisions_for_the_same_lambda_and_centre(monkeypatch):
    images, labels = batch(2, height=12, width=16)
    cutmix = v2.CutMix(alpha=1.0, num_classes=NUM_CLASSES)
    for lam, cx, cy in [(0.3, 2, 9), (0.7, 15, 0), (0.05, 8, 6), (0.999, 0, 11)]:
        monkeypatch.setattr(cutmix, "_dist", Draws(lam))
        monkeypatch.setattr(torch, "randint", Draws(cx, cy).randint)
        theirs = cutmix.make_params([images])
        monkeypatch.undo()
        box = cutmix_box(np.array([lam]), np.array([(cx + 0.5) / 16]), np.array([(cy + 0.5) / 12]), 12, 16)[0]
        assert tuple(box.tolist()) == theirs["box"]
        area = (box[2] - box[0]) * (box[3] - box[1])
        params = {**theirs, "labels": labels, "batch_size": 2}
        ours = mix(images, labels, MixParams(np.ones(2), np.full(2, 1 - area / (12 * 16)), np.stack([box, box])),
                   NUM_CLASSES)
        assert torch.equal(ours[0], cutmix.transform(images, params))
        assert torch.allclose(ours[1], cutmix.transform(labels, params), rtol=0, atol=1e-7)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_the_mixed_global_batch_is_the_same_at_world_sizes_1_2_and_3_from_each_ranks_own_mixer(mode):
    cfg = mix_config(mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.8, mode=mode)
    images, labels = batch(12)
    results = {}
    for world in (1, 2, 3):
        per_rank = 12 // world
        outputs = [BatchMixer(cfg, seed=5, rank=r, per_rank_batch=per_rank, world_size=world,
                              num_classes=NUM_CLASSES)(images[r * per_rank:(r + 1) * per_rank],
                                                       labels[r * per_rank:(r + 1) * per_rank], epoch=2, step=7)
                   for r in range(world)]
        results[world] = tuple(torch.cat(parts) for parts in zip(*outputs, strict=True))
    for world in (2, 3):
        assert torch.equal(results[world][0], results[1][0]), world
        assert torch.equal(results[world][1], results[1][1]), world
    assert not torch.equal(results[1][0], images)  # it mixed


def draws(mode, steps=400, size=8, **overrides):
    cfg = mix_config(**{"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mode": mode, **overrides})
    return [mix_params(cfg, 0, 0, s, np.arange(size), size, 32, 32) for s in range(steps)]


def test_the_modes_share_draws_over_the_batch_a_pair_or_nothing():
    for params in draws("batch", steps=20):
        assert len(set(params.target_lam.tolist())) == 1
    for params in draws("pair", steps=20):
        assert np.array_equal(params.target_lam[0::2], params.target_lam[1::2])
    elem = draws("elem", steps=20)
    assert any(not np.array_equal(p.target_lam[0::2], p.target_lam[1::2]) for p in elem)


def test_the_draws_follow_the_probabilities_and_beta_distributions():
    params = draws("elem", steps=500, prob=0.8, switch_prob=0.5)
    mixed_up = np.concatenate([p.mixup_lam for p in params])
    boxes = np.concatenate([p.boxes for p in params])
    cut = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    untouched = (mixed_up == 1) & ~cut
    n = len(mixed_up)
    assert abs(untouched.mean() - 0.2) < 0.03  # 1 - prob (a CutMix box can be empty too: rare)
    assert abs(cut.mean() - 0.4) < 0.03 and abs((mixed_up < 1).mean() - 0.4) < 0.03
    lams = mixed_up[mixed_up < 1]  # Beta(0.2, 0.2): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.179
    assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 1 / (4 * 1.4)) < 0.02, n


def test_draws_differ_by_step_epoch_and_seed_and_repeat_for_the_same_key():
    cfg = mix_config(mixup_alpha=1.0, mode="elem")
    base = mix_params(cfg, 0, 0, 0, np.arange(8), 8, 32, 32).mixup_lam
    assert np.array_equal(base, mix_params(cfg, 0, 0, 0, np.arange(8), 8, 32, 32).mixup_lam)
    for seed, epoch, step in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        assert not np.array_equal(base, mix_params(cfg, seed, epoch, step, np.arange(8), 8, 32, 32).mixup_lam)


def test_mixing_keeps_channels_last():
    images, labels = batch(4)
    images = images.contiguous(memory_format=torch.channels_last)
    out, _ = BatchMixer(mix_config(mixup_alpha=1.0), 0, 0, 4, 1, NUM_CLASSES)(images, labels, 0, 0)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_mix_settings_are_checked():
    with pytest.raises(ConfigError, match="train.mix.prob"):
        load_config(None, ["train.mix.prob=1.5"])
    with pytest.raises(ConfigError, match="train.mix.mode"):
        load_config(None, ["train.mix.mode=global"])


def test_an_odd_per_rank_batch_is_refused_when_mixing_and_allowed_without():
    three_ranks = DistInfo(0, 3, 0, torch.device("cpu"))
    cfg = load_config(None, ["train.mix.mixup_alpha=0.2", "train.batch_size=33"])
    with pytest.raises(ConfigError, match=r"split a pair .* e.g. train.batch_size=36 \(now 33 over 3"):
        check_batch_settings(cfg, three_ranks, 33, 11, 0.0)
    per_gpu = load_config(None, ["train.mix.mixup_alpha=0.2", "train.batch_size=null", "train.batch_per_gpu=11"])
    with pytest.raises(ConfigError, match=r"e.g. train.batch_per_gpu=12\.$"):
        check_batch_settings(per_gpu, three_ranks, 33, 11, 0.0)
    check_batch_settings(load_config(None, ["train.batch_size=33"]), three_ranks, 33, 11, 0.0)
    check_batch_settings(cfg, three_ranks, 36, 12, 0.0)
