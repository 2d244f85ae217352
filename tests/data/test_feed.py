"""The DALI loader's feed: batches prepared ahead of the training thread, read errors at their own batch, one
pipeline per run reset for each pass, and no thread left behind."""

import functools
import shutil
import threading
import time

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.imagenet import verify
from pipeline.data.index import load_index
from pipeline.data.layout import DatasetError
from pipeline.data.loaders import build_loaders
from pipeline.data.order import epoch_order
from pipeline.data.synthetic import write_synthetic_imagenet
from pipeline.distributed import DistInfo
from pipeline.perf import DelayedReads

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
BATCH = 4


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = write_synthetic_imagenet(tmp_path_factory.mktemp("feed") / "tree", num_classes=4, train_per_class=10,
                                    val_per_class=3, min_side=20, max_side=60)
    verify(root, workers=2)
    return root


def config(root, **overrides):
    words = [f"data.root={root}", "data.backend=dali", "data.image_size=24", "data.workers=1",
             "model.num_classes=4", *[f"{k}={v}" for k, v in overrides.items()]]
    return load_config(None, words)


def feed_threads(prefix="train-feed"):
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def waits(root, read_ahead, latency_s, step_s, steps):
    """Seconds the consumer spent in next() at each step, each read waiting ``latency_s``, each step ``step_s``."""
    reader = functools.partial(DelayedReads, latency_s=latency_s)
    train, _ = build_loaders(config(root, **{"data.read_ahead": read_ahead}), ONE, BATCH, reader=reader)
    train.set_epoch(0)
    batches, spent = iter(train), []
    try:
        for _ in range(steps):
            began = time.perf_counter()
            next(batches)
            spent.append(time.perf_counter() - began)
            time.sleep(step_s)
        return spent, len(feed_threads())
    finally:
        batches.close()
        train.close()


def test_the_feed_reads_ahead_while_the_step_runs(tree):
    latency, step = 0.04, 0.08  # a batch of 4 reads on the reader's threads: one latency; the step: two
    ahead, threads = waits(tree, 2, latency, step, 8)
    today, _ = waits(tree, 0, latency, step, 8)
    assert threads == 2  # the feed's own threads did the reading
    # after the first batches, the step finds its batch ready; without the feed it waits for each read
    assert sum(ahead[2:]) < 0.5 * sum(today[2:]), (ahead, today)
    assert sum(ahead[2:]) / 6 < latency / 2, ahead


@pytest.mark.parametrize("read_ahead", [0, 3])
def test_a_read_error_surfaces_at_its_own_batch_naming_the_file(tree, tmp_path, read_ahead):
    root = shutil.copytree(tree, tmp_path / "tree")
    split = load_index(root).splits["train"]
    order = epoch_order(len(split), 0, load_config(None, []).run.seed, BATCH)
    victim = root / split.name(int(order[3 * BATCH + 1]))  # in the 4th batch
    victim.unlink()
    train, _ = build_loaders(config(root, **{"data.read_ahead": read_ahead}), ONE, BATCH)
    train.set_epoch(0)
    got = []
    with pytest.raises(DatasetError) as raised:
        for _, labels in train:
            got.append(labels)
    assert len(got) == 3  # the batches before it were delivered, on the training thread, then its error
    assert f"Cannot read {victim}" in str(raised.value) and "changed since it was indexed" in str(raised.value)
    train.close()


def as_lists(batches):
    return [(images.clone(), labels.clone()) for images, labels in batches]


def assert_same(a, b):
    assert len(a) == len(b) and len(a) > 0
    for (x, y), (u, v) in zip(a, b, strict=True):
        assert torch.equal(x, u) and torch.equal(y, v)


def rebuilt(cfg, epoch, step=0):
    """The batches of a loader built for this epoch alone (from ``step``): the pipeline rebuilt per epoch."""
    train, _ = build_loaders(cfg, ONE, BATCH)
    train.load_state_dict({"epoch": epoch, "step": step})
    try:
        return as_lists(train)
    finally:
        train.close()


def test_the_pipelines_are_built_once_and_give_the_batches_of_pipelines_built_per_epoch(tree):
    cfg = config(tree, **{"data.random_erase": 0.5})
    train, val = build_loaders(cfg, ONE, BATCH)
    for epoch in range(3):
        train.set_epoch(epoch)
        assert_same(as_lists(train), rebuilt(cfg, epoch))
    first_val = as_lists(val)
    assert_same(as_lists(val), first_val)
    assert (train.builds, val.builds) == (1, 1)
    # a resume mid-epoch, then the epoch after it: the same pipeline, the same batches as a fresh loader's
    train.load_state_dict({"epoch": 1, "step": 3})
    assert_same(as_lists(train), rebuilt(cfg, 1, 3))
    train.set_epoch(2)
    assert_same(as_lists(train), rebuilt(cfg, 2))
    assert train.builds == 1
    # a pass left unfinished holds batches prefetched for it: the next pass gets a new pipeline
    next(iter(train))
    train.set_epoch(0)
    assert_same(as_lists(train), rebuilt(cfg, 0))
    assert train.builds == 2
    train.close()
    val.close()


def test_progressive_resizing_builds_a_pipeline_when_the_size_changes(tree):
    cfg = config(tree, **{"data.progressive.enabled": "true", "data.progressive.min_size": 16,
                          "data.progressive.max_size": 24, "data.progressive.end_epoch": 2,
                          "data.progressive.step": 8})
    train, _ = build_loaders(cfg, ONE, BATCH)
    sizes = []
    for epoch in range(4):  # 16, 16, 24, 24 px
        train.set_epoch(epoch)
        batches = as_lists(train)
        sizes.append(batches[0][0].shape[-1])
        assert_same(batches, rebuilt(cfg, epoch))
    assert sizes == [16, 16, 24, 24] and train.builds == 2
    train.close()


def test_no_thread_of_the_loader_outlives_close(tree):
    train, val = build_loaders(config(tree), ONE, BATCH)
    for loader in (train, val):
        loader.set_epoch(0)
        for _ in loader:
            pass
    assert len(feed_threads("train-feed")) == len(feed_threads("val-feed")) == 2
    train.close()
    val.close()
    assert feed_threads("train-feed") == feed_threads("val-feed") == []
    deadline = time.monotonic() + 5
    while feed_threads("sample-read") and time.monotonic() < deadline:  # the reader's idle threads, told to end
        time.sleep(0.01)
    assert feed_threads("sample-read") == []


def test_a_loader_dropped_unclosed_is_freed_at_once_not_by_a_later_garbage_collection(tree):
    # a collection in a forked DataLoader worker would free the DALI pipeline there, and hang on its threads
    import gc
    import weakref

    gc.disable()
    try:
        train, _ = build_loaders(config(tree), ONE, BATCH)
        next(iter(train))
        gone = weakref.ref(train._it)
        del train
        assert gone() is None
    finally:
        gc.enable()
