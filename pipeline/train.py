"""Train DenseNet-BC: ``python -m pipeline.train CONFIG [key=value ...] [--print-config]``.

Every rank runs :func:`main`; rank 0 alone writes the run directory: ``config.yaml`` (resolved),
``metrics.jsonl``, ``model_final.pt`` (a torchvision-layout state_dict) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.checkpoint import atomic_torch_save, atomic_write_bytes
from pipeline.config import ConfigError, load_config, to_yaml
from pipeline.data.layout import DatasetError
from pipeline.data.loaders import build_loaders
from pipeline.data.synthetic import ensure_generated
from pipeline.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    init_distributed,
    replicas_identical,
    shutdown,
)
from pipeline.engine import build_optimizer, build_scaler, build_scheduler, evaluate, train_one_epoch
from pipeline.log import setup_logging
from pipeline.models import build_model
from pipeline.tracking import MetricsFile

log = logging.getLogger("pipeline.train")


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The global batch split evenly over ranks; one that does not divide is a config error."""
    if global_batch % world_size:
        raise ConfigError(f"train.batch_size={global_batch} (the global batch) does not divide evenly over "
                          f"{world_size} ranks. Use a multiple of {world_size}, e.g. "
                          f"{max(1, round(global_batch / world_size)) * world_size}.")
    return global_batch // world_size


def generate_data(cfg: DictConfig, dist: DistInfo) -> None:
    """Write the synthetic JPEG tree at ``data.root`` if the config asks for it and it is missing."""
    if cfg.data.backend != "synthetic" and cfg.data.generate.enabled and dist.is_main:
        ensure_generated(cfg.data.root, cfg.model.num_classes, cfg.data.generate, cfg.run.seed)
    barrier()


def prepare_run_dir(cfg: DictConfig, dist: DistInfo) -> Path:
    """Create ``run.dir`` and write the resolved config there (rank 0), once the config and data are valid."""
    run_dir = Path(cfg.run.dir)
    if dist.is_main:
        if cfg.run.resume == "never" and run_dir.is_dir() and any(run_dir.iterdir()):
            raise ConfigError(f"run.dir='{run_dir}' already holds files and run.resume=never. Choose a new "
                              "run.dir, or set run.resume=auto.")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", to_yaml(cfg).encode())
    barrier()
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(cfg: DictConfig) -> dict:
    """Train and evaluate as ``cfg`` says; returns the summary (on every rank)."""
    dist = init_distributed()
    setup_logging(dist.rank, dist.world_size)
    try:
        return _train(cfg, dist)
    finally:
        shutdown()


def _train(cfg: DictConfig, dist: DistInfo) -> dict:
    batch_size = per_rank_batch(cfg.train.batch_size, dist.world_size)
    generate_data(cfg, dist)
    train_loader, val_loader = build_loaders(cfg, dist, batch_size)
    run_dir = prepare_run_dir(cfg, dist)
    seed_everything(cfg.run.seed)
    device = dist.device
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg.model.name, cfg.model.num_classes, cfg.model.memory_efficient, cfg.model.drop_rate,
                        cfg.model.depth, cfg.model.growth_rate).to(device, memory_format=memory_format)
    net: nn.Module = model
    if dist.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)
    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(model, cfg.optim, cfg.train.batch_size)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.train.epochs, steps_per_epoch)
    scaler = build_scaler(device, cfg.train.precision)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    metrics = MetricsFile(run_dir / "metrics.jsonl") if dist.is_main else None
    params = sum(p.numel() for p in model.parameters())
    log.info("%s (%.2fM parameters) on %s x%d, %s, channels_last=%s, global batch %d, %d steps/epoch, run dir %s",
             cfg.model.name, params / 1e6, device.type, dist.world_size, cfg.train.precision,
             cfg.train.channels_last, cfg.train.batch_size, steps_per_epoch, run_dir)

    start = time.perf_counter()
    global_step, images_seen, best_top1, val = 0, 0, 0.0, {"top1": 0.0, "top5": 0.0}
    for epoch in range(cfg.train.epochs):
        epoch_start = time.perf_counter()

        def on_log(record: dict, epoch: int = epoch) -> None:
            log.info("epoch %d step %d/%d  loss %.4f  lr %.4g  %.0f img/s  data-wait %.0f%%", epoch + 1,
                     record["global_step"] - epoch * steps_per_epoch, steps_per_epoch, record["loss"],
                     record["lr"], record["images_per_s"], 100 * record["data_wait"])
            if metrics:
                metrics.log("train", epoch=epoch, **record)

        train_loader.set_epoch(epoch)
        show_bar = dist.is_main and sys.stderr.isatty()
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}", disable=not show_bar, leave=False) as bar:
            global_step, seen = train_one_epoch(net, train_loader, criterion, optimizer, scheduler, scaler,
                                                cfg.train, device, global_step, dist.world_size, on_log, bar)
        images_seen += int(all_reduce_sum(torch.tensor(float(seen), device=device)).item())
        train_seconds = time.perf_counter() - epoch_start
        broadcast_buffers(model)
        # the plain model: each rank evaluates its own share, with no DDP collective per batch
        val = evaluate(model, val_loader, device, cfg.train.precision, cfg.train.channels_last)
        best_top1 = max(best_top1, val["top1"])
        epoch_seconds = time.perf_counter() - epoch_start
        log.info("epoch %d/%d  val top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%d images)  epoch %.1fs",
                 epoch + 1, cfg.train.epochs, val["top1"], val["top5"], val["loss"], val["count"], epoch_seconds)
        if metrics:
            metrics.log("val", epoch=epoch, global_step=global_step, **val, epoch_seconds=epoch_seconds,
                        train_images_per_s=seen * dist.world_size / train_seconds)

    summary = {"epochs_completed": cfg.train.epochs, "global_step": global_step, "val_top1": val["top1"],
               "val_top5": val["top5"], "best_val_top1": best_top1, "images_seen": images_seen,
               "wall_seconds": round(time.perf_counter() - start, 2), "world_size": dist.world_size,
               "replicas_identical": replicas_identical(model)}
    if not summary["replicas_identical"]:
        log.error("The ranks' parameters differ at the end of training: the replicas drifted apart.")
    if dist.is_main:
        atomic_torch_save(model.state_dict(), run_dir / "model_final.pt")
        atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        metrics.log("summary", **summary)
        metrics.close()
        log.info("done: val top-1 %.2f%% (best %.2f%%), %d images in %.0fs; wrote %s", summary["val_top1"],
                 best_top1, images_seen, summary["wall_seconds"], run_dir)
    return summary


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML recipe, e.g. configs/mini.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value words that override the recipe")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        main(cfg)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
