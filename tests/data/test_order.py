import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from pipeline.config import ConfigError, load_config
from pipeline.data.augment import AugmentSpec
from pipeline.data.order import (
    TrainPlan,
    crop_windows,
    epoch_order,
    rank_batch,
    train_image_size,
    train_steps,
    uniforms,
    val_range,
)


def rank_ids(n, epoch, seed, rank, world, batch):
    order = epoch_order(n, epoch, seed, world * batch)
    return [int(i) for step in range(train_steps(n, world * batch))
            for i in rank_batch(order, step, rank, world, batch)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_epoch_reads_every_sample_at_most_once_and_leaves_out_less_than_a_global_batch(world):
    n, batch = 103, 4
    seen = [i for rank in range(world) for i in rank_ids(n, 0, 7, rank, world, batch)]
    assert len(seen) == len(set(seen))
    assert len(seen) == train_steps(n, world * batch) * world * batch
    assert n - len(seen) == n % (world * batch)


def test_every_rank_runs_the_same_number_of_full_batches():
    assert {len(rank_ids(103, 0, 0, rank, 3, 4)) for rank in range(3)} == {8 * 4}


def test_the_order_changes_every_epoch_and_repeats_for_the_same_seed():
    assert rank_ids(100, 0, 0, 0, 2, 5) != rank_ids(100, 1, 0, 0, 2, 5)
    assert rank_ids(100, 3, 0, 1, 2, 5) == rank_ids(100, 3, 0, 1, 2, 5)
    assert rank_ids(100, 0, 0, 0, 2, 5) != rank_ids(100, 0, 1, 0, 2, 5)


def test_every_sample_is_read_over_a_few_epochs():
    seen = {i for epoch in range(10) for rank in range(3) for i in rank_ids(103, epoch, 0, rank, 3, 4)}
    assert seen == set(range(103))


def test_a_global_batch_mixes_classes_of_a_class_sorted_list():
    labels = [i // 10 for i in range(100)]  # 10 classes, sorted as the folders are
    first_batch = [labels[i] for rank in range(2) for i in rank_ids(100, 0, 0, rank, 2, 8)[:8]]
    assert len(set(first_batch)) >= 5


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_validation_chunks_cover_the_split_exactly_once(world):
    chunks = [list(val_range(101, rank, world)) for rank in range(world)]
    assert sorted(i for chunk in chunks for i in chunk) == list(range(101))
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    assert Counter(i for chunk in chunks for i in chunk).most_common(1)[0][1] == 1


def global_batches(plan_at_world, epoch, steps):
    """Per step: the global batch's ids, windows, ops and erase boxes, each rank's part from its own plan."""
    out = []
    for step in range(steps):
        parts = []
        for plan in plan_at_world:
            ids, keys = plan.ids(epoch, step), plan.keys(epoch, step)
            aug = plan.augmentation(epoch, keys)
            parts.append((ids, *plan.windows(epoch, ids, keys), *(aug or ())))
        out.append([np.concatenate(column).tolist() for column in zip(*parts, strict=True)])
    return out


@pytest.mark.parametrize("repeats", [1, 3])
@pytest.mark.parametrize("augment", [None, "ra"])
def test_global_batches_hold_the_same_samples_crops_and_ops_at_world_sizes_1_2_and_3_from_each_ranks_plan(
        repeats, augment):
    rng = np.random.default_rng(0)
    widths, heights = rng.integers(16, 500, 200), rng.integers(16, 500, 200)
    spec = AugmentSpec(augment, 2, 9, 31, 0.5, 32) if augment else None
    results = []
    for world in (1, 2, 3):
        plans = [TrainPlan(widths, heights, 5, r, world, 12 // world, spec, repeats) for r in range(world)]
        results.append(global_batches(plans, epoch=2, steps=plans[0].steps))
    assert results[0] == results[1] == results[2]
    assert len(results[0]) == 200 // 12


def test_repeated_augmentation_puts_each_sample_k_times_in_its_batch_with_a_crop_per_copy():
    rng = np.random.default_rng(1)
    widths, heights = rng.integers(100, 500, 300), rng.integers(100, 500, 300)
    spec = AugmentSpec("ta_wide", 2, 9, 31, 0.0, 64)
    plan = TrainPlan(widths, heights, 5, 0, 1, 24, spec, repeats=3)
    assert plan.steps == 300 // 24  # the epoch keeps its number of steps, as torchvision's RASampler
    seen, pairs = [], []
    for step in range(plan.steps):
        ids, keys = plan.ids(1, step), plan.keys(1, step)
        first, second, third = ids[:8], ids[8:16], ids[16:]
        assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(third.tolist())
        assert len(set(first.tolist())) == 8
        assert keys.tolist() == [i * 3 + k // 8 for k, i in enumerate(ids)]
        windows = plan.windows(1, ids, keys)
        at = {(int(i), int(k) // 8): k for k, i in enumerate(ids)}  # (sample, copy) -> position
        for i in first:  # a crop and ops per copy
            assert len({(windows.x[at[i, c]], windows.y[at[i, c]], windows.w[at[i, c]]) for c in range(3)}) == 3
        ops = plan.augmentation(1, keys).op
        assert any(not np.array_equal(ops[at[i, 0]], ops[at[i, 1]]) for i in first)
        pairs += [tuple(sorted(ids[p:p + 2].tolist())) for p in range(0, 24, 2)]  # who is mixed with whom
        seen += first.tolist()
    assert len(seen) == len(set(seen)) == plan.steps * 8  # a third of the epoch's samples, each once
    # each copy has its own order: a sample's copies meet other neighbours (mixup pairs (2k, 2k + 1))
    assert len(set(pairs)) > 0.8 * len(pairs)
    # no repeats: the order and the windows of earlier versions
    plain = TrainPlan(widths, heights, 5, 0, 1, 24)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(5 * 1_000_003 + 1))[:plan.steps * 24]
    assert plain.order(1).tolist() == order.tolist() and plain.keys(1, 0).tolist() == plain.ids(1, 0).tolist()


def test_the_training_size_follows_ffcvs_schedule_and_sizes_that_cannot_work_are_refused():
    cfg = load_config(None, ["data.progressive.enabled=true", "data.progressive.min_size=160",
                             "data.progressive.max_size=192", "data.progressive.start_epoch=10",
                             "data.progressive.end_epoch=13"])
    # FFCV's get_resolution: np.interp between the ramp's ends, rounded to a multiple of 32
    assert [train_image_size(cfg.data, e) for e in range(9, 15)] == [160, 160, 160, 192, 192, 192]
    assert train_image_size(load_config(None).data, 5) == 224
    with pytest.raises(ConfigError, match="multiples of step"):
        load_config(None, ["data.progressive.enabled=true", "data.progressive.min_size=150"])
    with pytest.raises(ConfigError, match="trains at 9 sizes .* torch.compile keeps at most 8 graphs"):
        load_config(None, ["data.progressive.enabled=true", "data.progressive.min_size=128",
                           "data.progressive.max_size=256", "data.progressive.step=16", "train.compile=true"])
    with pytest.raises(ConfigError, match=r"'data.val_resize' \(232\) is smaller than the validation crop \(256"):
        load_config(None, ["data.val_resize=232", "data.val_image_size=256"])


def test_windows_depend_on_seed_epoch_and_id_alone():
    widths, heights = np.full(50, 300), np.full(50, 200)
    ids = np.arange(50)
    whole = crop_windows(1, 3, ids, widths, heights)
    one_by_one = [crop_windows(1, 3, ids[i:i + 1], widths[:1], heights[:1]) for i in range(50)]
    assert all(whole.x[i] == w.x[0] and whole.h[i] == w.h[0] and whole.flip[i] == w.flip[0]
               for i, w in enumerate(one_by_one))
    other_epoch = crop_windows(1, 4, ids, widths, heights)
    assert (other_epoch.w != whole.w).mean() > 0.8


def torchvision_rule(width, height, u):
    """torchvision's RandomResizedCrop.get_params, fed the same uniforms instead of torch's generator."""
    area, lo, hi = width * height, math.log(3 / 4), math.log(4 / 3)
    for k in range(10):
        target = area * (0.08 + 0.92 * u[k])
        aspect = math.exp(lo + (hi - lo) * u[10 + k])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[21] * (width - w + 1)), int(u[20] * (height - h + 1)), w, h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        w, h = int(round(height * 4 / 3)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def test_windows_follow_torchvisions_random_resized_crop_rule_including_the_fallback():
    rng = np.random.default_rng(1)
    widths = np.concatenate([rng.integers(2, 800, 3000), [1000, 10, 3]])
    heights = np.concatenate([rng.integers(2, 800, 3000), [10, 1000, 3]])  # the last three take the fallback
    ids = np.arange(len(widths))
    windows = crop_windows(9, 0, ids, widths, heights)
    u = uniforms(9, 0, ids, 23)
    for i in ids:
        assert (windows.x[i], windows.y[i], windows.w[i], windows.h[i]) == torchvision_rule(widths[i], heights[i], u[i])
    assert (windows.w[-3], windows.h[-3]) == (13, 10)  # wider than 4:3, centred


def test_window_statistics_match_torchvisions_own_draws():
    """The same rule: our draws and torchvision's RandomResizedCrop give the same distribution of crop areas."""
    image = Image.new("RGB", (400, 300))
    torch.manual_seed(0)
    theirs = np.array([np.prod(RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])[2:])
                       for _ in range(4000)]) / (400 * 300)
    windows = crop_windows(0, 0, np.arange(4000), np.full(4000, 400), np.full(4000, 300))
    ours = windows.w * windows.h / (400 * 300)
    assert abs(ours.mean() - theirs.mean()) < 0.02 and abs(np.median(ours) - np.median(theirs)) < 0.03
    assert 0.45 < windows.flip.mean() < 0.55
