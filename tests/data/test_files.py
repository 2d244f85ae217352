from collections import Counter

import pytest

from pipeline.data.files import train_indices, train_steps, val_indices


@pytest.mark.parametrize("world", [1, 2, 3])
def test_an_epoch_reads_every_sample_at_most_once_and_leaves_out_less_than_a_global_batch(world):
    n, batch = 103, 4
    seen = [i for rank in range(world) for i in train_indices(n, 0, 7, rank, world, batch)]
    assert len(seen) == len(set(seen))
    assert len(seen) == train_steps(n, world, batch) * world * batch
    assert n - len(seen) == n % (world * batch)


def test_every_rank_runs_the_same_number_of_full_batches():
    lengths = {len(train_indices(103, 0, 0, rank, 3, 4)) for rank in range(3)}
    assert lengths == {8 * 4}


def test_the_order_changes_every_epoch_and_repeats_for_the_same_seed():
    assert train_indices(100, 0, 0, 0, 2, 5) != train_indices(100, 1, 0, 0, 2, 5)
    assert train_indices(100, 3, 0, 1, 2, 5) == train_indices(100, 3, 0, 1, 2, 5)
    assert train_indices(100, 0, 0, 0, 2, 5) != train_indices(100, 0, 1, 0, 2, 5)


def test_every_sample_is_read_over_a_few_epochs():
    seen = {i for epoch in range(10) for rank in range(3) for i in train_indices(103, epoch, 0, rank, 3, 4)}
    assert seen == set(range(103))


def test_a_global_batch_mixes_classes_of_a_class_sorted_list():
    labels = [i // 10 for i in range(100)]  # 10 classes, sorted as the folders are
    first_batch = [labels[i] for rank in range(2) for i in train_indices(100, 0, 0, rank, 2, 8)[:8]]
    assert len(set(first_batch)) >= 5


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_validation_chunks_cover_the_split_exactly_once(world):
    chunks = [val_indices(101, rank, world) for rank in range(world)]
    assert sorted(i for chunk in chunks for i in chunk) == list(range(101))
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    assert Counter(i for chunk in chunks for i in chunk).most_common(1)[0][1] == 1
