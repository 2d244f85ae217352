"""Evaluate weights on the validation split: ``python -m pipeline.evaluate CONFIG WEIGHTS [key=value ...]``.

Runs in one process or under torchrun / ``launch.local``; each rank evaluates its own share of
the split and the counts are summed, so the result does not depend on the world size. Prints
and writes ``eval.json`` (``top1``, ``top5`` in percent, ``loss``, ``count``) beside the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.checkpoint import WeightsError, atomic_write_bytes, read_weights
from pipeline.cli import command, swapped_roles
from pipeline.config import global_batch, load_config
from pipeline.data.loaders import build_loaders
from pipeline.distributed import init_distributed, shutdown
from pipeline.engine import evaluate
from pipeline.log import setup_logging
from pipeline.models import build_model

log = logging.getLogger("pipeline.evaluate")


def load_weights(model: nn.Module, path: str | Path, model_cfg) -> None:
    """Load a ``model_final.pt`` state_dict, or the ``model`` entry of a checkpoint, strictly into ``model``."""
    state = read_weights(path)
    result = model.load_state_dict(state, strict=False)
    mismatched = [k for k, v in state.items() if k in model.state_dict() and model.state_dict()[k].shape != v.shape]
    if result.missing_keys or result.unexpected_keys or mismatched:
        raise WeightsError(
            f"'{path}' does not fit model.name={model_cfg.name} with model.num_classes={model_cfg.num_classes}: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]}), "
            f"{len(mismatched)} of another shape (e.g. {mismatched[:2]}). Set model.* to the model it was trained as."
        )


def result_path(weights: str | Path, out: str | Path | None) -> Path:
    """Where the result goes: ``out``, or eval.json beside the weights."""
    return Path(out) if out else Path(weights).parent / "eval.json"


def main(cfg: DictConfig, weights: str | Path, out: str | Path | None = None) -> dict:
    """Evaluate ``weights`` on ``cfg``'s validation split; rank 0 writes the result to ``out``."""
    dist = init_distributed(cfg.run.dist_timeout_s)
    setup_logging(dist.rank, dist.world_size)
    together = False  # every rank finished: leave the group together (see pipeline.distributed.shutdown)
    try:
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        model = build_model(cfg.model.name, cfg.model.num_classes, depth=cfg.model.depth,
                            growth_rate=cfg.model.growth_rate)
        load_weights(model, weights, cfg.model)
        model = model.to(dist.device, memory_format=memory_format)
        batch = cfg.data.val_batch_size or max(1, global_batch(cfg.train, dist.world_size) // dist.world_size)
        _, val_loader = build_loaders(cfg, dist, batch, train=False)
        result = evaluate(model, val_loader, dist.device, cfg.train.precision, cfg.train.channels_last)
        together = True  # the last collective is behind every rank: rank 0's write below cannot strand the others
        if dist.is_main:
            out = result_path(weights, out)
            atomic_write_bytes(out, json.dumps({**result, "weights": str(weights), "world_size": dist.world_size},
                                               indent=2).encode())
            log.info("top-1 %.2f%%  top-5 %.2f%%  loss %.4f  over %d images; wrote %s", result["top1"],
                     result["top5"], result["loss"], result["count"], out)
            print(json.dumps(result))
        return result
    finally:
        shutdown(together)


@command()
def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the run's config.yaml or a recipe")
    parser.add_argument("weights", help="model_final.pt or a checkpoint")
    parser.add_argument("overrides", nargs="*", help="key=value words that override the config")
    parser.add_argument("--out", help="where to write eval.json (default: beside the weights)")
    args = parser.parse_intermixed_args(argv)
    swapped = swapped_roles("python -m pipeline.evaluate CONFIG WEIGHTS [key=value ...]", args.config, args.weights)
    if swapped:
        parser.error(swapped)
    out = result_path(args.weights, args.out)
    if not os.access(out.parent, os.W_OK):  # known before any rank spends an evaluation on it
        print(f"error: cannot write {out}: its folder is missing or not writable. Pass --out with a path this "
              "user can write.", file=sys.stderr)
        return 2
    main(load_config(args.config, args.overrides), args.weights, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
