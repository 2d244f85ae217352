"""Benchmarks that print figures: ``python -m pipeline.bench SUBCOMMAND [options] [--json FILE]``.

    model        forward + backward + optimizer step on synthetic tensors already on the device: images/s,
                 step time, peak memory; --compare torchvision (same settings) or memory_efficient (off vs on)
    feed         the real train loader, each read waiting L ms (a network filesystem), consumed by a fake step of
                 S ms (a sleep: the GPU's time): the share of the time the step waits for data, with the feed
                 reading ahead (data.read_ahead) and without (0: the old loader), with the latency and without
    loader       the train pipeline over a JPEG tree and its packed copy, both backends, against torchvision's
                 stock ImageFolder recipe and the bare DALI decode+resize rate, on the same files and cores;
                 --augment: both backends with RandAugment and random erasing on too
    index        a synthetic ImageNet-sized dataset index: build, save, load, epoch order, memory per rank/worker
    train        the real training loop (mini config, random batches) against a bare forward/backward/step loop
    checkpoint   save and load time and size of a full training checkpoint (model, SGD momentum,
                 schedule, grad scaler, loader position, per-rank RNG state), written the way training writes it
    tracking     images/s of the mini config with MLflow tracking off and on (an SQLite store), and their ratio
    boundary     N gloo ranks on this machine emulate steps of T ms (a sleep) and run the real step-boundary rules:
                 the time each step waits on the ranks' decision, agreed within the step (blocking, the old
                 design) and across one step (asynchronous), by world size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.checkpoint import FORMAT_VERSION, library_versions, load_checkpoint, rng_state, save_checkpoint
from pipeline.cli import command
from pipeline.config import Config
from pipeline.data.index import usable_cpus
from pipeline.data.layout import DatasetError
from pipeline.engine import build_scaler
from pipeline.models import MODEL_NAMES, build_model
from pipeline.optim import build_optimizer


def checkpoint_state(model_name: str, world_size: int) -> dict:
    """A checkpoint like training's, after one optimizer step (so SGD holds its momentum buffers)."""
    model = build_model(model_name)
    optim_cfg = Config().optim
    optimizer = build_optimizer(model, optim_cfg, 256)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rank = {"rng": rng_state()}
    return {"format": FORMAT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": build_scaler(torch.device("cpu"), "fp16").state_dict(),
            "progress": {"epoch": 0, "step_in_epoch": 1, "global_step": 1}, "ranks": [rank] * world_size,
            "loader": {"epoch": 0, "step": 1}, "dataset": None,
            "world_size": world_size, "metrics_lines": 0, "config": {}, "versions": library_versions()}


def bench_checkpoint(args: argparse.Namespace) -> dict:
    state = checkpoint_state(args.model, args.world_size)
    saves, loads = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as run_dir:
        for i in range(args.repeat):
            began = time.perf_counter()
            path = save_checkpoint(state, run_dir, i + 1, keep_last=1, best_step=None)
            saves.append(time.perf_counter() - began)
            began = time.perf_counter()
            load_checkpoint(path)
            loads.append(time.perf_counter() - began)
        size = path.stat().st_size
    return {"model": args.model, "world_size": args.world_size, "bytes": size, "save_s": statistics.median(saves),
            "load_s": statistics.median(loads), "save_MB_per_s": size / 1e6 / statistics.median(saves),
            "repeat": args.repeat, "folder": str(Path(args.dir or tempfile.gettempdir()).absolute())}


MINI = str(Path(__file__).resolve().parents[1] / "configs" / "mini.yaml")


def _mini_images_per_s(run_dir: Path, words: list[str]) -> float:
    """Train the mini config once; the median images/s of its logged windows after the first."""
    from pipeline.perf import logged_images_per_s

    rates = logged_images_per_s(MINI, words, run_dir)
    return statistics.median(rates[1:] or rates)


