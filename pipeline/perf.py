"""Speed and memory measurements behind ``python -m pipeline.bench model|loader|feed|train``.

Each measured configuration runs in a fresh Python process (``python -m pipeline.perf JSON``), so one
configuration's allocator caches, compiled graphs or threads never flatter or burden another, and a
CPU peak of resident memory belongs to that configuration alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch import nn

from pipeline.cli import command
from pipeline.data.samples import SampleBytes
from pipeline.engine import build_scaler, train_step, tune_backends
from pipeline.models import build_model
from pipeline.optim import build_optimizer


class PeakRSS(threading.Thread):
    """Samples this process's resident memory every millisecond; ``peak`` is the highest seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_bench_model(impl: str, name: str, num_classes: int, memory_efficient: bool) -> nn.Module:
    """Ours (``pipeline.models``) or torchvision's model of the same name and settings."""
    if impl == "torchvision":
        import torchvision

        return getattr(torchvision.models, name)(num_classes=num_classes, memory_efficient=memory_efficient)
    return build_model(name, num_classes, memory_efficient)


def measure_model(spec: dict) -> dict:
    """Forward + backward + SGD step on one batch already on the device; median of ``steps`` timed steps."""
    device = torch.device("cuda" if spec["device"] == "cuda" else "cpu")
    tune_backends(device)  # as training does, for both implementations
    torch.manual_seed(0)
    memory_format = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    model = build_bench_model(spec["impl"], spec["model"], 1000, spec["memory_efficient"])
    model = model.to(device, memory_format=memory_format).train()
    net = torch.compile(model) if spec["compile"] else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scaler = build_scaler(device, spec["precision"])
    criterion = nn.CrossEntropyLoss()
    batch = spec["batch"]
    images, labels = _synthetic_batch(batch, spec["image_size"], 1000, device, memory_format)

    for _ in range(spec["warmup"]):
        train_step(net, images, labels, criterion, optimizer, scaler, spec["precision"])
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        sampler = None
    else:
        baseline = psutil.Process().memory_info().rss
        sampler = PeakRSS()
        sampler.start()
    times = []
    for _ in range(spec["steps"]):
        began = time.perf_counter()
        train_step(net, images, labels, criterion, optimizer, scaler, spec["precision"])
        _sync(device)
        times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated(device) if sampler is None else sampler.stop()
    step = statistics.median(times)
    layers = [m for m in model.modules() if hasattr(m, "memory_efficient")]
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    measured = {"pid": os.getpid(), "model_module": type(model).__module__, "compiled": net is not model,
                "channels_last_input": images.is_contiguous(memory_format=torch.channels_last),
                "channels_last_weights": conv.weight.is_contiguous(memory_format=torch.channels_last),
                "memory_efficient_layers": sum(bool(m.memory_efficient) for m in layers), "layers": len(layers)}
    return {**spec, "images_per_s": batch / step, "step_ms": 1000 * step, "peak_MB": peak / 2**20,
            "step_MB": (peak - baseline) / 2**20, "device_name": _device_name(device), "measured": measured}


