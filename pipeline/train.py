"""Train DenseNet-BC: ``python -m pipeline.train CONFIG [key=value ...] [--print-config]``.

Every rank runs :func:`main`; rank 0 alone writes the run directory: ``config.yaml`` (resolved),
``metrics.jsonl``, ``checkpoints/``, ``model_final.pt`` (a torchvision-layout state_dict) and
``summary.json``. Started again with the same command, a run resumes from its newest good
checkpoint exactly where it stopped. A stop signal (SIGTERM, SIGUSR1, SIGUSR2) checkpoints at the
next step boundary and exits with status 75: "start me again to resume".
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import random
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline import collective
from pipeline.boundary import NONFINITE_EXIT_CODE, NonFiniteLoss, StepBoundary
from pipeline.checkpoint import (
    FORMAT_VERSION,
    RESUME_EXIT_CODE,
    CheckpointError,
    atomic_torch_save,
    atomic_write_bytes,
    check_resumable,
    find_and_load_latest,
    library_versions,
    load_checkpoint,
    resume_hint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwritable,
)
from pipeline.cli import USER_ERRORS, command
from pipeline.config import (
    WARMUP_ABOVE,
    ConfigError,
    flatten,
    global_batch,
    load_config,
    schema_defaults,
    to_yaml,
    warmup_epochs,
)
from pipeline.data.index import describe_change
from pipeline.data.layout import DatasetError
from pipeline.data.loaders import build_loaders, dataset_index
from pipeline.data.order import epoch_order, train_image_size
from pipeline.data.synthetic import ensure_generated
from pipeline.distributed import DistInfo, disagreements, init_distributed, placement, shutdown
from pipeline.ema import WeightsEma
from pipeline.engine import (
    build_scaler,
    build_scheduler,
    compile_model,
    compile_report,
    evaluate_together,
    step_flops,
    train_one_epoch,
    tune_backends,
)
from pipeline.finetune import InitWeights, compare_on_resume, freeze, load_init, read_init
from pipeline.hang import HangWatch
from pipeline.insights import start_insights
from pipeline.lock import LOCK_FILE, SAME_JOB_GRACE_S, RunDirLock, RunDirLocked, describe, holds_files
from pipeline.log import add_log_file, setup_logging
from pipeline.mix import BatchMixer, mixing_enabled
from pipeline.models import build_model
from pipeline.optim import LARS_ABOVE, build_optimizer, load_optimizer_state, parameter_groups, regroup_state
from pipeline.profiling import StepProfiler
from pipeline.signals import StopRequested, StopSignals
from pipeline.stragglers import ForwardTimer, RankFigures, StragglerWatch
from pipeline.tracking import MetricsFile, TrackingError, finish_on_error, open_tracker, start_node_metrics

log = logging.getLogger("pipeline.train")

# the errors that refuse a run (exit 2): a config, dataset, checkpoint, weights file, tracking, rank or run dir a
# person must fix; the same list every command's cli() turns into one line
REFUSALS = USER_ERRORS


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch in progress, or the next to start
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    global_step: int = 0
    best_val_top1: float = 0.0
    best_step: int = -1
    best_of: str = "model"  # whose val top-1 best_val_top1 is: the model's or its EMA's (checkpoint.best)
    val: dict = field(default_factory=lambda: {"top1": 0.0, "top5": 0.0})  # the last validation (and its EMA's)
    wall_seconds: float = 0.0  # over all attempts


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The global batch split evenly over ranks; one that does not divide is a config error."""
    if global_batch % world_size:
        raise collective.on_every_rank(ConfigError(
            f"train.batch_size={global_batch} (the global batch) does not divide evenly over {world_size} ranks. "
            f"Use a multiple of {world_size}, e.g. {max(1, round(global_batch / world_size)) * world_size}."))
    return global_batch // world_size


def check_batch_settings(cfg: DictConfig, dist: DistInfo, batch: int, per_rank: int, warmup: float) -> None:
    """Refuse SyncBN without CUDA; warn (rank 0, once) of a small per-GPU batch and of no warm-up at a large one."""
    if cfg.model.sync_bn and dist.device.type != "cuda":
        raise collective.on_every_rank(ConfigError(
            "model.sync_bn=true needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only. Set model.sync_bn=false "
            "on CPU ranks."))
    if cfg.schedule.warmup_epochs == "auto" and warmup >= cfg.train.epochs:  # a number is checked with the config
        raise collective.on_every_rank(ConfigError(
            f"schedule.warmup_epochs=auto warms up for {warmup:g} epochs at a global batch of {batch} (above "
            f"{WARMUP_ABOVE}), but train.epochs={cfg.train.epochs}: the warm-up would never end. Train for more "
            f"than {warmup:g} epochs, or set schedule.warmup_epochs to fewer epochs than train.epochs."))
    repeats = cfg.data.aug_repeats
    if batch % repeats:
        raise collective.on_every_rank(ConfigError(
            f"data.aug_repeats={repeats} puts each sample of a global batch in it {repeats} times, in {repeats} equal "
            f"parts, but the global batch of {batch} does not divide by {repeats}. Use a global batch that does, "
            f"e.g. {max(1, batch // repeats) * repeats}, or another data.aug_repeats."))
    if mixing_enabled(cfg.train.mix) and per_rank % 2:
        fix = (f"train.batch_per_gpu={per_rank + 1}" if cfg.train.batch_per_gpu is not None else
               f"train.batch_size={(per_rank + 1) * dist.world_size} (now {batch} over {dist.world_size} ranks)")
        raise collective.on_every_rank(ConfigError(
            f"train.mix pairs each image with its neighbour (2k, 2k + 1) of the global batch, so that the mixed "
            f"batch is the same at any world size; {per_rank} images per rank would split a pair between ranks. "
            f"Use an even per-rank batch, e.g. {fix}."))
    if not dist.is_main:
        return
    if per_rank < 32 and not (cfg.model.sync_bn and dist.world_size > 1):
        if dist.device.type == "cuda" and dist.world_size > 1:  # on one GPU SyncBatchNorm has no other images
            fix = ", or set model.sync_bn=true to normalise over all ranks' images"
        elif dist.world_size > 1:  # SyncBatchNorm runs on GPUs only
            fix = (f", or run fewer CPU ranks: the same global batch of {batch} on fewer ranks gives each more images "
                   "(model.sync_bn needs CUDA)")
        else:
            fix = ""
        log.warning("%d images per %s: BatchNorm's statistics over fewer than 32 images are noisy and hurt "
                    "accuracy (Wu & He 2018). Raise the global batch (train.batch_per_gpu=64, with "
                    "schedule.warmup_epochs=auto)%s.", per_rank, "GPU" if dist.device.type == "cuda" else "rank", fix)
    if cfg.optim.name == "lars" and (cfg.optim.norm_weight_decay is None or cfg.optim.bias_weight_decay is None):
        log.warning("optim.name=lars with optim.norm_weight_decay=%s and optim.bias_weight_decay=%s: LARS then adapts "
                    "and decays normalisation layers and biases too, which You et al. (2017) and timm leave out. Set "
                    "optim.norm_weight_decay=0 optim.bias_weight_decay=0.", cfg.optim.norm_weight_decay,
                    cfg.optim.bias_weight_decay)
    if cfg.optim.name == "lars" and cfg.train.precision == "fp16":
        log.info("optim.name=lars with train.precision=fp16: the grad scaler reads on the host whether to skip each "
                 "step before LARS steps (one device sync per step; fused SGD or bf16 have none).")
    if batch > LARS_ABOVE and cfg.optim.name != "lars":
        log.warning("A global batch of %d with optim.name=%s: above %d, SGD with the linear scaling rule is known to "
                    "lose accuracy (Goyal et al. 2017 reached 8k). Set optim.name=lars (layer-wise trust ratios, "
                    "You et al. 2017) with optim.norm_weight_decay=0 optim.bias_weight_decay=0, or a smaller batch.",
                    batch, cfg.optim.name, LARS_ABOVE)
    if batch > WARMUP_ABOVE and warmup == 0:
        log.warning("schedule.warmup_epochs=0 at a global batch of %d: the learning rate starts at %.3g on step 1, "
                    "where large batches diverge or lose accuracy without a warm-up (Goyal et al. 2017 warm up "
                    "for 5 epochs). Use schedule.warmup_epochs=auto.", batch, cfg.optim.lr * batch / 256)


