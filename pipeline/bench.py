"""Benchmarks that print figures: ``python -m pipeline.bench SUBCOMMAND [options] [--json FILE]``.

    checkpoint   save and load time and size of a full training checkpoint (model, SGD momentum,
                 schedule, grad scaler, per-rank loader and RNG state), written the way training writes it
    tracking     images/s of the mini config with MLflow tracking off and on (an SQLite store), and their ratio
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.checkpoint import FORMAT_VERSION, library_versions, load_checkpoint, rng_state, save_checkpoint
from pipeline.config import Config
from pipeline.engine import build_optimizer, build_scaler
from pipeline.models import build_model


def checkpoint_state(model_name: str, world_size: int) -> dict:
    """A checkpoint like training's, after one optimizer step (so SGD holds its momentum buffers)."""
    model = build_model(model_name)
    optim_cfg = Config().optim
    optimizer = build_optimizer(model, optim_cfg, 256)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rank = {"loader": {"epoch": 0, "dali": bytes(440)}, "rng": rng_state()}
    return {"format": FORMAT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": build_scaler(torch.device("cpu"), "fp16").state_dict(),
            "progress": {"epoch": 0, "step_in_epoch": 1, "global_step": 1}, "ranks": [rank] * world_size,
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


def _mini_images_per_s(run_dir: Path, words: list[str]) -> float:
    """Train the mini config once; the median images/s of its logged windows after the first."""
    config = Path(__file__).resolve().parents[1] / "configs" / "mini.yaml"
    subprocess.run([sys.executable, "-m", "pipeline.train", str(config), f"run.dir={run_dir}", *words], check=True,
                   capture_output=True, timeout=1800)
    rates = [json.loads(line)["images_per_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ckpt = sub.add_parser("checkpoint", help="save/load time and size of a training checkpoint")
    ckpt.add_argument("--model", default="densenet121")
    ckpt.add_argument("--world-size", type=int, default=8, help="ranks whose loader/RNG state it carries")
    ckpt.add_argument("--repeat", type=int, default=5)
    ckpt.add_argument("--dir", default=None, help="where to write (default: the temp folder)")
    ckpt.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    track = sub.add_parser("tracking", help="mini config images/s with tracking off and on")
    track.add_argument("--epochs", type=int, default=4)
    track.add_argument("--repeat", type=int, default=2)
    track.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
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
