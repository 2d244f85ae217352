"""The training step, the epoch loop and evaluation: AMP, channels-last, and no host sync per step."""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import nn

from pipeline import collective
from pipeline.finetune import train_mode

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision``; fp32 runs without one."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def tune_backends(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms for each new shape and keep the fastest.

    Training shapes are fixed, so the search runs once per shape (the first steps, and the last partial
    batch). The chosen kernels may differ from run to run: GPU runs agree up to float rounding, not bitwise.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def build_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A grad scaler, enabled for fp16 only (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def lr_factor(step: int, steps_per_epoch: int, epochs: int, schedule_cfg) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (warm-up, then step or cosine)."""
    epoch = step / steps_per_epoch
    warmup = schedule_cfg.warmup_epochs
    if epoch < warmup:
        return (step + 1) / (warmup * steps_per_epoch)
    if schedule_cfg.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))
    return schedule_cfg.gamma ** bisect.bisect_right(list(schedule_cfg.milestones), epoch)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule over ``epochs`` epochs of ``steps_per_epoch`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, epochs, schedule_cfg))


def step_flops(model_cfg, batch: int, image_size: int) -> float:
    """FLOPs of one training step (forward and backward) of one rank's batch, counted once by PyTorch's flop
    counter on a copy of the model on the meta device: no memory, no compute, and the real model untouched.
    The recomputation of memory-efficient layers is not counted (it is overhead, not model work). Rank 0 alone
    counts: a failure here costs the TFLOP/s figure (0, with a warning), never the run."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import build_model

    try:
        with torch.device("meta"):
            model = build_model(model_cfg.name, model_cfg.num_classes, False, model_cfg.drop_rate,
                                model_cfg.depth, model_cfg.growth_rate).train()
            images = torch.empty(batch, 3, image_size, image_size)
            labels = torch.zeros(batch, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            nn.functional.cross_entropy(model(images), labels).backward()
        return float(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 - a figure of the log, not worth a run
        logging.getLogger("pipeline.train").warning("Could not count the FLOPs of a step (%s): TFLOP/s logged as "
                                                    "0.", err)
        return 0.0


def compile_model(net: nn.Module, sizes_change: bool) -> nn.Module:
    """``torch.compile`` of ``net``. When the input size changes over the run (progressive resizing), each size
    gets a static graph of its own, compiled once: without ``dynamic=False`` the second size would compile a
    graph with dynamic shapes, slower for every later size."""
    return torch.compile(net, dynamic=False if sizes_change else None)


def compile_report() -> str:
    """How many graphs ``torch.compile`` captured: more than one means graph breaks split the model.

    DDP's own wrapper code always breaks around the model call; that costs nothing and is not counted.
    """
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # a PyTorch without these statistics
        return "torch.compile: no graph statistics in this PyTorch"
    graphs = counters["stats"]["unique_graphs"]
    if graphs == 0:
        return "torch.compile: no graph was captured, the model runs eagerly (is TORCHDYNAMO_DISABLE set?)"
    if graphs == 1:
        return "torch.compile: the model runs as 1 graph"
    reasons = sorted({reason.splitlines()[0] for reason in counters["graph_break"]})
    return f"torch.compile: graph breaks split the model into {graphs} graphs ({'; '.join(reasons)[:500]})"


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    return images, labels.to(device, non_blocking=True)


class StepResult(NamedTuple):
    """What a training step leaves on the device (no host sync): its loss; the true (unscaled) gradients' total
    norm where it was computed (fp16, or clipping), else None; and (fp16) whether the grad scaler skipped it."""
    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    skipped: torch.Tensor | None


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients, on the device (no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if hasattr(nn.utils, "get_total_norm"):  # torch >= 2.6
        return nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # torch 2.5, as clip_grad_norm_ does


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, precision: str,
               clip_grad_norm: float = 0.0) -> StepResult:
    """One forward, backward and optimizer step, the gradients' norm clipped to ``clip_grad_norm`` (0: not).

    With fp16 the gradients are unscaled before the step, so their norm is known on the device: it is not finite
    exactly when a gradient is not, which is what makes the grad scaler skip the step. An optimizer that takes
    the scaler's verdict on the device (fused SGD) then skips it without a host sync.
    """
    with autocast(images.device, precision):
        loss = criterion(model(images), labels)
    # zeroed in place: under DDP with gradient_as_bucket_view the gradients stay views of the all-reduce buckets
    # (set to None, each backward would allocate them anew and DDP copy them into the buckets)
    optimizer.zero_grad(set_to_none=False)
    scaler.scale(loss).backward()
    norm = None
    if scaler.is_enabled():
        scaler.unscale_(optimizer)  # the true gradients, for their norm (and clipping)
    if clip_grad_norm:
        norm = nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    elif scaler.is_enabled():
        norm = grad_norm(model.parameters())
    scaler.step(optimizer)
    scaler.update()
    skipped = ~torch.isfinite(norm) if scaler.is_enabled() else None
    return StepResult(loss.detach(), norm, skipped)


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler, train_cfg, device: torch.device, global_step: int,
                    world_size: int, on_log: Callable[[dict], None],
                    on_step: Callable[[int, torch.Tensor, torch.Tensor | None], bool],
                    progress=None, mixer: Callable | None = None, clip_grad_norm: float = 0.0,
                    forward_time: Callable[[], float] | None = None, last_step: int = 0) -> tuple[int, bool]:
    """Train over what ``loader`` yields; returns the new global step and whether ``on_step`` asked to stop.

    ``on_log`` gets a record every ``train_cfg.log_every_steps`` global steps and at global step ``last_step``
    (the run's last; with ``grad_norm``, the mean of the applied steps', where the step computes it);
    ``on_step(global_step, loss, skipped)`` runs after every step (checkpoints, stop signals, a finite loss, fp16
    steps skipped) and returns True to stop. ``mixer(images,
    labels)`` gives the batch to train on and its (soft) targets. ``forward_time()``: the seconds of forwards
    since its last call (read after the log line's sync); with the data wait, this rank's own time per step.
    """
    train_mode(model)  # the modules train.freeze froze stay in eval mode
    loss_sum = torch.zeros((), device=device)
    norm_sum = torch.zeros(2, device=device)  # the gradients' norms of the applied steps, and how many
    window_images, window_steps, data_wait = 0, 0, 0.0
    window_start = time.perf_counter()
    if forward_time is not None:
        forward_time()  # a window starts here (the forwards before it are complete: validation synced)
    batches = iter(loader)
    while True:
        fetch_start = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            return global_step, False
        data_wait += time.perf_counter() - fetch_start
        images, targets = _to_device(images, labels, device, train_cfg.channels_last)
        if mixer is not None:
            images, targets = mixer(images, targets)
        step = train_step(model, images, targets, criterion, optimizer, scaler, train_cfg.precision, clip_grad_norm)
        scheduler.step()
        loss_sum += step.loss
        if step.grad_norm is not None:
            applied = torch.isfinite(step.grad_norm)
            norm_sum += torch.stack([torch.where(applied, step.grad_norm, 0.0), applied.float()])
        global_step += 1
        window_steps += 1
        window_images += images.shape[0]
        if progress is not None:
            progress.update(1)
        if global_step % train_cfg.log_every_steps == 0 or global_step == last_step:
            mean_loss = loss_sum.item() / window_steps  # the one host sync, every log_every_steps steps
            elapsed = time.perf_counter() - window_start
            norms, applied = norm_sum.tolist()  # the device is idle by now: no wait
            forward = forward_time() if forward_time is not None else 0.0
            on_log({"loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                    "images_per_s": window_images * world_size / elapsed, "data_wait": data_wait / elapsed,
                    "global_step": global_step, "own_ms": 1e3 * (data_wait + forward) / window_steps,
                    "data_wait_ms": 1e3 * data_wait / window_steps,
                    **({"grad_norm": norms / applied} if applied else {})})
            if progress is not None:
                progress.set_postfix(loss=f"{mean_loss:.3f}")
            loss_sum.zero_()
            norm_sum.zero_()
            window_images, window_steps, data_wait = 0, 0, 0.0
            window_start = time.perf_counter()
        if on_step(global_step, step.loss, step.skipped):
            return global_step, True


def evaluate(model: nn.Module, loader: Iterable, device: torch.device, precision: str,
             channels_last: bool) -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean loss over every sample of ``loader`` on all ranks, from summed counts."""
    return evaluate_together([model], loader, device, precision, channels_last)[0]


@torch.no_grad()
def evaluate_together(models: list[nn.Module], loader: Iterable, device: torch.device, precision: str,
                      channels_last: bool) -> list[dict[str, float]]:
    """:func:`evaluate` of each of ``models`` in one pass over ``loader``: each batch is decoded once."""
    totals = torch.zeros(len(models), 4, dtype=torch.float64, device=device)  # correct@1, @5, loss sum, count
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for model in models:
        model.eval()
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        for k, model in enumerate(models):
            with autocast(device, precision):
                logits = model(images)
            logits = logits.float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:, None]
            totals[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), criterion(logits, labels),
                                      torch.tensor(labels.numel(), device=device)]).double()
    collective.all_reduce_sum(totals)
    results = []
    for correct1, correct5, loss_sum, count in totals.tolist():
        results.append({"top1": 100 * correct1 / max(count, 1.0), "top5": 100 * correct5 / max(count, 1.0),
                        "loss": loss_sum / max(count, 1.0), "count": int(count)})
    return results