def first_step_cost(cfg: DictConfig, device: torch.device) -> str:
    """Why the first training step takes longer than the others, in words for the log."""
    causes = ["the loader starts its workers and fills its queue"]
    if cfg.train.compile:
        causes.append("torch.compile compiles the forward and backward")
    if device.type == "cuda":
        causes.append("CUDA and cuDNN initialise and choose their kernels")
    return "; ".join(causes)


def build_net(model_cfg: DictConfig, device: torch.device, channels_last: bool, world_size: int) -> nn.Module:
    """The model on ``device`` (channels-last if asked); with ``model.sync_bn`` over several ranks its
    BatchNorms become SyncBatchNorm, which normalise over every rank's batch (before DDP wraps it)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_cfg.name, model_cfg.num_classes, model_cfg.memory_efficient, model_cfg.drop_rate,
                        model_cfg.depth, model_cfg.growth_rate).to(device, memory_format=memory_format)
    if model_cfg.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``model`` under DDP, without DDP's broadcast of rank 0's buffers at every forward: the forward then holds
    no collective, so its time is the rank's own (:mod:`pipeline.stragglers`). BatchNorm in training uses the
    batch's statistics, never the running ones, so no step changes; rank 0's running statistics, the ones saved,
    are its own either way, and reach the other ranks before evaluating (``collective.broadcast_buffers``)."""
    # the gradients are views of the all-reduce buckets: no copy into them, no second copy in memory. static_graph
    # stays off: every parameter is used at every step and the checkpointed layers are non-reentrant, which DDP
    # handles without it; with torch.compile it is known to clash with dynamo's DDPOptimizer (pytorch#109261)
    common = dict(device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:  # newer PyTorch
        return DistributedDataParallel(model, forward_sync_buffers=False, **common)
    return DistributedDataParallel(model, broadcast_buffers=False, **common)


def generate_data(cfg: DictConfig, dist: DistInfo) -> None:
    """Write the synthetic JPEG tree at ``data.root`` if the config asks for it and it is missing."""
    problem = None
    if cfg.data.backend != "synthetic" and cfg.data.generate.enabled and dist.is_main:
        try:
            ensure_generated(cfg.data.root, cfg.model.num_classes, cfg.data.generate, cfg.run.seed)
        except OSError as err:
            problem = (f"Cannot write the generated dataset at data.root='{cfg.data.root}' ({err}): choose a "
                       "data.root this user can write, with room for it.")
    collective.main_decides(problem, DatasetError)  # the others wait for rank 0's tree (or its error)


def find_resume_checkpoint(cfg: DictConfig, dist: DistInfo, dataset: dict | None) -> dict | None:
    """The checkpoint to resume from, by ``run.resume``; rank 0 chooses, every rank loads the same file.

    ``dataset`` is the index's :meth:`~pipeline.data.index.DatasetIndex.summary` (None for synthetic data).
    A checkpoint of another dataset index is refused, or (``run.on_dataset_change=next_epoch``) marked
    ``dataset_changed`` for the run to continue from the next epoch boundary on the new one.
    """
    choice: tuple[str | None, str | None] = (None, None)  # (path, error)
    if dist.is_main:
        try:
            run_dir = Path(cfg.run.dir)
            if cfg.run.resume == "never" and holds_files(run_dir):
                raise ConfigError(f"run.dir='{run_dir}' already holds files and run.resume=never. Choose a new "
                                  "run.dir, or set run.resume=auto to continue the run in it.")
            if cfg.run.resume == "auto":
                found = find_and_load_latest(run_dir)
                choice = (str(found[1]) if found else None, None)
            elif cfg.run.resume != "never":
                choice = (cfg.run.resume, None)
        except (CheckpointError, ConfigError) as err:
            choice = (None, str(err))
    path, error = collective.broadcast_from_main(choice)
    if error:
        raise collective.on_every_rank(CheckpointError(error))
    if path is None:
        return None
    state, problem = None, None
    try:  # every rank reads the file itself: one that cannot (another node's view of it) stops them all
        state = load_checkpoint(path)
        check_resumable(state["config"], OmegaConf.to_container(cfg), Path(path))
    except (CheckpointError, OSError) as err:
        problem = str(err) if dist.world_size == 1 else f"rank {dist.rank} on {socket.gethostname()}: {err}"
    collective.first_problem_stops_all(problem, CheckpointError)
    saved_batch = state.get("global_batch") or global_batch(OmegaConf.create(state["config"]).train,
                                                            state["world_size"])
    if saved_batch != global_batch(cfg.train, dist.world_size):
        how = (f"train.batch_per_gpu={cfg.train.batch_per_gpu} x {dist.world_size} ranks"
               if cfg.train.batch_per_gpu is not None else f"train.batch_size={cfg.train.batch_size}")
        raise collective.on_every_rank(CheckpointError(
            f"Cannot resume from {path}: the global batch changes from {saved_batch} to "
            f"{global_batch(cfg.train, dist.world_size)} ({how}). The learning rate and the epochs' order are "
            "built on the global batch: keep it (with a per-GPU batch, keep the number of ranks, or set "
            f"train.batch_size={saved_batch} train.batch_per_gpu=null), or start a new run.dir."))
    saved, current = state.get("dataset"), dataset
    state["dataset_changed"] = bool(saved and current and saved["hash"] != current["hash"])
    if state["dataset_changed"] and cfg.run.on_dataset_change == "refuse":
        raise collective.on_every_rank(CheckpointError(
            f"{path} was trained on dataset index {saved['hash'][:16]} and data.root='{cfg.data.root}' now has "
            f"index {current['hash'][:16]} ({describe_change(saved, current)}). Resuming would read another "
            "order: samples repeated or skipped. Restore the dataset the run was trained on, or set "
            "run.on_dataset_change=next_epoch to continue from the next epoch boundary on the new one."))
    state["path"] = path
    return state


def restore(resume: dict, dist: DistInfo, cfg: DictConfig, progress: Progress, train_loader, scheduler,
            steps_per_epoch: int) -> None:
    """Put the loader, the schedule and the random generators where the checkpoint left them.

    The loader's state is the position in the epoch's global order, so any world size can continue it;
    the per-rank random generators return only at the world size that saved them.
    """
    if resume["dataset_changed"]:
        if progress.step_in_epoch:
            log.warning("The dataset changed since the checkpoint (run.on_dataset_change=next_epoch): the rest of "
                        "epoch %d is skipped (no validation for it); training continues at epoch %d on the new "
                        "dataset.", progress.epoch + 1, progress.epoch + 2)
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
        else:
            log.warning("The dataset changed since the checkpoint (run.on_dataset_change=next_epoch): epoch %d "
                        "starts on the new dataset.", progress.epoch + 1)
        scheduler.last_epoch = progress.epoch * steps_per_epoch - 1  # the schedule at this epoch's start
        scheduler.step()
    elif 0 < progress.step_in_epoch < steps_per_epoch:
        train_loader.load_state_dict(resume["loader"])
    if resume["world_size"] == dist.world_size:
        set_rng_state(resume["ranks"][dist.rank]["rng"])
    else:
        seed_everything(cfg.run.seed * 1_000_003 + progress.global_step * 1009 + dist.rank)
        log.info("Resuming on %d ranks a run saved by %d: the same global batches, in the same order, with the "
                 "same crops; each rank's other random draws (dropout) start from a fresh seed.",
                 dist.world_size, resume["world_size"])


def prepare_run_dir(cfg: DictConfig, dist: DistInfo) -> Path:
    """Create ``run.dir`` and write the resolved config there (rank 0), once config, data and resume are valid."""
    run_dir = Path(cfg.run.dir)
    problem = None
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(run_dir / "config.yaml", to_yaml(cfg).encode())
            add_log_file(run_dir / "train.log")
        except OSError as err:  # a full disk or a quota, before any step
            problem = f"Cannot write run.dir='{run_dir}' ({err}): free space there, or choose another run.dir."
    collective.main_decides(problem, ConfigError)
    return run_dir


def node_ids(local_ranks: list[int]) -> list[str | None]:
    """Each rank's node as system metrics name it (``node0``, ``node1``, ... in rank order), on the first rank of
    each node (local rank 0), None elsewhere; None everywhere on one node (its metrics keep their plain names)."""
    leaders = [rank for rank, local in enumerate(local_ranks) if local == 0]
    names: list[str | None] = [None] * len(local_ranks)
    if len(leaders) > 1:
        for node, rank in enumerate(leaders):
            names[rank] = f"node{node}"
    return names


def start_tracking(cfg: DictConfig, dist: DistInfo, run_dir: Path, hosts: list[str] | None,
                   local_ranks: list[int] | None, held: ExitStack):
    """Rank 0's MLflow tracker (or None); a required server that cannot be reached stops every rank. On several
    nodes, the first rank of every other node logs its node's system metrics into the same run (``hosts`` and
    ``local_ranks``: every rank's, on rank 0)."""
    tracker, error, nodes = None, None, [None] * dist.world_size
    if dist.is_main:
        if dist.world_size > 1:
            log.info("%s; rendezvous %s:%s", placement(hosts), os.environ.get("MASTER_ADDR", "?"),
                     os.environ.get("MASTER_PORT", "?"))
        nodes = node_ids(local_ranks)
        try:
            tracker = open_tracker(cfg, run_dir, dist.world_size, hosts, nodes)
        except TrackingError as err:
            error = str(err)
    run_id, error, node = collective.broadcast_from_main((tracker.run_id if tracker else None, error, nodes)) \
        if dist.world_size > 1 else (None, error, nodes)
    if error:
        raise collective.on_every_rank(TrackingError(error))
    if run_id and node[dist.rank] and not dist.is_main:
        monitor = start_node_metrics(cfg, run_id, node[dist.rank])
        if monitor:
            held.callback(monitor.finish)
    return tracker


# keys that may differ between ranks: where each node finds its copy of the data and how it reads it, and
# rank 0's choice of the checkpoint (every rank loads the one rank 0 names)
PER_NODE_KEYS = ("data.root", "data.workers", "data.prefetch", "data.read_ahead", "data.check_shards",
                 "run.resume")


def run_fingerprint(cfg: DictConfig) -> dict:
    """What every rank must share before anything else: the resolved config (less :data:`PER_NODE_KEYS` and the
    launcher's and tracking's sections, which no rank trains by) and the versions of the libraries it computes
    with (DALI's only when it decodes)."""
    config = {k: v for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()
              if k not in PER_NODE_KEYS and not k.startswith(("slurm.", "tracking."))}
    versions = {**library_versions(), "numpy": np.__version__}
    names = ("torch", "torchvision", "numpy") + (("dali",) if cfg.data.backend == "dali" else ())
    return {**config, **{f"version of {name}": versions[name] for name in names}}


def order_fingerprint(dataset: dict, seed: int, epoch: int, global_batch: int, repeats: int) -> dict:
    """The dataset index and the first ids of the epoch's order (``torch.randperm`` differs across builds)."""
    order = epoch_order(dataset["counts"]["train"], epoch, seed, global_batch, repeats)
    return {"dataset index": dataset["hash"][:16], f"first sample ids of epoch {epoch + 1}": order[:8].tolist()}


def check_ranks_agree(dist: DistInfo, fingerprint: dict) -> None:
    """Stop every rank if any rank's ``fingerprint`` differs from rank 0's, naming the keys, ranks and hosts."""
    if dist.world_size == 1:
        return
    found = collective.gather_to_main((fingerprint, socket.gethostname()))
    differ = disagreements([f for f, _ in found], [host for _, host in found]) if found is not None else None
    collective.main_decides(
        f"The ranks do not run the same thing: {differ}. Every rank must train with the same config and the same "
        "software, or they read different samples and compute different steps: start every node with the same "
        "command and overrides, in the same environment or container (data.root, data.workers, data.prefetch, "
        "data.read_ahead and data.check_shards may differ between nodes)." if differ else None, ConfigError)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(cfg: DictConfig, on_end: Callable[[BaseException | None, DistInfo], None] | None = None) -> dict:
    """Train and evaluate as ``cfg`` says; returns the summary (on every rank).

    Raises :class:`StopRequested` after checkpointing when a stop signal arrived. ``on_end(error or None,
    dist)`` runs on every rank before the ranks leave the group (together, when they agreed on the end): what
    it writes is on disk before any rank exits (``launch.slurm`` records there how the attempt ended).
    """
    dist = init_distributed(cfg.run.dist_timeout_s)
    setup_logging(dist.rank, dist.world_size)
    signals = StopSignals().install()
    together, ended = False, None
    try:
        with ExitStack() as held:  # released on every way out: the run dir's lock, the loaders' workers
            summary = _train(cfg, dist, signals, held)
        together = True
        return summary
    except BaseException as err:
        together = isinstance(err, StopRequested) or getattr(err, "on_every_rank", False)
        ended = err
        # the finished frames' locals (the run, its DDP model and the model's group) go now, not with the
        # traceback, which a caller may keep until the interpreter exits: shutdown frees the group
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        signals.uninstall()
        if on_end:
            try:
                on_end(ended, dist)
            except Exception as err:  # it must not hide how the run ended, nor keep the ranks from leaving
                log.warning("Could not record how this attempt ended: %s", err)
        ended = None
        shutdown(together)


def lock_run_dir(cfg: DictConfig, dist: DistInfo, held: ExitStack) -> RunDirLock | None:
    """Before anything else, rank 0 locks ``run.dir`` (creating it if new) for the whole run; if another run
    holds it, every rank stops before writing. A dir created here is removed again if the run stops before
    writing anything into it. Returns the lock on rank 0 (None on the others)."""
    problem, lock = None, None
    if dist.is_main:
        run_dir = Path(cfg.run.dir)
        try:
            try:
                run_dir.mkdir(parents=True)
                held.callback(remove_if_unused, run_dir)
            except FileExistsError:
                pass
            grace = min(SAME_JOB_GRACE_S, cfg.run.dist_timeout_s / 2)  # the other ranks wait in the broadcast
            lock = RunDirLock(run_dir).acquire(grace_s=grace)
            held.callback(lock.release)
        except RunDirLocked as err:
            problem = str(err)
        except OSError as err:
            problem = f"Cannot create or lock run.dir='{run_dir}' ({err}): choose a run.dir this user can write."
    collective.main_decides(problem, RunDirLocked)
    return lock


def remove_if_unused(run_dir: Path) -> None:
    """Remove ``run_dir`` if it holds nothing but its lock file (a run that stopped before writing)."""
    if run_dir.is_dir() and not holds_files(run_dir):
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        try:
            run_dir.rmdir()
        except OSError:
            pass


def _train(cfg: DictConfig, dist: DistInfo, signals: StopSignals, held: ExitStack) -> dict:
    """Agree on what to run, lock the run dir, set up, resume, train the epochs, finish."""
    check_ranks_agree(dist, run_fingerprint(cfg))  # before any collective that depends on the config
    lock = lock_run_dir(cfg, dist, held)
    run = Run(cfg, dist, signals, held, lock, read_init(cfg, dist.is_main))  # a bad model.init_from: before the data
    run.resume(find_resume_checkpoint(cfg, dist, run.dataset))
    finished = finished_summary(cfg, dist, run.progress.epoch)
    if finished is not None:  # its MLflow run stays as it ended: not reopened, not restarted
        return finished
    run.start()
    with finish_on_error(run.tracker, run.run_dir / "train.log"), ExitStack() as closing:
        run.train_epochs(closing)
        return run.finish()


def finished_summary(cfg: DictConfig, dist: DistInfo, epoch: int) -> dict | None:
    """The summary of a run that already trained its ``train.epochs`` and wrote ``summary.json`` (the same command
    run again), said in the log with how to go on; None for a run with epochs to train (or its summary to write)."""
    summary = None
    if epoch >= cfg.train.epochs and dist.is_main:
        try:
            summary = json.loads((Path(cfg.run.dir) / "summary.json").read_text())
        except (OSError, ValueError):
            pass
    summary = collective.broadcast_from_main(summary) if epoch >= cfg.train.epochs else None
    if summary is not None:
        log.info("The run in %s finished already (%d epochs, val top-1 %.2f%%; summary.json): nothing to do, and its "
                 "MLflow run stays as it ended. To train it longer, raise train.epochs (it resumes from its last "
                 "checkpoint); to train again from the start, choose a new run.dir (e.g. run.dir=%s-2) or remove this "
                 "one.", cfg.run.dir, summary.get("epochs_completed", epoch), summary.get("val_top1", float("nan")),
                 cfg.run.dir)
    return summary


class Run:
    """One attempt of a training run: what its phases share, and what each step boundary does."""

    def __init__(self, cfg: DictConfig, dist: DistInfo, signals: StopSignals, held: ExitStack,
                 lock: RunDirLock | None = None, init: InitWeights | None = None):
        """Data, model, optimizer, schedule and grad scaler, before any resume. ``lock``: rank 0's on run.dir;
        ``init``: model.init_from as :func:`~pipeline.finetune.read_init` found it."""
        self.cfg, self.dist, self.signals, self.lock, self.held = cfg, dist, signals, lock, held
        self.global_batch = global_batch(cfg.train, dist.world_size)
        self.batch_size = per_rank_batch(self.global_batch, dist.world_size)
        self.warmup = warmup_epochs(cfg.schedule, self.global_batch)
        check_batch_settings(cfg, dist, self.global_batch, self.batch_size, self.warmup)
        generate_data(cfg, dist)
        index = dataset_index(cfg, dist) if cfg.data.backend != "synthetic" else None
        self.dataset = index.summary() if index else None  # recorded in every checkpoint
        self.train_loader, self.val_loader = build_loaders(cfg, dist, self.batch_size, index)
        held.callback(self.train_loader.close)
        held.callback(self.val_loader.close)
        self.steps_per_epoch = len(self.train_loader)

        seed_everything(cfg.run.seed)
        self.device = device = dist.device
        tune_backends(device)
        self.model = build_net(cfg.model, device, cfg.train.channels_last, dist.world_size)
        self.init = init
        self.init_from = init.record() if init and not init.resuming else None  # a resume takes its checkpoint's
        if init and not init.resuming:
            load_init(self.model, init, dist.is_main)  # before the EMA copies the weights
        frozen = freeze(self.model, cfg.train.freeze)
        if frozen and dist.is_main:
            log.info(frozen)
        self.ema = (WeightsEma(self.model, cfg.train.ema, self.global_batch, self.steps_per_epoch)
                    if cfg.train.ema.enabled else None)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.global_batch, cfg.train.freeze)
        schedule = OmegaConf.merge(cfg.schedule, {"warmup_epochs": self.warmup})
        self.scheduler = build_scheduler(self.optimizer, schedule, cfg.train.epochs, self.steps_per_epoch)
        self.scaler = build_scaler(device, cfg.train.precision)
        self.mixer = (BatchMixer(cfg.train.mix, cfg.run.seed, dist.rank, self.batch_size, dist.world_size,
                                 cfg.model.num_classes) if mixing_enabled(cfg.train.mix) else None)
        self.best_of_ema = cfg.checkpoint.best == "ema" or (cfg.checkpoint.best == "auto" and self.ema is not None)
        self.progress = Progress(best_of="ema" if self.best_of_ema else "model")
        self.metrics_lines = 0
        self.boundary = StepBoundary(signals, device, cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes,
                                     cfg.train.max_skipped_steps)
        self.stop_signal = ""
        self.save_seconds = 0.0
        self.changed = ""  # the settings a resume changed, as the log names them
        self.hang = HangWatch(cfg.run.hang_timeout_s, dist.rank).start()  # armed by the first step
        held.callback(self.hang.stop)

    def resume(self, resume: dict | None) -> None:
        """Write the run dir (the config, the log), then continue from ``resume`` (a loaded checkpoint), if any."""
        cfg, progress = self.cfg, self.progress
        self.run_dir = prepare_run_dir(cfg, self.dist)  # from here on rank 0's log also goes to train.log
        if resume:
            self.model.load_state_dict(resume["model"])
            saved_cfg = OmegaConf.create(resume["config"])
            load_optimizer_state(self.optimizer, regroup_state(resume["optimizer"], self.model, saved_cfg.optim,
                                                               cfg.optim, saved_cfg.train.get("freeze", ()),
                                                               cfg.train.freeze))
            self.init_from = resume.get("init_from")
            if self.init and self.dist.is_main:
                compare_on_resume(self.init, self.init_from, resume["path"])
            self.scheduler.load_state_dict(resume["scheduler"])
            saved = flatten(resume["config"])
            if saved.get("train.precision", cfg.train.precision) == cfg.train.precision:
                self.scaler.load_state_dict(resume["scaler"])
            else:  # a grad scaler's state belongs to fp16 alone
                log.info("train.precision changed from %s to %s since the checkpoint: applied%s.",
                         saved["train.precision"], cfg.train.precision,
                         ", with a new grad scaler" if cfg.train.precision == "fp16" else " (no grad scaler)")
            self.changed = apply_changed_settings(saved, cfg, self.model, self.optimizer, self.scheduler,
                                                  self.global_batch)
            if self.ema and resume.get("ema"):
                self.ema.load_state_dict(resume["ema"])
            elif self.ema:
                log.info("train.ema is on since the checkpoint: the average starts from the resumed weights.")
            elif resume.get("ema"):
                log.warning("train.ema is off since the checkpoint: its moving average of the weights is dropped "
                            "(no val/ema_* and no model_ema.pt). Set train.ema.enabled=true to keep it.")
            self.progress = progress = Progress(**resume["progress"])
            best_of = "ema" if self.best_of_ema else "model"
            if progress.best_of != best_of:
                log.info("The best checkpoint now follows the %s's val top-1 (checkpoint.best=%s), not the %s's: "
                         "the best so far (%.2f%% at step %d) is forgotten, the next validation starts it again.",
                         best_of, cfg.checkpoint.best, progress.best_of, progress.best_val_top1, progress.best_step)
                progress.best_of, progress.best_val_top1, progress.best_step = best_of, 0.0, -1
            self.metrics_lines = resume["metrics_lines"]
            restore(resume, self.dist, cfg, progress, self.train_loader, self.scheduler, self.steps_per_epoch)
            if progress.epoch >= cfg.train.epochs:
                log.info("The run in %s already completed %d of %d epochs: nothing to train. Raise train.epochs "
                         "to continue it, or choose a new run.dir.", cfg.run.dir, progress.epoch, cfg.train.epochs)
            else:
                log.info("Resuming from %s: epoch %d, step %d of %d (global step %d)", resume["path"],
                         progress.epoch + 1, progress.step_in_epoch, self.steps_per_epoch, progress.global_step)

    def start(self) -> None:
        """Check that every rank runs the same thing, wrap the model for DDP (and compile), open the metrics
        file, the MLflow run and the insights."""
        cfg, dist, model = self.cfg, self.dist, self.model
        if self.dataset:  # the config and versions were agreed first thing; now the data and the order
            check_ranks_agree(dist, order_fingerprint(self.dataset, cfg.run.seed, self.progress.epoch,
                                                      self.global_batch, cfg.data.aug_repeats))
        net: nn.Module = model
        if dist.world_size > 1:
            net = wrap_ddp(net, self.device)
        if cfg.train.compile:
            net = compile_model(net, sizes_change=cfg.data.progressive.enabled)
        self.net = net
        # own time = data wait + forward; with SyncBatchNorm the forward waits for every rank: the data wait alone
        self.forward_timer = ForwardTimer(net, self.device) if not (cfg.model.sync_bn and dist.world_size > 1) \
            else None
        self.stragglers = StragglerWatch(dist.world_size, cfg.train.straggler_above, cfg.train.straggler_intervals)
        self.windows: deque[dict] = deque()  # the log windows whose lines wait for every rank's figures (<= 2)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.metrics = MetricsFile(self.run_dir / "metrics.jsonl", keep=self.metrics_lines) if dist.is_main else None
        places = collective.gather_to_main((socket.gethostname(), dist.local_rank))  # once, not per step
        self.hosts = [host for host, _ in places] if places else None
        self.tracker = start_tracking(cfg, dist, self.run_dir, self.hosts, [local for _, local in places or []],
                                      self.held)
        if self.tracker and self.init_from:  # the first attempt's file, kept by every checkpoint
            self.tracker.log_param("model.init_from_sha256", self.init_from["sha256"])
        if self.tracker and self.changed:  # MLflow's params are the first attempt's: a change is a tag
            self.tracker.set_tag(f"changed_at_step_{self.progress.global_step}", self.changed)
        self.insights = start_insights(cfg.insights, model, self.run_dir, self.metrics, self.tracker,
                                       self.progress.global_step - self.progress.step_in_epoch) \
            if dist.is_main else None
        params = sum(p.numel() for p in model.parameters())
        log.info("%s (%.2fM parameters) on %s x%d, %s, channels_last=%s%s, global batch %d, %d steps/epoch, "
                 "run dir %s", cfg.model.name, params / 1e6, self.device.type, dist.world_size, cfg.train.precision,
                 cfg.train.channels_last, ", cudnn.benchmark" if torch.backends.cudnn.benchmark else "",
                 self.global_batch, self.steps_per_epoch, self.run_dir)
        self.flops = step_flops(cfg.model, self.batch_size, cfg.data.image_size) if dist.is_main else 0.0
        self.attempt_start, self.wall_before = time.perf_counter(), self.progress.wall_seconds
        self.compile_pending = cfg.train.compile and dist.is_main
        self.profiler = StepProfiler(cfg.profile, self.run_dir, dist.rank, self.device)

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.attempt_start

    # ---------------------------------------------------------------- the epochs

    def train_epochs(self, closing: ExitStack) -> None:
        cfg, progress, dist = self.cfg, self.progress, self.dist
        self.ids_file = None
        if cfg.data.record_ids and hasattr(self.train_loader, "last_ids"):
            (self.run_dir / "sample_ids").mkdir(exist_ok=True)
            self.ids_file = closing.enter_context(open(self.run_dir / "sample_ids" / f"rank-{dist.rank}.txt", "a"))
        closing.callback(self.profiler.finish)  # a window cut short by a stop or an error is written too
        last_size = 0  # the training image size of the epoch before (none yet)
        if dist.is_main and progress.epoch < cfg.train.epochs:  # the first line of metrics may be minutes away
            log.info("Training from global step %d to %d; train metrics every %d steps (train.log_every_steps) and "
                     "at the last. The first step may be slow (%s).", progress.global_step + 1,
                     cfg.train.epochs * self.steps_per_epoch, cfg.train.log_every_steps,
                     first_step_cost(cfg, self.device))
        while progress.epoch < cfg.train.epochs:
            epoch = progress.epoch
            epoch_start = time.perf_counter()
            if progress.step_in_epoch == 0:
                self.train_loader.set_epoch(epoch)
            size = train_image_size(cfg.data, epoch)
            if cfg.data.progressive.enabled and dist.is_main and size != last_size:
                log.info("epoch %d trains at %d px (data.progressive)%s", epoch + 1, size,
                         ": torch.compile compiles a graph for this size at its first step" if cfg.train.compile
                         else "")
            last_size = size
            if progress.step_in_epoch < self.steps_per_epoch:
                show_bar = dist.is_main and sys.stderr.isatty()
                self.profiler.before_step(progress.global_step + 1)
                with tqdm(total=self.steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {epoch + 1}",
                          disable=not show_bar, leave=False) as bar:
                    _, stopped = train_one_epoch(self.net, self.train_loader, self.criterion, self.optimizer,
                                                 self.scheduler, self.scaler, cfg.train, self.device,
                                                 progress.global_step, dist.world_size, self.on_log, self.on_step,
                                                 bar, self.mixed if self.mixer else None, cfg.optim.clip_grad_norm,
                                                 self.forward_timer.take if self.forward_timer else None,
                                                 cfg.train.epochs * self.steps_per_epoch)
                self.profiled(self.profiler.finish())  # a window ends with the epoch
                if stopped:
                    raise StopRequested(self.stop_signal)
            self.validate(epoch, time.perf_counter() - epoch_start)
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            if self.save("end of epoch"):  # a signal during validation: this checkpoint is the stop's
                raise StopRequested(self.stop_signal)

    def mixed(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the step in progress, mixed (train.mix), and its soft targets."""
        return self.mixer(images, labels, self.progress.epoch, self.progress.step_in_epoch)

    def on_step(self, global_step: int, loss: torch.Tensor, skipped: torch.Tensor | None = None) -> bool:
        """The step boundary: record the step, then checkpoint or stop as every rank decides. True: stop.
        ``skipped``: (fp16) whether the grad scaler skipped the step, on the device."""
        progress = self.progress
        if self.compile_pending:  # the first step compiled the forward and backward
            self.compile_pending = False
            log.info("%s; first step done %.1fs after start", compile_report(),
                     time.perf_counter() - self.attempt_start)
        progress.global_step = global_step
        self.hang.beat(global_step)
        files = self.profiler.after_step(global_step)
        if files:  # writing a profile is not a hang
            self.hang.beat(global_step)
            self.profiled(files)
        if self.ema:
            self.ema.update(self.model, global_step)
        if self.ids_file:
            ids = self.train_loader.last_ids  # as the loader delivered them with the batch
            self.ids_file.write(f"{self.dist.world_size} {progress.epoch} {progress.step_in_epoch} "
                                f"{' '.join(map(str, ids.tolist()))}\n")
            self.ids_file.flush()
        progress.step_in_epoch += 1
        if progress.step_in_epoch < self.steps_per_epoch:  # the window records the steps and their boundaries
            self.profiler.before_step(global_step + 1)
        if self.insights:
            self.insights.on_step(global_step)  # the gradients of this step are still there
        figures = None
        if self.windows and "own_ms" in self.windows[-1]:  # a log step: this rank's figures go out with it
            window = self.windows[-1]
            figures = (window.pop("own_ms") / 1e3, window.pop("data_wait_ms") / 1e3)
        try:
            decision = self.boundary.after_step(global_step, loss, skipped,
                                                last_in_epoch=progress.step_in_epoch == self.steps_per_epoch,
                                                figures=figures)
        except BaseException:  # a divergence: the lines of the windows before it go out first
            self.log_windows(self.boundary.take_figures(), ending=True)
            raise
        self.log_windows(self.boundary.take_figures())
        if decision.stop or decision.save:
            every = self.cfg.checkpoint.every_steps
            return self.save("every_steps" if every and global_step % every == 0 else "every_minutes",
                             stopping=decision.stop)
        return False

    def profiled(self, files: list[Path]) -> None:
        """After a profile window: rank 0 queues the whole files of run.dir/profile it sees for the MLflow run."""
        if files and self.tracker:
            self.tracker.log_artifacts(sorted(p for p in files[0].parent.glob("rank-*") if p.is_file()), "profile")

    def save(self, reason: str, stopping: bool = False) -> bool:
        """A checkpoint of this step (every rank calls it), unless the loss or weights are not finite (then every
        rank raises NonFiniteLoss). Returns whether it is a stop's checkpoint (``stopping``, or a stop signal
        reached some rank meanwhile): the caller stops after it. One checkpoint per step, whatever asked."""
        dist, progress, signals = self.dist, self.progress, self.signals
        try:
            stopping = self.boundary.before_save(progress.global_step, lambda: weights_finite(self.model)) or stopping
        except BaseException:  # a divergence: the lines of the windows before it go out first
            self.log_windows(self.boundary.take_figures(), ending=True)
            raise
        self.log_windows(self.boundary.take_figures())  # this step's window, if any, is in the checkpoint's lines
        if stopping:  # which signal, wherever it arrived (the group is free: before_save read what was in flight)
            names = collective.gather_to_main(signals.name)
            self.stop_signal = next((n for n in names if n), "") if names else signals.name
            reason = f"stop signal {signals.name or f'{self.stop_signal} on another rank'}"
        began = time.perf_counter()
        ranks = collective.gather_to_main({"rng": rng_state()})
        problem = None
        taken = self.lock.taken_over() if self.lock else None
        if taken is not None:  # a later attempt of this job runs in run.dir now: write nothing more
            problem = (f"run.dir='{self.run_dir}' was taken over by a later attempt of this job ({describe(taken)}) "
                       "while this one ran on: this attempt stops without writing a checkpoint.")
        elif dist.is_main:
            progress.wall_seconds = self.wall_seconds()
            state = {"format": FORMAT_VERSION, "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "progress": asdict(progress),
                     "loader": self.train_loader.state_dict(), "dataset": self.dataset,
                     "ema": self.ema.state_dict() if self.ema else None, "init_from": self.init_from,
                     "ranks": ranks, "world_size": dist.world_size, "global_batch": self.global_batch,
                     "metrics_lines": self.metrics.lines,
                     "mlflow_run_id": self.tracker.run_id if self.tracker else None,
                     "config": OmegaConf.to_container(self.cfg), "versions": library_versions()}
            try:
                path = save_checkpoint(state, self.run_dir, progress.global_step, self.cfg.checkpoint.keep_last,
                                       progress.best_step)
                self.save_seconds = time.perf_counter() - began
                log.info("Saved %s (%s) in %.2fs", path.name, reason, self.save_seconds)
            except OSError as err:  # a full disk or a quota: every rank stops here, at this step
                problem = unwritable(err, self.run_dir, progress.global_step)
        # no rank goes on (or exits) before the checkpoint is on disk, or before it knows that it could not be
        collective.main_decides(problem, CheckpointError)
        self.boundary.saved()
        if stopping and signals.received is not None:
            log.info("Checkpoint on disk %.2fs after %s", time.monotonic() - signals.received, signals.name)
        return stopping

    def on_log(self, record: dict) -> None:
        """A logged window: on one rank, its line now; on several, once every rank's figures have arrived with
        the step boundary's reduction (at the next step, or at once at an epoch's end)."""
        if self.scaler.is_enabled():  # read here only: the log step has just waited for the device
            record = {**record, "loss_scale": self.scaler.get_scale()}
        self.windows.append({**record, "epoch": self.progress.epoch, "step_in_epoch": self.progress.step_in_epoch})
        if self.dist.world_size == 1:
            self.log_windows([], ending=True)

    def log_windows(self, arrived: list[RankFigures], ending: bool = False) -> None:
        """The lines of the waiting log windows whose figures have ``arrived`` (they arrive in the windows'
        order); with ``ending`` (one rank; an error), every waiting line now, with what has arrived."""
        while self.windows and (arrived or ending):
            self.log_window(self.windows.popleft(), arrived.pop(0) if arrived else None)

    def log_window(self, record: dict, figures: RankFigures | None) -> None:
        """A log window's line, metrics and MLflow values: the loss, the rate of the job and of each GPU (or CPU
        rank), its TFLOP/s and, on several ranks, the slowest rank's own time and data wait per step against the
        median."""
        record.pop("own_ms", None), record.pop("data_wait_ms", None)
        epoch, step_in_epoch = record.pop("epoch"), record.pop("step_in_epoch")
        per_gpu = record["images_per_s"] / self.dist.world_size
        flops = self.flops * (train_image_size(self.cfg.data, epoch) / self.cfg.data.image_size) ** 2
        record = {**record, "images_per_s_per_gpu": per_gpu, "tflops_per_gpu": flops * per_gpu / self.batch_size / 1e12}
        slowest = ""
        if figures is not None:
            record.update(figures.metrics())
            rank = figures.slowest
            slowest = (f"  slowest rank {rank} ({self.hosts[rank] if self.hosts else '?'}) "
                       f"{figures.own_ms[rank]:.1f} ms/step own, data-wait {figures.wait_ms[rank]:.1f} ms "
                       f"(median {figures.own_median:.1f}, {figures.wait_median:.1f} ms)")
        log.info("epoch %d step %d/%d  loss %.4f  lr %.4g  %.0f img/s (%.0f per %s, %.3g TFLOP/s)  data-wait %.0f%%%s",
                 epoch + 1, step_in_epoch + 1, self.steps_per_epoch, record["loss"], record["lr"],
                 record["images_per_s"], per_gpu, "GPU" if self.device.type == "cuda" else "rank",
                 record["tflops_per_gpu"], 100 * record["data_wait"], slowest)
        if figures is not None and self.dist.is_main:
            for warning in self.stragglers.update(figures, self.hosts):
                log.warning(warning)
        if self.metrics:
            self.metrics.log("train", epoch=epoch, **record)
        if self.tracker:
            self.tracker.log_metrics({f"train/{k}": v for k, v in record.items() if k != "global_step"},
                                     record["global_step"])

    def validate(self, epoch: int, train_seconds: float) -> None:
        """Evaluate the weights (and their EMA) on every rank's share of the val split; log it, track the best."""
        cfg, progress = self.cfg, self.progress
        epoch_start = time.perf_counter() - train_seconds
        models = [self.model, *([self.ema.module] if self.ema else [])]
        for model in models:  # the plain models: each rank evaluates its own share, no DDP collective per batch
            collective.broadcast_buffers(model)  # with rank 0's BatchNorm statistics
        val, *ema = evaluate_together(models, self.hang.watch(self.val_loader), self.device,
                                      cfg.train.precision, cfg.train.channels_last)
        if ema:
            val.update({f"ema_{k}": v for k, v in ema[0].items() if k != "count"})
        progress.val = val
        best = val["ema_top1" if self.best_of_ema else "top1"]
        if best > progress.best_val_top1 or progress.best_step < 0:
            progress.best_val_top1, progress.best_step = best, progress.global_step
        epoch_seconds = time.perf_counter() - epoch_start
        ema = (f"  EMA top-1 {val['ema_top1']:.2f}%  top-5 {val['ema_top5']:.2f}%  loss {val['ema_loss']:.4f}"
               if self.ema else "")
        log.info("epoch %d/%d  val top-1 %.2f%%  top-5 %.2f%%  loss %.4f%s  (%d images)  epoch %.1fs",
                 epoch + 1, cfg.train.epochs, val["top1"], val["top5"], val["loss"], ema, val["count"], epoch_seconds)
        if self.metrics:
            self.metrics.log("val", epoch=epoch, global_step=progress.global_step, **val,
                             epoch_seconds=epoch_seconds, checkpoint_seconds=self.save_seconds)
        if self.tracker:
            self.tracker.log_metrics({**{f"val/{k}": v for k, v in val.items() if k != "count"},
                                      "epoch_seconds": epoch_seconds, "checkpoint_seconds": self.save_seconds},
                                     progress.global_step)
        if self.insights:
            self.insights.on_epoch_end(epoch, progress.global_step)

    # ---------------------------------------------------------------- the end

    def finish(self) -> dict:
        """The final model and summary (rank 0), the MLflow run closed; the summary on every rank."""
        progress, dist, run_dir = self.progress, self.dist, self.run_dir
        self.hang.stop()  # no steps from here on; the others wait while rank 0 writes and uploads
        progress.wall_seconds = self.wall_seconds()
        summary = {"epochs_completed": progress.epoch, "global_step": progress.global_step,
                   "val_top1": progress.val["top1"], "val_top5": progress.val["top5"],
                   **({"val_ema_top1": progress.val.get("ema_top1"), "val_ema_top5": progress.val.get("ema_top5")}
                      if self.ema else {}),
                   "best_val_top1": progress.best_val_top1, "best_of": progress.best_of,
                   "images_seen": progress.global_step * self.global_batch,
                   "wall_seconds": round(progress.wall_seconds, 2), "world_size": dist.world_size,
                   "replicas_identical": collective.replicas_identical(self.model)}
        if not summary["replicas_identical"]:
            log.error("The ranks' parameters differ at the end of training: the replicas drifted apart.")
        if self.ema:
            collective.broadcast_buffers(self.ema.module)
        weights = {"model_final.pt": self.model, **({"model_ema.pt": self.ema.module} if self.ema else {})}
        problem = None
        if dist.is_main:
            try:  # CPU tensors: the weights load on any machine, with or without a GPU
                for name, model in weights.items():
                    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir / name)
                atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
            except OSError as err:
                problem = (f"Cannot write {', '.join(weights)} or summary.json into {run_dir} ({err}): the last "
                           "checkpoint holds the trained run; free space, then run the same command again to write "
                           "them.")
        collective.main_decides(problem, CheckpointError)
        if dist.is_main:
            self.metrics.log("summary", **summary)
            self.metrics.close()
            if self.tracker:
                self.tracker.finish([run_dir / name for name in ("config.yaml", "summary.json", *weights, "train.log")])
            ema = f", EMA {summary['val_ema_top1']:.2f}%" if self.ema else ""
            log.info("done: val top-1 %.2f%%%s (best %s%.2f%%), %d images in %.0fs; wrote %s", summary["val_top1"],
                     ema, "EMA " if progress.best_of == "ema" else "", progress.best_val_top1, summary["images_seen"],
                     summary["wall_seconds"], run_dir)
        return summary


