import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from pipeline.data.order import (
    TrainPlan,
    crop_windows,
    epoch_order,
    rank_batch,
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
    """Per step: the global batch's ids and windows, as the ranks of one world size together read them."""
    out = []
    for step in range(steps):
        ids = np.concatenate([plan.ids(epoch, step) for plan in plan_at_world])
        out.append((ids.tolist(), [w.tolist() for w in plan_at_world[0].windows(epoch, ids)]))
    return out


def test_global_batches_hold_the_same_samples_and_crops_at_world_sizes_1_2_and_3():
    rng = np.random.default_rng(0)
    widths, heights = rng.integers(16, 500, 200), rng.integers(16, 500, 200)
    results = []
    for world in (1, 2, 3):
        plans = [TrainPlan(widths, heights, 5, r, world, 12 // world) for r in range(world)]
        results.append(global_batches(plans, epoch=2, steps=plans[0].steps))
    assert results[0] == results[1] == results[2]
    assert len(results[0]) == 200 // 12


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