def _synthetic_batch(batch: int, size: int, classes: int, device: torch.device, memory_format):
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    return images, torch.randint(0, classes, (batch,), device=device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"


# ---------------------------------------------------------------- loaders

def write_jpegs(root: Path, count: int, classes: int = 4, width: int = 500, height: int = 375, seed: int = 0) -> Path:
    """``count`` JPEGs of width x height (quality 90) in an ImageNet-style tree, with a small val split."""
    from pipeline.data.synthetic import class_names, render_image

    rng = np.random.default_rng(seed)
    names = class_names(classes)
    for split, n in (("train", count), ("val", classes)):
        for i in range(n):
            label = i % classes
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            image = render_image(label, classes, rng, width, width).resize((width, height))
            image.save(folder / f"{split}_{i:06d}.JPEG", quality=90)
    return root


def _decode(path: str) -> int:
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.load()
        return image.size[0]


def train_files(root: str | Path) -> list[str]:
    """The train files that the dataset index of ``root`` lists: what the loaders read (verify leaves out the
    files it could not decode)."""
    from pipeline.data.index import load_index

    split = load_index(root).splits["train"]
    return [str(Path(root) / split.name(i)) for i in range(len(split))]


def measure_decode(spec: dict) -> dict:
    """Full JPEG decode (Pillow's libjpeg-turbo) of the train files in ``workers`` processes, nothing else."""
    paths = train_files(spec["root"])
    with Pool(spec["workers"]) as pool:
        list(pool.imap_unordered(_decode, paths[:64], chunksize=8))  # warm-up
        began = time.perf_counter()
        for _ in range(spec["epochs"]):
            list(pool.imap_unordered(_decode, paths, chunksize=8))
        elapsed = time.perf_counter() - began
    return {**spec, "images_per_s": spec["epochs"] * len(paths) / elapsed}


def measure_loader(spec: dict) -> dict:
    """The real train loader (config, file lists, augmentation, normalisation) over ``epochs`` epochs."""
    from pipeline.config import load_config
    from pipeline.data.loaders import build_loaders, dataset_index
    from pipeline.distributed import DistInfo

    cfg = load_config(None, [f"data.root={spec['root']}", f"data.backend={spec['backend']}",
                             f"data.workers={spec['workers']}", f"data.image_size={spec['image_size']}",
                             f"model.num_classes={spec['classes']}", f"train.batch_size={spec['batch']}",
                             *spec.get("overrides", [])])
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    index = dataset_index(cfg, dist)
    train, _ = build_loaders(cfg, dist, spec["batch"], index)
    counts, began = 0, None
    for epoch in range(spec["epochs"] + 1):  # epoch 0 warms up: pipeline build, worker start
        train.set_epoch(epoch)
        for images, labels in train:
            assert images.shape[-1] == spec["image_size"] and images.dtype == torch.float32
            if began is not None:
                counts += labels.numel()
        if began is None:
            began = time.perf_counter()
    elapsed = time.perf_counter() - began
    # what this process itself read: its loader's class and whether its reader maps shards
    return {**spec, "images_per_s": counts / elapsed, "pid": os.getpid(), "loader_class": type(train).__name__,
            "read_from": "shards" if index.packed else "files"}


class DelayedReads(SampleBytes):
    """A sample reader whose every read first waits ``latency_s``: a network filesystem's latency under load.

    Reads on several threads wait at once, as requests in flight on NFS do. From shards, a batch's reads
    (``read_many``) wait one latency together: the real reader asks for every sample's pages at once
    (``MADV_WILLNEED``), so their waits overlap; a single ``read`` (the torchvision workers') waits its own.
    """

    def __init__(self, root, index, split: str, latency_s: float = 0.0):
        super().__init__(root, index, split)
        self.latency_s = latency_s

    def read(self, i: int) -> np.ndarray:
        time.sleep(self.latency_s)
        return super().read(i)

    def read_many(self, ids: np.ndarray) -> list[np.ndarray]:
        if self.split.shard is None:
            return super().read_many(ids)  # self.read on the reader's threads: the waits overlap
        time.sleep(self.latency_s)
        return [SampleBytes.read(self, i) for i in ids.tolist()]


def measure_feed(spec: dict) -> dict:
    """The real train loader consumed by a fake step (a sleep of ``step_ms``: the GPU's time), each read waiting
    ``latency_ms``: the share of the time the step waited for data, and images/s, after ``warmup`` steps."""
    import functools

    from pipeline.config import load_config
    from pipeline.data.loaders import build_loaders, dataset_index
    from pipeline.distributed import DistInfo

    cfg = load_config(None, [f"data.root={spec['root']}", f"data.backend={spec['backend']}",
                             f"data.workers={spec['workers']}", f"data.image_size={spec['image_size']}",
                             f"data.read_ahead={spec['read_ahead']}", f"model.num_classes={spec['classes']}",
                             f"train.batch_size={spec['batch']}"])
    dist = DistInfo(0, 1, 0, torch.device(spec.get("device", "cpu"), 0 if spec.get("device") == "cuda" else None))
    index = dataset_index(cfg, dist)
    reader = functools.partial(DelayedReads, latency_s=spec["latency_ms"] / 1000)
    train, _ = build_loaders(cfg, dist, spec["batch"], index, reader=reader)
    waited, images, steps, began = 0.0, 0, 0, None
    epoch = 0
    try:
        while steps < spec["warmup"] + spec["steps"]:
            train.set_epoch(epoch)
            batches = iter(train)
            while steps < spec["warmup"] + spec["steps"]:
                if steps == spec["warmup"]:  # the pipeline built, the workers started, the first batches read
                    waited, images, began = 0.0, 0, time.perf_counter()
                fetch = time.perf_counter()
                try:
                    _, labels = next(batches)
                except StopIteration:
                    break
                waited += time.perf_counter() - fetch
                images += labels.numel()
                steps += 1
                time.sleep(spec["step_ms"] / 1000)
            epoch += 1
        elapsed = time.perf_counter() - began
    finally:
        train.close()
    return {**spec, "data_wait_share": waited / elapsed, "images_per_s": images / elapsed,
            "wait_ms_per_step": 1000 * waited / spec["steps"], "pid": os.getpid(),
            "loader_class": type(train).__name__, "read_from": "shards" if index.packed else "files"}


def measure_stock_torchvision(spec: dict) -> dict:
    """torchvision's own recipe on the same files: ImageFolder, RandomResizedCrop (default antialias), flip,
    ToTensor, Normalize, and a DataLoader with the same workers and batch (default prefetch, no pinned
    memory, workers kept across epochs as ours are)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from pipeline.config import IMAGENET_MEAN, IMAGENET_STD

    transform = transforms.Compose([transforms.RandomResizedCrop(spec["image_size"]), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    indexed = frozenset(train_files(spec["root"]))  # the same files as ours: the tree may hold some verify left out
    dataset = datasets.ImageFolder(str(Path(spec["root"]) / "train"), transform=transform,
                                   is_valid_file=indexed.__contains__)
    loader = DataLoader(dataset, batch_size=spec["batch"], shuffle=True, num_workers=spec["workers"],
                        persistent_workers=True, drop_last=True)
    counts, began = 0, None
    for _ in range(spec["epochs"] + 1):  # the first epoch warms up: worker start
        for images, labels in loader:
            assert images.shape[-1] == spec["image_size"]
            if began is not None:
                counts += labels.numel()
        if began is None:
            began = time.perf_counter()
    return {**spec, "images_per_s": counts / (time.perf_counter() - began)}


def measure_dali_limit(spec: dict) -> dict:
    """DALI alone, nothing of ours: in-memory JPEG bytes of the train files -> DALI's own random-resized-crop ROI
    decode -> resize to ``image_size``, on ``workers`` threads: about the most a DALI loader can reach here."""
    from nvidia.dali import fn, pipeline_def, types

    paths = train_files(spec["root"])
    encoded = [np.fromfile(p, dtype=np.uint8) for p in paths]
    batch = spec["batch"]

    @pipeline_def(batch_size=batch, num_threads=spec["workers"], device_id=None, prefetch_queue_depth=2)
    def limit():
        data = fn.external_source(source=lambda info: [encoded[(info.iteration * batch + k) % len(encoded)]
                                                       for k in range(batch)], batch=True, batch_info=True,
                                  dtype=types.UINT8)
        images = fn.decoders.image_random_crop(data, output_type=types.RGB, random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        return fn.resize(images, resize_x=spec["image_size"], resize_y=spec["image_size"])

    pipe = limit()
    pipe.build()
    steps = len(paths) // batch
    for _ in range(steps):  # warm-up
        pipe.run()
    began = time.perf_counter()
    for _ in range(steps * spec["epochs"]):
        pipe.run()
    return {**spec, "images_per_s": steps * spec["epochs"] * batch / (time.perf_counter() - began)}


# ---------------------------------------------------------------- dataset index memory

def _uss() -> int:
    return psutil.Process().memory_full_info().uss


def _index_rank(folder: str, rank: int, world: int, batch: int, workers: int, barrier, results) -> None:
    """One rank: map the index, compute the epoch order, read every field its share of the epoch uses;
    then a forked loader worker does the same for its share. Unique memory added by each, in bytes."""
    import gc

    from pipeline.data.index import load_index
    from pipeline.data.order import TrainPlan

    def read(plan, split, steps) -> int:
        total = 0
        for step in steps:
            ids = plan.ids(0, step)
            windows = plan.windows(0, ids)
            total += int(split.label[ids].sum() + split.nbytes[ids].sum() + split.shard[ids].sum()
                         + split.offset[ids].sum() + windows.w.sum() + split.flags[ids].sum())
        return total

    gc.collect()
    barrier.wait()
    baseline = _uss()
    began = time.perf_counter()
    index = load_index(folder)
    load_s = time.perf_counter() - began
    split = index.splits["train"]
    plan = TrainPlan(split.width, split.height, 0, rank, world, batch)
    began = time.perf_counter()
    plan.order(0)
    order_s = time.perf_counter() - began
    read(plan, split, range(plan.steps))
    barrier.wait()  # every rank has mapped and read the index: its pages are shared
    rank_uss = _uss() - baseline
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # a DataLoader worker, forked from its rank as PyTorch's are
        try:
            start = _uss()
            read(plan, split, range(0, plan.steps, workers))
            os.write(writer, str(_uss() - start).encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    worker_uss = int(os.read(reader, 64))
    results.put({"rank": rank, "uss_MB_per_rank": rank_uss / 1e6, "uss_MB_per_worker": worker_uss / 1e6,
                 "load_s": load_s, "order_s": order_s})


def measure_index(spec: dict) -> dict:
    """A synthetic ImageNet-sized index (no images): build, save and load times, one rank's epoch order, and the
    unique memory a rank and a loader worker add, with ``world_size`` ranks on this machine sharing it."""
    from multiprocessing import get_context

    from pipeline.data.index import finish, make_split, save_index

    rng = np.random.default_rng(0)
    n, classes = spec["samples"], spec["classes"]
    began = time.perf_counter()
    splits = {}
    for split, count in (("train", n), ("val", max(1, n // 25))):
        labels = np.sort(rng.integers(0, classes, count))
        names = [f"{split}/n{10000000 + c:08d}/n{10000000 + c:08d}_{i}.JPEG" for i, c in enumerate(labels)]
        nbytes = rng.integers(20_000, 200_000, count)
        offsets = np.cumsum(nbytes) - nbytes
        splits[split] = make_split(names, labels, rng.integers(80, 1000, count), rng.integers(80, 1000, count),
                                   nbytes, shard=offsets // 2**30, offset=offsets % 2**30)
    index = finish([f"n{10000000 + c:08d}" for c in range(classes)], splits,
                   [{"file": f"shard-{i:05d}.bin", "bytes": 0, "sha256": ""} for i in range(200)])
    build_s = time.perf_counter() - began
    from pipeline.data.order import epoch_order

    began = time.perf_counter()
    epoch_order(n, 0, 0, spec["world_size"] * spec["batch"])  # alone: the ranks below share 2 cores
    order_s = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        save_index(index, tmp)
        save_s = time.perf_counter() - began
        index_MB = sum(f.stat().st_size for f in (Path(tmp) / "index").iterdir()) / 1e6
        del index, splits
        context = get_context("spawn")
        barrier, results = context.Barrier(spec["world_size"]), context.Queue()
        ranks = [context.Process(target=_index_rank, args=(tmp, r, spec["world_size"], spec["batch"],
                                                          spec["workers"], barrier, results))
                 for r in range(spec["world_size"])]
        for process in ranks:
            process.start()
        per_rank = sorted((results.get(timeout=600) for _ in ranks), key=lambda r: r["rank"])
        for process in ranks:
            process.join()
    median = {k: statistics.median(r[k] for r in per_rank) for k in per_rank[0] if k != "rank"}
    median["order_s_all_ranks_at_once"] = median.pop("order_s")
    return {**spec, "build_s": build_s, "save_s": save_s, "order_s": order_s, "index_MB": index_MB, **median,
            "ranks": per_rank}


# ---------------------------------------------------------------- training loop overhead

def measure_bare_loop(spec: dict) -> dict:
    """The mini model's forward/backward/step on one synthetic batch, timed in windows like training's log."""
    from pipeline.config import global_batch, load_config

    cfg = load_config(spec["config"], spec["overrides"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.run.seed)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg.model.name, cfg.model.num_classes, cfg.model.memory_efficient, cfg.model.drop_rate,
                        cfg.model.depth, cfg.model.growth_rate).to(device, memory_format=memory_format).train()
    batch = global_batch(cfg.train, 1)  # one process: the global batch (or the per-GPU one) is its batch
    optimizer = build_optimizer(model, cfg.optim, batch)  # the training's optimizer (fused SGD)
    scaler = build_scaler(device, cfg.train.precision)
    criterion = nn.CrossEntropyLoss()
    images, labels = _synthetic_batch(batch, cfg.data.image_size, cfg.model.num_classes, device, memory_format)
    window, rates = cfg.train.log_every_steps, []
    for _ in range(spec["windows"] + 1):
        began = time.perf_counter()
        for _ in range(window):
            loss = train_step(model, images, labels, criterion, optimizer, scaler, cfg.train.precision).loss
        loss.item()
        rates.append(window * batch / (time.perf_counter() - began))
    return {**spec, "images_per_s": statistics.median(rates[1:]),
            "measured": {"pid": os.getpid(), "steps": (spec["windows"] + 1) * window, "batch": batch}}


def logged_images_per_s(config: str, words: list[str], run_dir: Path) -> list[float]:
    """Train ``config`` with ``python -m pipeline.train`` into ``run_dir``; the images/s of each logged window."""
    subprocess.run([sys.executable, "-m", "pipeline.train", config, *words, f"run.dir={run_dir}"], check=True,
                   capture_output=True, timeout=3600)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["images_per_s"] for e in events if e["event"] == "train"]


def measure_train_loop(spec: dict) -> dict:
    """``python -m pipeline.train`` itself with random batches; the median of its logged images/s after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        rates = logged_images_per_s(spec["config"], spec["overrides"], Path(tmp) / "run")
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        if spec.get("profile_to"):  # the run's profile outlives its run dir
            shutil.copytree(Path(tmp) / "run" / "profile", spec["profile_to"], dirs_exist_ok=True)
    return {**spec, "images_per_s": statistics.median(rates[1:] or rates), "windows": len(rates),
            "measured": {"pid": os.getpid(), "steps": summary["global_step"], "images": summary["images_seen"]}}


MEASURES = {"model": measure_model, "decode": measure_decode, "loader": measure_loader,
            "stock_torchvision": measure_stock_torchvision, "dali_limit": measure_dali_limit, "index": measure_index,
            "feed": measure_feed,
            "bare_loop": measure_bare_loop, "train_loop": measure_train_loop}


def run_isolated(kind: str, spec: dict, timeout: float = 3600) -> dict:
    """``MEASURES[kind](spec)`` in a fresh Python process; its result as a dict."""
    result = subprocess.run([sys.executable, "-m", "pipeline.perf", kind, json.dumps(spec)], capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"measuring {kind} {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _spec(text: str) -> dict:
    spec = json.loads(text)
    if not isinstance(spec, dict):
        raise ValueError(text)
    return spec


@command()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.perf", description="one measurement of "
                                     "pipeline.bench, in this process; prints its result as JSON")
    parser.add_argument("kind", choices=sorted(MEASURES))
    parser.add_argument("spec", type=_spec, help="the measurement's settings, a JSON object")
    args = parser.parse_args(argv)
    print(json.dumps(MEASURES[args.kind](args.spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