def bench_tracking(args: argparse.Namespace) -> dict:
    rates: dict[str, list[float]] = {"none": [], "mlflow": []}
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"train.epochs={args.epochs}", f"data.root={tmp}/data", "train.log_every_steps=2"]
        for i in range(args.repeat):
            for backend in ("none", "mlflow"):  # alternated, so drifts in machine load hit both alike
                run_dir = Path(tmp) / f"{backend}-{i}"
                rates[backend].append(_mini_images_per_s(run_dir, [*common, f"tracking.backend={backend}"]))
    off, on = statistics.mean(rates["none"]), statistics.mean(rates["mlflow"])
    return {"images_per_s_off": off, "images_per_s_on": on, "ratio": on / off, "runs": rates}


def at_least(low: float, kind: type = int):
    """An argparse type: a number of ``kind`` no smaller than ``low``, refused with the bound otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return parse


COUNT, WHOLE, MS = at_least(1), at_least(0), at_least(0, float)  # a count, one that may be 0, a duration


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as a fixed-width table; ``columns`` are (key, header, format)."""
    widths = [max(len(header), 10, *(len(format(row[key], fmt)) for row in rows)) for key, header, fmt in columns]
    lines = ["  ".join(f"{header:>{w}}" for (_, header, _), w in zip(columns, widths, strict=True))]
    for row in rows:
        lines.append("  ".join(f"{format(row[key], fmt):>{w}}" for (key, _, fmt), w in zip(columns, widths,
                                                                                              strict=True)))
    return "\n".join(lines)


TOGGLES = ("compile", "channels_last", "memory_efficient")  # --compare runs ours with the setting flipped


