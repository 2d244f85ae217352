"""Evaluate weights on the validation split: ``python -m pipeline.evaluate CONFIG WEIGHTS [key=value ...]``.

Runs in one process or under torchrun / ``launch.local``; each rank evaluates its own share of
the split and the counts are summed, so the result does not depend on the world size. Prints
and writes ``eval.json`` (``top1``, ``top5`` in percent, ``loss``, ``count``, and the paper's
``top1_err``, ``top5_err``) beside the weights.

The views, as the DenseNet paper reports ImageNet results: the centre crop of the config's val sizes (the
default: the numbers training logs), any ``--resize R --crop C``, the paper's ``--crops 10`` (four corners and
the centre, and the same of the mirror image), ``--flip`` (the centre crop and the mirror image's). Several
views of an image count as one prediction: the mean of their softmax probabilities, as the paper's Caffe
models and torchvision's reference do; its loss is the negative log of that mean's true class. When the
weights sit in a tracked run directory (its ``mlflow_run.json``), the errors are logged to that MLflow run
as ``eval/top1_err_<views>`` at the step of its last validation, its status untouched. With several views the
centre crop alone (single-crop) is measured in the same pass and reported beside them, as the paper's table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline import collective
from pipeline.checkpoint import WeightsError, atomic_write_bytes, read_weights
from pipeline.cli import command, swapped_roles
from pipeline.config import ConfigError, global_batch, load_config
from pipeline.data.loaders import build_loaders
from pipeline.data.order import val_sizes
from pipeline.data.views import CROPS, Views
from pipeline.distributed import init_distributed, shutdown
from pipeline.engine import autocast, evaluate
from pipeline.log import setup_logging
from pipeline.models import build_model
from pipeline.tracking import RUN_ID_FILE, connect, default_uri, redact

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


def views_of(cfg: DictConfig, crops: int = 1, flip: bool = False, resize: int = 0, crop: int = 0) -> Views:
    """The views to evaluate: ``crops`` (1 or 10), ``flip``, and the shorter side ``resize`` and square ``crop``
    (0: the config's ``data.val_resize`` and ``data.val_image_size``, and their defaults). Bad values are refused
    by the option's name."""
    if crops not in CROPS:
        raise ConfigError(f"--crops {crops}: the paper's modes are --crops 1 (the centre crop) and --crops 10 (four "
                          "corners and the centre, and the same of the mirror image).")
    if crops == 10 and flip:
        raise ConfigError("--flip with --crops 10: the ten crops hold the mirror image's five already. Drop --flip.")
    if cfg.data.backend == "synthetic" and (crops > 1 or flip):
        raise ConfigError(f"--{'crops 10' if crops > 1 else 'flip'} with data.backend=synthetic: random tensors have "
                          "no images to crop or mirror. Evaluate on a dataset (data.backend=dali or torchvision).")
    if resize < 0 or crop < 0:
        raise ConfigError(f"--resize {resize} --crop {crop}: sizes are whole numbers of pixels, at least 1.")
    size, resize_for_size = val_sizes(cfg.data)
    if crop:  # a crop of its own is resized from 256/224 of it, as torchvision's recipe, unless --resize says
        size, resize_for_size = crop, round(crop * 256 / 224)
    resize = resize or resize_for_size
    if size > resize:
        raise ConfigError(f"--crop {size} is larger than --resize {resize} (the shorter side of the resized image): "
                          f"the crop would not fit. Pass --resize {round(size * 256 / 224)} (256/224 of the crop) or "
                          "more, or a smaller --crop.")
    return Views(resize, size, crops, flip)


def paper_name(views: Views, cfg: DictConfig) -> str:
    """The views as a metric name's tail: ``1crop``, ``1crop_flip`` or ``10crop``; with sizes other than the
    config's val sizes, ``_<resize>to<crop>`` after it."""
    name = f"{views.crops}crop{'_flip' if views.flip else ''}"
    return name if (views.size, views.resize) == val_sizes(cfg.data) else f"{name}_{views.resize}to{views.size}"


@torch.no_grad()
def evaluate_views(model: nn.Module, loader, views: Views, device: torch.device, precision: str,
                   channels_last: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Top-1 / top-5 (percent) and mean loss over every sample of ``loader`` on all ranks, from summed counts, of
    each sample's prediction: the mean of its ``views.count`` views' softmax probabilities; and the same of its
    centre crop alone (the single-crop view), from the same forward pass."""
    totals = torch.zeros(2, 4, dtype=torch.float64, device=device)  # (views, centre) x (correct@1, @5, loss, count)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.eval()
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images)
        probs = logits.float().softmax(dim=1).view(len(labels), views.count, -1)
        for k, prediction in enumerate((probs.mean(dim=1), probs[:, views.centre])):
            hits = prediction.topk(min(5, prediction.shape[1]), dim=1).indices == labels[:, None]
            nll = -prediction.gather(1, labels[:, None]).clamp_min(torch.finfo(prediction.dtype).tiny).log()
            totals[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), nll.sum(),
                                      torch.tensor(labels.numel(), device=device)]).double()
    collective.all_reduce_sum(totals)
    return tuple({"top1": 100 * correct1 / max(count, 1.0), "top5": 100 * correct5 / max(count, 1.0),
                  "loss": loss_sum / max(count, 1.0), "count": int(count)}
                 for correct1, correct5, loss_sum, count in totals.tolist())


def with_errors(result: dict[str, float]) -> dict[str, float]:
    """``result`` with the paper's top-1 and top-5 error (percent) beside the accuracy."""
    return {**result, "top1_err": 100 - result["top1"], "top5_err": 100 - result["top5"]}


def log_to_run(cfg: DictConfig, weights: str | Path, metrics: dict[str, float]) -> str | None:
    """Log ``metrics`` to the MLflow run of the run directory holding ``weights``, at the step of its last
    validation, without touching its status; what was done, or None when the weights are not in a tracked run.
    A store that fails is a warning: the evaluation is written already."""
    id_file = Path(weights).parent / RUN_ID_FILE
    if cfg.tracking.backend == "none" or not id_file.is_file():
        return None
    uri = cfg.tracking.uri or default_uri(id_file.parent)
    try:
        run_id = json.loads(id_file.read_text())["run_id"]
        client = connect(uri)
        step = max((m.step for m in client.get_metric_history(run_id, "val/top1")), default=0)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
    except Exception as err:  # noqa: BLE001 - the result is on disk; the store's outage is reported, not fatal
        log.warning("Could not log the evaluation to the MLflow run of %s at %s: %s: %s", id_file, redact(uri),
                    type(err).__name__, str(err).splitlines()[0][:300] if str(err) else "")
        return None
    return f"logged {', '.join(metrics)} to MLflow run {run_id} at step {step}"


def main(cfg: DictConfig, weights: str | Path, out: str | Path | None = None, views: Views | None = None) -> dict:
    """Evaluate ``weights`` on ``cfg``'s validation split, through ``views`` (default: the config's centre crop,
    exactly as training evaluates); rank 0 writes the result to ``out`` and logs it to the weights' MLflow run."""
    views = views or views_of(cfg)
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
        name = paper_name(views, cfg)
        if views.count == 1:  # one centre crop: the val loader's own, as training evaluates
            sized = OmegaConf.merge(cfg, {"data": {"val_resize": views.resize, "val_image_size": views.size}})
            _, val_loader = build_loaders(sized, dist, batch, train=False)
            result = with_errors(evaluate(model, val_loader, dist.device, cfg.train.precision,
                                          cfg.train.channels_last))
            table = {name: result}
        else:
            _, val_loader = build_loaders(cfg, dist, batch, train=False, views=views)
            result, centre = map(with_errors, evaluate_views(model, val_loader, views, dist.device,
                                                             cfg.train.precision, cfg.train.channels_last))
            table = {paper_name(Views(views.resize, views.size), cfg): centre, name: result}
            result["single_crop"] = centre
        together = True  # the last collective is behind every rank: rank 0's write below cannot strand the others
        result.update(views=name, crops=views.crops, flip=views.flip, resize=views.resize, crop=views.size)
        if dist.is_main:
            out = result_path(weights, out)
            atomic_write_bytes(out, json.dumps({**result, "weights": str(weights), "world_size": dist.world_size},
                                               indent=2).encode())
            log.info("%d images, shorter side resized to %d, crops of %d; wrote %s", result["count"], views.resize,
                     views.size, out)
            for row, numbers in table.items():  # the paper's table: errors, then the accuracy beside them
                log.info("%-20s top-1 error %6.2f%%  top-5 error %6.2f%%   (top-1 %6.2f%%  top-5 %6.2f%%  loss %.4f)",
                         row, numbers["top1_err"], numbers["top5_err"], numbers["top1"], numbers["top5"],
                         numbers["loss"])
            print(json.dumps(result))
            logged = log_to_run(cfg, weights, {f"eval/{kind}_err_{row}": numbers[f"{kind}_err"]
                                               for row, numbers in table.items() for kind in ("top1", "top5")})
            if logged:
                log.info("%s", logged)
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
    parser.add_argument("--crops", type=int, default=1,
                        help="1: the centre crop; 10: the paper's four corners and centre, and the mirror image's")
    parser.add_argument("--flip", action="store_true", help="average the centre crop with the mirror image's")
    parser.add_argument("--resize", type=int, default=0,
                        help="resize the shorter side to this first (default: the config's data.val_resize)")
    parser.add_argument("--crop", type=int, default=0,
                        help="the square crop (default: the config's data.val_image_size, else data.image_size)")
    args = parser.parse_intermixed_args(argv)
    swapped = swapped_roles("python -m pipeline.evaluate CONFIG WEIGHTS [key=value ...]", args.config, args.weights)
    if swapped:
        parser.error(swapped)
    out = result_path(args.weights, args.out)
    if not os.access(out.parent, os.W_OK):  # known before any rank spends an evaluation on it
        print(f"error: cannot write {out}: its folder is missing or not writable. Pass --out with a path this "
              "user can write.", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    main(cfg, args.weights, args.out, views_of(cfg, args.crops, args.flip, args.resize, args.crop))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