def apply_changed_settings(saved: dict, cfg: DictConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler, batch: int) -> str:
    """Settings of the optimizer, the schedule and train.freeze that changed since the checkpoint are applied to the
    restored optimizer and schedule (each named in the log), from the step the run resumes at; returns them as the log
    names them ("" if none). (The model, the data and the global batch cannot change: :func:`check_resumable`
    refuses those.) A warm-up is compared in epochs: auto and the number it stands for are the same. A key the
    saved config lacks came with a later version: the checkpoint ran with its default."""
    current = flatten(OmegaConf.to_container(cfg))
    saved = {**schema_defaults(), **saved}
    for flat in (saved, current):
        if "schedule.warmup_epochs" in flat:
            flat["schedule.warmup_epochs"] = warmup_epochs(OmegaConf.create({"warmup_epochs":
                                                                            flat["schedule.warmup_epochs"]}), batch)
    keys = [k for k in sorted(current)
            if k.startswith(("optim.", "schedule.")) or k in ("train.epochs", "train.freeze")]
    changed = {k: (saved[k], current[k]) for k in keys if k in saved and saved[k] != current[k]}
    if not changed:
        return ""
    base = cfg.optim.lr * batch / 256
    for group, kind in zip(optimizer.param_groups, parameter_groups(model, cfg.optim, cfg.train.freeze), strict=True):
        group.update(initial_lr=base * kind.lr_scale, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
                     weight_decay=kind.weight_decay)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    # the schedule is computed from the current settings at each step: the learning rate of the resumed step
    for group, factor in zip(optimizer.param_groups, [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas],
                             strict=True):
        group["lr"] = group["initial_lr"] * factor
    names = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    log.info("Changed since the checkpoint, applied from global step %d on: %s (learning rate now %.4g)",
             scheduler.last_epoch, names, optimizer.param_groups[0]["lr"])
    return names


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter and buffer is finite (one device sync: for checkpoints, not for steps)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


@command()
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
    except StopRequested:
        if "TORCHELASTIC_RUN_ID" not in os.environ:  # under torchrun (launch.local) the launcher says it
            print(resume_hint(cfg.run.dir, cfg.run.resume), file=sys.stderr)
        return RESUME_EXIT_CODE
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(cli())