def bench_model(args: argparse.Namespace) -> dict:
    from pipeline.perf import run_isolated

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = {"impl": "ours", "model": args.model, "batch": args.batch, "image_size": args.image_size,
            "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
            "memory_efficient": args.memory_efficient, "steps": args.steps, "warmup": args.warmup, "device": device}
    specs = {"ours": spec}
    if args.compare == "torchvision":
        specs["torchvision"] = {**spec, "impl": "torchvision", "compile": False}
    elif args.compare in TOGGLES:
        specs[args.compare] = {**spec, args.compare: not spec[args.compare]}
    tries: dict[str, list[dict]] = {name: [] for name in specs}
    for _ in range(args.repeat):  # alternated, so drifts in machine load hit each alike
        for name, one in specs.items():
            tries[name].append(run_isolated("model", one))
    # per configuration, the run with the median images/s
    runs = {name: sorted(t, key=lambda r: r["images_per_s"])[len(t) // 2] for name, t in tries.items()}
    result: dict = {"runs": runs, "device_name": runs["ours"]["device_name"], "repeat": args.repeat}
    if args.compare == "torchvision":
        result["ratio"] = runs["ours"]["images_per_s"] / runs["torchvision"]["images_per_s"]
    elif args.compare in TOGGLES:
        off, on = sorted((runs["ours"], runs[args.compare]), key=lambda r: r[args.compare])
        if args.compare == "memory_efficient":
            result["ratio"] = on["step_MB"] / off["step_MB"]  # memory with recompute / without
            result["time_ratio"] = on["step_ms"] / off["step_ms"]
        else:
            result["ratio"] = on["images_per_s"] / off["images_per_s"]
    return result


LOADER_RUNS = ("decode_only", "dali_limit", "dali", "dali_packed", "torchvision", "torchvision_packed",
               "stock_torchvision")
# torchvision's recipe values: RandAugment(num_ops=2, magnitude=9), RandomErasing(p=0.25)
AUGMENT = ["data.auto_augment=ra", "data.ra_num_ops=2", "data.ra_magnitude=9", "data.random_erase=0.25"]


def check_tree(root: Path, batch: int) -> None:
    """Refuse a ``--root`` that is not a JPEG tree with a dataset index: every run reads the files the index lists."""
    from pipeline.data.index import has_index, load_index

    if not (root / "train").is_dir():
        raise DatasetError(f"--root '{root}' has no train/ folder. Pass an ImageNet-style JPEG tree "
                           "(train/<class>/*.JPEG, val/<class>/*.JPEG), or leave --root out to use generated JPEGs.")
    if not has_index(root):
        raise DatasetError(f"--root '{root}' has no dataset index. Run `python -m pipeline.data.imagenet verify "
                           f"{root}` first: it decodes every file, leaves out the damaged ones and writes the index "
                           "that the bench reads.")
    index = load_index(root)
    if index.packed:
        raise DatasetError(f"--root '{root}' is a packed dataset. Pass the JPEG tree it was packed from: the bench "
                           "packs its own copy.")
    if len(index.splits["train"]) < batch:
        raise DatasetError(f"--root '{root}' indexes {len(index.splits['train'])} train images, fewer than one "
                           f"--batch ({batch}): the loaders would give no batch. Lower --batch.")


def bench_loader(args: argparse.Namespace) -> dict:
    from pipeline.data.imagenet import pack, verify
    from pipeline.data.index import load_index
    from pipeline.perf import run_isolated, write_jpegs

    if args.root:
        check_tree(Path(args.root), args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else write_jpegs(Path(tmp) / "jpegs", args.images)
        if not args.root:
            verify(root, workers=args.workers)
        packed = Path(tmp) / "packed"
        pack(root, packed)
        common = {"root": str(root), "workers": args.workers, "epochs": args.epochs, "image_size": args.image_size,
                  "batch": args.batch}
        loader = {**common, "classes": len(load_index(root).classes)}
        specs = {"decode_only": ("decode", common), "dali_limit": ("dali_limit", common),
                 "dali": ("loader", {**loader, "backend": "dali"}),
                 "dali_packed": ("loader", {**loader, "backend": "dali", "root": str(packed)}),
                 "torchvision": ("loader", {**loader, "backend": "torchvision"}),
                 "torchvision_packed": ("loader", {**loader, "backend": "torchvision", "root": str(packed)}),
                 "stock_torchvision": ("stock_torchvision", common)}
        if args.augment:
            specs["dali_augment"] = ("loader", {**loader, "backend": "dali", "overrides": AUGMENT})
            specs["torchvision_augment"] = ("loader", {**loader, "backend": "torchvision", "overrides": AUGMENT})
        tries: dict[str, list[dict]] = {name: [] for name in specs}
        for _ in range(args.repeat):  # alternated, so drifts in machine load hit each alike
            for name, (kind, spec) in specs.items():
                tries[name].append(run_isolated(kind, spec))
    runs = {name: {**sorted(t, key=lambda r: r["images_per_s"])[len(t) // 2],
                   "all_images_per_s": [r["images_per_s"] for r in t]} for name, t in tries.items()}
    rate = {name: run["images_per_s"] for name, run in runs.items()}
    faster_dali = max(("dali", "dali_packed"), key=rate.get)
    augment = {"dali_augment_over_dali": rate["dali_augment"] / rate["dali"],
               "torchvision_augment_over_torchvision": rate["torchvision_augment"] / rate["torchvision"]
               } if args.augment else {}
    return {"runs": runs, **augment, "repeat": args.repeat, "ratio": rate[faster_dali] / rate["stock_torchvision"],
            "ratio_run": faster_dali, "packed_over_folder_dali": rate["dali_packed"] / rate["dali"],
            "dali_of_limit": rate[faster_dali] / rate["dali_limit"],
            "dali_over_torchvision": rate["dali"] / rate["torchvision"],
            "dali_of_decode_only": rate["dali"] / rate["decode_only"]}


def bench_feed(args: argparse.Namespace) -> dict:
    from pipeline.data.imagenet import pack, verify
    from pipeline.perf import run_isolated, write_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp) / "jpegs", args.images)
        verify(root, workers=args.workers)
        if args.packed:
            pack(root, Path(tmp) / "packed")
            root = Path(tmp) / "packed"
        spec = {"root": str(root), "backend": args.backend, "workers": args.workers, "image_size": args.image_size,
                "batch": args.batch, "classes": len([d for d in (Path(tmp) / "jpegs" / "train").iterdir()]),
                "step_ms": args.step_ms, "steps": args.steps, "warmup": args.warmup, "device": args.device}
        # data.read_ahead is DALI's feed: the torchvision backend's DataLoader workers read ahead by themselves
        aheads = (args.read_ahead, 0) if args.backend == "dali" else (0,)
        runs = [run_isolated("feed", {**spec, "read_ahead": ahead, "latency_ms": latency})
                for ahead in aheads for latency in (args.read_latency_ms, 0.0)]

    def figures(ahead: int) -> dict:
        slow, fast = (next(r for r in runs if r["read_ahead"] == ahead and r["latency_ms"] == latency)
                      for latency in (args.read_latency_ms, 0.0))
        return {"data_wait_share": slow["data_wait_share"], "images_per_s": slow["images_per_s"],
                "data_wait_share_no_latency": fast["data_wait_share"], "images_per_s_no_latency": fast["images_per_s"]}

    ahead = aheads[0]
    return {"backend": args.backend, "packed": args.packed, "batch": args.batch, "step_ms": args.step_ms,
            "read_latency_ms": args.read_latency_ms, "read_ahead": ahead, **figures(ahead),
            "today": {"read_ahead": 0, **figures(0)} if ahead else None, "runs": runs, "cpus": usable_cpus()}


def bench_index(args: argparse.Namespace) -> dict:
    from pipeline.perf import run_isolated

    return run_isolated("index", {"samples": args.samples, "classes": args.classes, "world_size": args.world_size,
                                  "batch": args.batch, "workers": args.workers})


def bench_train(args: argparse.Namespace) -> dict:
    from pipeline.perf import run_isolated

    config = MINI
    overrides = ["data.backend=synthetic", f"data.synthetic_steps={args.steps}", f"train.epochs={args.epochs}",
                 f"train.log_every_steps={args.window}", "tracking.backend=none", *args.overrides]
    windows = args.steps * args.epochs // args.window - 1
    added = args.added.split()
    runs: dict[str, list[dict]] = {"bare_loop": [], "train_loop": [], **({"train_loop_added": []} if added else {})}
    for _ in range(args.repeat):  # alternated, so drifts in machine load hit each alike
        runs["train_loop"].append(run_isolated("train_loop", {"config": config, "overrides": overrides}))
        if added:
            runs["train_loop_added"].append(run_isolated("train_loop", {"config": config,
                                                                        "overrides": [*overrides, *added]}))
        runs["bare_loop"].append(run_isolated("bare_loop", {"config": config, "overrides": overrides,
                                                            "windows": windows}))
    rate = {name: statistics.median(r["images_per_s"] for r in tries) for name, tries in runs.items()}
    result = {"runs": runs, "train_loop_images_per_s": rate["train_loop"],
              "bare_loop_images_per_s": rate["bare_loop"], "ratio": rate["train_loop"] / rate["bare_loop"]}
    if added:
        result.update(added=added, added_images_per_s=rate["train_loop_added"],
                      added_cost=1 - rate["train_loop_added"] / rate["train_loop"])
    if args.profile:  # one more run, untimed, profiled after the first (warm-up) window
        window = [f"profile.start_step={args.window + 1}", f"profile.steps={args.profile_steps}"]
        run_isolated("train_loop", {"config": config, "overrides": [*overrides, *added, *window],
                                    "profile_to": str(Path(args.profile).resolve())})
        result["profile"] = sorted(str(p) for p in Path(args.profile).resolve().glob("rank-*"))
    return result


def _boundary_rank(rank: int, world: int, port: int, results, step_ms: float, steps: int, figures_every: int) -> None:
    """One rank of ``bench boundary``: the designs in turn, the same steps, the same process group; ``figures``:
    the async design with every rank's figures in the reduction of every ``figures_every``-th step (log steps)."""
    from pipeline import collective
    from pipeline.boundary import StepBoundary
    from pipeline.distributed import init_distributed, shutdown
    from pipeline.signals import StopSignals

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist_info = init_distributed(timeout_s=300)
    loss = torch.tensor(2.3)
    figures: dict = {"pids": collective.gather_to_main(os.getpid()), "blocking_flags": {}}  # what each rank says it is
    for design, blocking in (("blocking", True), ("async", False), ("figures", False)):
        boundary = StepBoundary(StopSignals(), dist_info.device, every_minutes=30.0, blocking=blocking)
        waited, spent, reading = [], [], []
        for step in range(1, steps + 11):
            time.sleep(step_ms / 1000)  # the step's compute
            began = time.perf_counter()
            logged = design == "figures" and step % figures_every == 0
            boundary.after_step(step, loss, last_in_epoch=False,
                                figures=(step_ms / 1000, rank / 1e6) if logged else None)
            if step > 10:  # after a warm-up
                spent.append(1000 * (time.perf_counter() - began))
                waited.append(1000 * boundary.waited)
                if step % figures_every == 1:  # this step read a log step's reduction (with figures, in that design)
                    reading.append(1000 * boundary.waited)
        boundary.before_save(steps + 10, lambda: True)  # nothing left in flight
        everyone = collective.gather_to_main((waited, spent, reading))
        flags = collective.gather_to_main(boundary.blocking)
        if rank == 0:
            figures["blocking_flags"][design] = flags
            figures[design] = [statistics.median(w for ranks in everyone for w in ranks[i]) for i in (0, 1, 2)]
    if rank == 0:
        results.put(figures)
    shutdown(True)


def bench_boundary(args: argparse.Namespace) -> dict:
    from pipeline.distributed import run_local_ranks

    runs = []
    for world in args.world_size:
        [figures] = run_local_ranks(_boundary_rank, world, args.step_ms, args.steps, args.figures_every)
        (before, before_all, _), (after, after_all, plain_read) = figures["blocking"], figures["async"]
        with_figures, with_figures_all, figures_read = figures["figures"]
        runs.append({"world_size": world, "step_ms": args.step_ms, "steps": args.steps, "pids": figures["pids"],
                     "blocking_by_rank": figures["blocking_flags"],
                     "blocked_ms_per_step_blocking": before, "blocked_ms_per_step": after, "ratio": after / before,
                     "boundary_ms_per_step_blocking": before_all, "boundary_ms_per_step": after_all,
                     "figures_every": args.figures_every, "blocked_ms_per_step_with_figures": with_figures,
                     "boundary_ms_per_step_with_figures": with_figures_all,
                     "blocked_ms_reading_figures": figures_read, "blocked_ms_same_steps_without": plain_read})
    return {"runs": runs, "cpus": usable_cpus()}


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per benchmark."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="training-step speed and peak memory of a model on synthetic tensors")
    model.add_argument("--model", choices=MODEL_NAMES, default="densenet121")
    model.add_argument("--batch", type=COUNT, default=32)
    model.add_argument("--image-size", type=COUNT, default=224)
    model.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="fp32")
    model.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    model.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    model.add_argument("--memory-efficient", action=argparse.BooleanOptionalAction, default=False)
    model.add_argument("--steps", type=COUNT, default=10, help="timed steps (the median is reported)")
    model.add_argument("--warmup", type=WHOLE, default=3)
    model.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if there is one")
    model.add_argument("--compare", choices=("torchvision", *TOGGLES), default=None,
                       help="torchvision's model, or ours with this setting flipped, in the same way")
    model.add_argument("--repeat", type=COUNT, default=1, help="alternated runs of each; the median run is shown")
    loader = sub.add_parser("loader", help="train-loader images/s: DALI vs torchvision vs decode alone")
    loader.add_argument("--root", default=None, help="a JPEG tree (train/<class>/...); default: 400 generated "
                        "500x375 JPEGs")
    loader.add_argument("--images", type=COUNT, default=400)
    loader.add_argument("--workers", type=COUNT, default=len(os.sched_getaffinity(0)),
                        help="DALI threads, DataLoader processes and decode processes alike (default: the cores)")
    loader.add_argument("--batch", type=COUNT, default=32)
    loader.add_argument("--image-size", type=COUNT, default=224)
    loader.add_argument("--epochs", type=COUNT, default=2, help="timed epochs, after one warm-up epoch")
    loader.add_argument("--repeat", type=COUNT, default=3, help="alternated runs of each; the median is shown")
    loader.add_argument("--augment", action="store_true", help="also both backends with RandAugment (2 ops, "
                        "magnitude 9) and random erasing (p 0.25) on")
    feed = sub.add_parser("feed", help="the share of a fake step's time spent waiting for data, reads delayed by L ms")
    feed.add_argument("--read-latency-ms", type=MS, default=20.0, help="L: each file read (or each batch's "
                      "shard pages) waits this long first, as on a busy network filesystem")
    feed.add_argument("--step-ms", type=MS, default=150.0, help="S: the fake step (a sleep), the GPU's time for "
                      "the per-GPU batch")
    feed.add_argument("--backend", choices=("dali", "torchvision"), default="dali")
    feed.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the batches land (cuda: "
                      "DALI decodes with its mixed decoder, the torchvision backend normalises on the GPU)")
    feed.add_argument("--packed", action="store_true", help="read the packed copy (shards) instead of the files")
    feed.add_argument("--batch", type=COUNT, default=32)
    feed.add_argument("--read-ahead", type=WHOLE, default=Config().data.read_ahead,
                      help="data.read_ahead of the feed, compared with 0 (the old loader)")
    feed.add_argument("--images", type=COUNT, default=640, help="generated 500x375 JPEGs")
    feed.add_argument("--image-size", type=COUNT, default=224)
    feed.add_argument("--workers", type=COUNT, default=len(os.sched_getaffinity(0)),
                      help="DALI threads or DataLoader processes (default: the cores)")
    feed.add_argument("--steps", type=COUNT, default=30, help="timed steps, after the warm-up")
    feed.add_argument("--warmup", type=WHOLE, default=3, help="steps before the timing starts")
    index = sub.add_parser("index", help="a synthetic ImageNet-sized index: build/save/load time, epoch order, "
                           "memory per rank and per loader worker")
    index.add_argument("--samples", type=COUNT, default=1_281_167)
    index.add_argument("--classes", type=COUNT, default=1000)
    index.add_argument("--world-size", type=COUNT, default=8, help="ranks on this machine sharing the index")
    index.add_argument("--batch", type=COUNT, default=256, help="per-rank batch")
    index.add_argument("--workers", type=COUNT, default=4, help="loader workers per rank (one is measured)")
    train = sub.add_parser("train", help="the training loop's overhead over a bare forward/backward/step loop")
    train.add_argument("--steps", type=COUNT, default=100, help="steps per epoch")
    train.add_argument("--epochs", type=COUNT, default=2)
    train.add_argument("--window", type=COUNT, default=10, help="steps per logged window")
    train.add_argument("--repeat", type=COUNT, default=3)
    train.add_argument("--added", default="", help="key=value words (one string) of parts whose cost to measure: the "
                       "train loop runs with and without them, e.g. 'train.ema.enabled=true train.mix.mixup_alpha=0.2'")
    train.add_argument("--profile", default="", help="also profile the train loop (with --added's parts) into this "
                       "folder: a trace and the top operators per rank (see the README's profiling section)")
    train.add_argument("--profile-steps", type=COUNT, default=5,
                       help="steps the profile records, after the first window")
    train.add_argument("overrides", nargs="*", help="key=value words for the mini config")
    for p in (model, loader, feed, index, train):
        p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    ckpt = sub.add_parser("checkpoint", help="save/load time and size of a training checkpoint")
    ckpt.add_argument("--model", choices=MODEL_NAMES, default="densenet121")
    ckpt.add_argument("--world-size", type=COUNT, default=8, help="ranks whose loader/RNG state it carries")
    ckpt.add_argument("--repeat", type=COUNT, default=5)
    ckpt.add_argument("--dir", default=None, help="where to write (default: the temp folder)")
    ckpt.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    bound = sub.add_parser("boundary", help="the time each step waits on the ranks' decision, by world size")
    bound.add_argument("--world-size", type=COUNT, nargs="+", default=[2, 4, 8, 16], help="gloo ranks on this machine")
    bound.add_argument("--step-ms", type=MS, default=20.0, help="the emulated step (a sleep)")
    bound.add_argument("--steps", type=COUNT, default=200, help="timed steps per design")
    bound.add_argument("--figures-every", type=COUNT, default=10, help="the log steps of the design with the ranks' "
                       "figures in the reduction (train.log_every_steps)")
    bound.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    track = sub.add_parser("tracking", help="mini config images/s with tracking off and on")
    track.add_argument("--epochs", type=COUNT, default=4)
    track.add_argument("--repeat", type=COUNT, default=2)
    track.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    return parser


@command()
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json_out and not os.access(Path(args.json_out).absolute().parent, os.W_OK):
        parser.error(f"--json {args.json_out}: its folder is missing or not writable. Pass a path this user can write.")
    if args.command == "checkpoint" and args.dir and not (Path(args.dir).is_dir() and os.access(args.dir, os.W_OK)):
        parser.error(f"--dir {args.dir} is not a writable folder. Create it, or leave --dir out (the temp folder).")
    if args.command in ("loader", "feed") and not getattr(args, "root", None) and args.images < args.batch:
        parser.error(f"bench {args.command}: --images {args.images} is fewer than one --batch ({args.batch}): the "
                     "loader would give no batch. Raise --images or lower --batch.")
    if args.command == "train" and args.steps * args.epochs < 2 * args.window:
        parser.error(f"bench train: --steps {args.steps} x --epochs {args.epochs} is {args.steps * args.epochs} "
                     f"steps; it needs at least {2 * args.window} (two windows of --window {args.window}: the "
                     "first warms up). Raise --steps or --epochs, or lower --window.")
    if args.command == "model":
        result = bench_model(args)
        columns = [("impl", "model", ""), ("channels_last", "chan-last", ""), ("compile", "compile", ""),
                   ("memory_efficient", "mem-eff", ""), ("images_per_s", "images/s", ".1f"),
                   ("step_ms", "step ms", ".1f"), ("peak_MB", "peak MB", ".0f"), ("step_MB", "step MB", ".0f")]
        rows = list(result["runs"].values())
        print(f"{args.model}, batch {args.batch}, {args.image_size} px, {args.precision}, channels_last="
              f"{args.channels_last}, compile={args.compile} on {result['device_name']}")
        print(_table([{**r, **{k: str(r[k]) for k in TOGGLES}} for r in rows], columns))
        print(f"(median of the timed steps, median of {args.repeat} run(s); step MB: the step's peak minus the "
              "memory held before it)")
        if args.compare == "torchvision":
            print(f"ratio ours/torchvision images/s: {result['ratio']:.3f}")
        elif args.compare == "memory_efficient":
            print(f"memory_efficient: step memory x{result['ratio']:.3f}, step time x{result['time_ratio']:.3f}")
        elif args.compare:
            print(f"{args.compare}: images/s x{result['ratio']:.3f} (on over off)")
    elif args.command == "loader":
        result = bench_loader(args)
        rows = [{"what": k, **v, "all": " ".join(f"{x:.0f}" for x in v["all_images_per_s"])}
                for k, v in result["runs"].items()]
        print(_table(rows, [("what", "pipeline", ""), ("images_per_s", "images/s", ".1f"), ("all", "runs", "")]))
        print(f"ratio {result['ratio_run']} / stock_torchvision: {result['ratio']:.2f}x; dali_packed / dali: "
              f"{result['packed_over_folder_dali']:.2f}x; {result['ratio_run']} at "
              f"{100 * result['dali_of_limit']:.0f}% of the bare DALI decode+resize rate (median of "
              f"{args.repeat} alternated runs, {args.workers} workers)")
        if args.augment:
            print(f"with {' '.join(AUGMENT)}: dali x{result['dali_augment_over_dali']:.3f}, torchvision "
                  f"x{result['torchvision_augment_over_torchvision']:.3f} of its images/s without")
    elif args.command == "feed":
        result = bench_feed(args)
        rows = [{"ahead": r["read_ahead"], "latency": r["latency_ms"], "wait": r["data_wait_share"],
                 "rate": r["images_per_s"], "ms": r["wait_ms_per_step"]} for r in result["runs"]]
        print(f"{args.backend}{' packed' if args.packed else ''}, batch {args.batch}, {args.image_size} px, step "
              f"{args.step_ms:g} ms (a sleep), {args.workers} workers, {result['cpus']} CPUs")
        print(_table(rows, [("ahead", "read_ahead", ""), ("latency", "read ms", "g"),
                            ("wait", "data_wait_share", ".3f"), ("ms", "wait ms/step", ".1f"),
                            ("rate", "images/s", ".1f")]))
        against = (f"reading {result['read_ahead']} ahead, {result['today']['data_wait_share']:.3f} without "
                   "(read_ahead=0)" if result["today"] else f"{args.workers} DataLoader workers")
        print(f"data_wait_share at L={args.read_latency_ms:g} ms: {result['data_wait_share']:.3f} {against}; "
              f"{args.steps} timed steps each, each in its own process")
    elif args.command == "index":
        result = bench_index(args)
        keys = ("build_s", "save_s", "load_s", "order_s", "order_s_all_ranks_at_once", "index_MB", "uss_MB_per_rank",
                "uss_MB_per_worker")
        print("  ".join(f"{k} {result[k]:.3f}" for k in keys))
        print(f"({args.samples} samples, {args.classes} classes, {args.world_size} ranks sharing the index on this "
              "machine, medians over ranks; USS: the unique memory each adds)")
    elif args.command == "train":
        result = bench_train(args)
        print(_table([{"what": "train loop", "v": result["train_loop_images_per_s"]},
                      {"what": "bare loop", "v": result["bare_loop_images_per_s"]},
                      *([{"what": "train loop + added", "v": result["added_images_per_s"]}] if args.added else [])],
                     [("what", "loop", ""), ("v", "images/s", ".1f")]))
        print(f"ratio train/bare: {result['ratio']:.3f} (median of {args.repeat} alternated runs each)")
        if args.added:
            print(f"cost of {' '.join(result['added'])}: {100 * result['added_cost']:.1f}% of the train loop's "
                  "images/s")
        if args.profile:
            steps = f"{args.window + 1}-{args.window + args.profile_steps}"
            print(f"profile of steps {steps}: {', '.join(result['profile'])}")
    if args.command in ("model", "loader", "feed", "index", "train"):
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
        return 0
    if args.command == "boundary":
        result = bench_boundary(args)
        print(_table(result["runs"], [("world_size", "ranks", ""),
                                      ("blocked_ms_per_step_blocking", "blocking ms", ".3f"),
                                      ("blocked_ms_per_step", "async ms", ".3f"),
                                      ("ratio", "async/blocking", ".3f"),
                                      ("boundary_ms_per_step_blocking", "all, blocking", ".3f"),
                                      ("boundary_ms_per_step", "all, async", ".3f"),
                                      ("blocked_ms_per_step_with_figures", "figures ms", ".3f"),
                                      ("blocked_ms_same_steps_without", "log+1 plain", ".3f"),
                                      ("blocked_ms_reading_figures", "log+1 figures", ".3f")]))
        print(f"(blocked_ms_per_step: the median time a step waits for the ranks' decision, over ranks and "
              f"{args.steps} steps of {args.step_ms:g} ms each; 'all': the whole step boundary, with this rank's "
              f"flags and the start of the next reduction; 'figures': the async design with every rank's figures in "
              f"the reduction of every {args.figures_every}th step; 'log+1': the steps that read such a step's "
              f"reduction, without and with the figures; {result['cpus']} CPUs shared by the ranks)")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
        return 0
    if args.command == "tracking":
        result = bench_tracking(args)
        print(f"{'tracking':<10}{'images/s':>10}")
        print(f"{'off':<10}{result['images_per_s_off']:>10.1f}\n{'on':<10}{result['images_per_s_on']:>10.1f}")
        print(f"ratio on/off: {result['ratio']:.3f} (mean of {args.repeat} alternated runs each)")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
        return 0
    result = bench_checkpoint(args)
    print(f"{'model':<14}{'ranks':>6}{'size MB':>10}{'save s':>9}{'load s':>9}{'save MB/s':>11}")
    print(f"{result['model']:<14}{result['world_size']:>6}{result['bytes'] / 1e6:>10.1f}{result['save_s']:>9.3f}"
          f"{result['load_s']:>9.3f}{result['save_MB_per_s']:>11.0f}")
    print(f"(median of {result['repeat']}, written with fsync to {result['folder']})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
