"""The configuration schema, and loading it from YAML files and ``key=value`` words.

Defaults live in the dataclasses below; a YAML recipe overrides them and command-line
words override the recipe. Every mistake is reported as a ``ConfigError`` that names the
key, where it came from, and what is allowed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.finetune import unknown_prefixes
from pipeline.models.densenet import MODEL_NAMES

MAX_READ_AHEAD = 16  # data.read_ahead
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class RunConfig:
    dir: str = "runs/${model.name}"  # everything about a run lives here
    seed: int = 0
    resume: str = "auto"  # auto: from the newest good checkpoint in dir | never: refuse a non-empty dir | a file
    on_dataset_change: str = "refuse"  # resuming on another dataset index: refuse | next_epoch (continue on it)
    dist_timeout_s: int = 1800  # how long a rank waits for the others (start, collectives); then it names the cause
    # a rank that finishes no step (or validation batch) for this long dumps its stacks and exits 75; 0: off
    hang_timeout_s: float = 600.0


@dataclass
class ModelConfig:
    name: str = "densenet121"  # densenet121/161/169/201/264 or densenet_bc
    num_classes: int = 1000
    memory_efficient: bool = False  # recompute concat + BN-ReLU in backward: linear memory
    drop_rate: float = 0.0
    depth: int = 100  # densenet_bc only: L = 6n + 4
    growth_rate: int = 12  # densenet_bc only: k
    sync_bn: bool = False  # BatchNorm over the whole global batch under DDP (SyncBatchNorm; CUDA only)
    # a new run starts from these weights: a torchvision-layout state_dict (torchvision's or timm's DenseNet file,
    # a run's model_final.pt) or a checkpoint (its weights); the classifier is replaced if num_classes differs
    init_from: str = ""


@dataclass
class GenerateConfig:
    enabled: bool = False  # write a learnable synthetic JPEG tree at data.root if it is missing
    train_per_class: int = 64
    val_per_class: int = 16
    min_side: int = 40
    max_side: int = 96


@dataclass
class ProgressiveConfig:
    """Progressive resizing, FFCV's schedule (min_res, max_res, start_ramp, end_ramp): the training image size is
    min_size up to start_epoch, grows linearly to max_size at end_epoch, in multiples of step."""

    enabled: bool = False
    min_size: int = 160
    max_size: int = 192
    start_epoch: int = 0  # epochs counted from 0, as FFCV's
    end_epoch: int = 0
    step: int = 32


@dataclass
class DataConfig:
    root: str = "data/imagenet"  # train/<class>/*.JPEG and val/<class>/*.JPEG, or a packed dataset (index/, shards/)
    backend: str = "dali"  # dali | torchvision (Pillow + DataLoader) | synthetic (random tensors on the device)
    image_size: int = 224
    val_resize: int = 0  # shorter side before the centre crop; 0 = val_image_size * 256 / 224
    val_image_size: int = 0  # the validation centre crop (torchvision's --val-crop-size); 0 = image_size
    aug_repeats: int = 1  # repeated augmentation: each global batch holds each of its samples this many times
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    val_batch_size: int = 0  # per rank; 0 = the per-rank training batch
    workers: int = 4  # DALI CPU threads, or DataLoader worker processes, per rank
    prefetch: int = 2  # DALI prefetch queue depth, or batches each DataLoader worker prepares ahead
    # DALI: batches whose inputs (file reads, crop windows, augmentation arguments) threads of the loader prepare
    # ahead of DALI's requests; 0: prepared on the training thread when DALI asks (the old way)
    read_ahead: int = 2
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    synthetic_steps: int = 100  # steps per epoch with backend=synthetic
    record_ids: bool = False  # each rank appends every step's sample ids to run.dir/sample_ids/rank-<R>.txt
    # packed data at start: every shard's size, and its SHA-256 read by one rank of the job (job: one shared copy),
    # or by one rank of each node (node: node-local copies), or not at all (size)
    check_shards: str = "job"
    # the train policy on uint8 after crop and flip, by the names of torchvision's reference scripts (--auto-augment):
    # none | ra (RandAugment) | ta_wide (TrivialAugmentWide) | imagenet (AutoAugment, AutoAugmentPolicy.IMAGENET)
    auto_augment: str = "none"
    ra_num_ops: int = 2  # RandAugment's num_ops
    ra_magnitude: int = 9  # RandAugment's magnitude: a bin, 0 .. magnitude_bins - 1
    magnitude_bins: int = 31  # num_magnitude_bins of ra and ta_wide (AutoAugment's policy has its own 10)
    # probability of torchvision's RandomErasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0), after normalising
    # as in its recipe; 0: off
    random_erase: float = 0.0
    generate: GenerateConfig = field(default_factory=GenerateConfig)


@dataclass
class EmaConfig:
    """An exponential moving average of the weights (timm's and torchvision's ``--model-ema``): validated each
    epoch beside the weights, in every checkpoint, and saved as run.dir/model_ema.pt."""

    enabled: bool = False
    decay: float = 0.9998  # per optimizer step (timm's --model-ema-decay default)
    # > 0: instead of decay, the decay per step under which a step's weight halves after this many images
    half_life_images: float = 0.0
    every_steps: int = 1  # average every this many steps, at decay ** every_steps (torchvision: 32)
    warmup_epochs: float = 0.0  # before this epoch the average is the weights themselves (torchvision: the lr warm-up)


@dataclass
class MixConfig:
    """Mixup and CutMix with soft targets (timm's --mixup, --cutmix, --mixup-prob, --mixup-switch-prob,
    --mixup-mode; torchvision's --mixup-alpha, --cutmix-alpha). Each image is mixed with its neighbour of the
    pair (2k, 2k + 1) of the global batch: the per-rank batch must be even."""

    mixup_alpha: float = 0.0  # Beta(alpha, alpha) draws mixup's lambda; 0: no mixup
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) draws CutMix's lambda; 0: no CutMix
    prob: float = 1.0  # the probability that a batch (pair, image) is mixed at all
    switch_prob: float = 0.5  # with both on: the probability of CutMix rather than mixup
    mode: str = "batch"  # who shares one draw: batch (the global batch) | pair | elem (each image)


@dataclass
class TrainConfig:
    epochs: int = 90
    batch_size: int | None = 256  # GLOBAL batch, split evenly over ranks; or null with batch_per_gpu
    batch_per_gpu: int | None = None  # per rank (GPU); the global batch is then this x the world size
    precision: str = "bf16"  # bf16 | fp16 (with a grad scaler) | fp32
    channels_last: bool = True
    compile: bool = False
    label_smoothing: float = 0.0
    log_every_steps: int = 50  # a line of train metrics every this many global steps, and at the run's last
    # fp16: stop when the grad scaler skipped more steps than this in a row (every gradient overflows); 0: never
    max_skipped_steps: int = 20
    # warn of a rank whose own time per step (data wait + forward) is this fraction above the ranks' median ...
    straggler_above: float = 0.2
    straggler_intervals: int = 3  # ... for this many log intervals in a row (again each time that doubles); 0: off
    # modules (model.named_modules() names, with all inside them) that do not train, their BatchNorms in eval mode
    # (running statistics used and kept), e.g. [features.conv0, features.norm0, features.denseblock1]
    freeze: list[str] = field(default_factory=list)
    ema: EmaConfig = field(default_factory=EmaConfig)
    mix: MixConfig = field(default_factory=MixConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars (layer-wise trust ratios, for global batches above 8192)
    lr: float = 0.1  # per 256 images; scaled linearly with train.batch_size
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    # weight decay of normalisation layers' weights and biases, and of other biases (torchvision's
    # --norm-weight-decay and --bias-weight-decay); null: optim.weight_decay
    norm_weight_decay: float | None = None
    bias_weight_decay: float | None = None
    clip_grad_norm: float = 0.0  # clip the gradients' global L2 norm to this (fp16: unscaled first); 0: off
    lars_trust_coefficient: float = 0.001  # LARS's eta (You et al. 2017)
    backbone_lr_scale: float = 1.0  # the learning rate of every layer but the classifier, times optim.lr's


@dataclass
class ScheduleConfig:
    name: str = "step"  # step | cosine
    milestones: list[int] = field(default_factory=lambda: [30, 60])  # epochs, for step
    gamma: float = 0.1
    # linear warm-up from zero, then the schedule; auto: none up to a global batch of 1024, 5 epochs above
    warmup_epochs: Any = "auto"


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: off
    every_minutes: float = 30.0  # 0: off
    keep_last: int = 2  # the best by val top-1 is kept too
    best: str = "auto"  # which val top-1 picks the best checkpoint: model | ema | auto (ema when train.ema is on)


@dataclass
class TrackingConfig:
    backend: str = "mlflow"  # mlflow | none
    uri: str = ""  # a tracking server URL, or "" for sqlite:///<the folder holding run.dir>/mlflow.db
    experiment: str = "densenet"
    run_name: str = ""  # "" = the name of run.dir
    required: bool = False  # unreachable server at start: stop (true) or train without tracking (false)
    system_metrics: bool = True  # CPU, memory, GPU utilisation and memory
    register_model: str = ""  # a model registry name: register model_final.pt under it
    flush_timeout_s: float = 60.0  # at the end, how long to wait for unsent metrics


@dataclass
class InsightsConfig:
    """Feature-reuse heatmaps and gradient flow, logged by rank 0 to run.dir/insights and the MLflow run."""

    enabled: bool = True
    every_steps: int = 50  # gradient norms per layer every this many steps (one host sync each)


@dataclass
class ProfileConfig:
    """torch.profiler over a window of global steps, written per rank to run.dir/profile (see the README)."""

    start_step: int = 0  # the global step (counted from 1) whose start begins the window; 0: no profile
    steps: int = 5  # how many steps the window records (it ends with the epoch at the latest)


@dataclass
class SlurmConfig:
    """How ``python -m launch.slurm`` asks SLURM for the job; ignored by local runs."""

    profile: str = ""  # a cluster profile, configs/slurm/<profile>.yaml (or a YAML path), merged over the recipe
    partition: str = ""  # "" = the cluster's default partition
    account: str = ""
    qos: str = ""
    nodes: int = 1
    gpus_per_node: int = 1  # 0 = CPU ranks over gloo
    gpu_binding: str = "node"  # node: --gpus-per-node, each task sees the node's GPUs | task: --gpus-per-task=1
    tasks_per_node: int = 0  # 0 = one per GPU (or 1 without GPUs)
    cpus_per_task: int = 8  # also the cap for data.workers
    mem_gb: int = 0  # per node; 0 = the partition's default
    time_min: str = "60"  # minutes, or a SLURM time: MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
    constraint: str = ""
    exclusive: bool = False
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint, then requeue
    max_requeues: int = 10  # time-outs and preemptions; then the job fails, saying so
    # requeues after a fault (a task died, crashed or hung); one with no checkpoint since the last counts twice
    max_failures: int = 3
    setup: list[str] = field(default_factory=list)  # shell lines before the tasks start, e.g. module loads
    container_image: str = ""  # run every task in this image (pyxis: a registry image or .sqsh; apptainer: a .sif)
    container_mounts: str = ""  # SRC:DST[,SRC:DST...]; run.dir and data.root must be visible inside
    container_runtime: str = "pyxis"  # pyxis: srun --container-image; apptainer: apptainer exec --nv IMAGE python
    additional: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g. {mail-type: END}
    array_parallelism: int = 16  # sweeps: how many points run at once
    job_name: str = ""  # "" = the name of run.dir


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    insights: InsightsConfig = field(default_factory=InsightsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.name": MODEL_NAMES,
    "data.backend": ("dali", "torchvision", "synthetic"),
    "run.on_dataset_change": ("refuse", "next_epoch"),
    "data.check_shards": ("job", "node", "size"),
    "data.auto_augment": ("none", "ra", "ta_wide", "imagenet"),
    "train.precision": ("bf16", "fp16", "fp32"),
    "optim.name": ("sgd", "lars"),
    "checkpoint.best": ("auto", "model", "ema"),
    "train.mix.mode": ("batch", "pair", "elem"),
    "schedule.name": ("step", "cosine"),
    "tracking.backend": ("mlflow", "none"),
    "slurm.container_runtime": ("pyxis", "apptainer"),
    "slurm.gpu_binding": ("node", "task"),
}
POSITIVE = (
    "model.num_classes", "data.image_size", "data.workers", "data.prefetch", "data.synthetic_steps",
    "data.generate.train_per_class", "data.generate.val_per_class", "data.generate.min_side",
    "train.epochs", "train.log_every_steps", "optim.lr", "model.growth_rate",
    "checkpoint.keep_last", "slurm.nodes", "slurm.cpus_per_task", "slurm.array_parallelism",
    "insights.every_steps", "run.dist_timeout_s", "train.ema.every_steps", "optim.lars_trust_coefficient",
    "data.aug_repeats", "data.progressive.min_size", "data.progressive.step", "data.ra_num_ops",
    "profile.steps", "train.straggler_above", "optim.backbone_lr_scale",
)
NON_NEGATIVE = ("optim.momentum", "optim.weight_decay", "data.val_resize", "data.val_image_size",
                "data.val_batch_size", "data.read_ahead", "model.drop_rate", "checkpoint.every_steps",
                "checkpoint.every_minutes",
                "slurm.gpus_per_node", "slurm.tasks_per_node", "slurm.mem_gb", "slurm.signal_delay_s",
                "slurm.max_requeues", "train.max_skipped_steps", "run.hang_timeout_s",
                "slurm.max_failures", "train.ema.half_life_images", "train.ema.warmup_epochs",
                "train.mix.mixup_alpha", "train.mix.cutmix_alpha",
                "optim.clip_grad_norm", "profile.start_step", "train.straggler_intervals")


class ConfigError(ValueError):
    """A configuration mistake, with a message meant for the person who made it."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as plain containers, keyed by dotted names (``train.epochs``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def schema_defaults() -> dict[str, Any]:
    """Every dotted key of the schema, with its default value."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(Config)))


def _nearest_keys(key: str, valid: list[str]) -> list[str]:
    leaf = key.rsplit(".", 1)[-1]
    sections = sorted({v.rsplit(".", 1)[0] for v in valid if "." in v})
    near = difflib.get_close_matches(key, valid + sections, n=3, cutoff=0.75)
    # also the same or a similar name in another section (``epochs`` given at the top level, say)
    near += [v for v in valid if difflib.SequenceMatcher(None, leaf, v.rsplit(".", 1)[-1]).ratio() >= 0.75]
    return list(dict.fromkeys(near))[:5]


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    defaults = schema_defaults()
    if isinstance(err, ConfigKeyError) or key not in defaults:
        near = _nearest_keys(key, list(defaults))
        hint = f"Did you mean: {', '.join(near)}?" if near else "See `--print-config` for every valid key."
        return ConfigError(f"Unknown config key '{key}' in {source}. {hint}")
    expected = type(defaults[key]).__name__ if defaults[key] is not None else "a value"
    detail = str(err).splitlines()[0]
    return ConfigError(f"Invalid value for '{key}' in {source}: {detail}. '{key}' expects {expected} "
                       f"(default: {defaults[key]!r}).")


def _merge(base: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise _explain(err, source) from None


def _parse_overrides(words: list[str]) -> DictConfig:
    for word in words:
        if "=" not in word or word.startswith("="):
            raise ConfigError(f"Command-line word '{word}' is not a 'key=value' override "
                              "(for example train.epochs=10).")
    try:
        return OmegaConf.from_dotlist(words)
    except OmegaConfBaseException as err:
        raise ConfigError(f"Could not parse the command-line overrides {words}: {err}") from None


# torch.compile's default recompile limit: with progressive resizing, one static graph per size
COMPILED_SIZES = 8
# Goyal et al. 2017: a linear warm-up of 5 epochs lets a global batch of 8192 match 256; small batches need none
WARMUP_ABOVE = 1024
AUTO_WARMUP_EPOCHS = 5


def warmup_epochs(schedule_cfg, global_batch: int) -> float:
    """``schedule.warmup_epochs`` as a number: auto is none up to a global batch of 1024, 5 epochs above."""
    if schedule_cfg.warmup_epochs == "auto":
        return float(AUTO_WARMUP_EPOCHS if global_batch > WARMUP_ABOVE else 0)
    return float(schedule_cfg.warmup_epochs)


def global_batch(train_cfg, world_size: int) -> int:
    """``train.batch_size``, or ``train.batch_per_gpu`` x the world size."""
    per_gpu = train_cfg.get("batch_per_gpu")  # absent from the configs of older checkpoints
    return per_gpu * world_size if per_gpu is not None else train_cfg["batch_size"]


def validate(cfg: DictConfig) -> None:
    """Check values the schema's types cannot: choices, ranges and relations between keys."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"'{key}' is {value!r}; allowed values: {', '.join(allowed)}.")
    for key in POSITIVE:
        if not OmegaConf.select(cfg, key) > 0:
            raise ConfigError(f"'{key}' must be greater than 0, got {OmegaConf.select(cfg, key)!r}.")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"'{key}' must be 0 or more, got {OmegaConf.select(cfg, key)!r}.")
    if not 0 <= cfg.train.label_smoothing < 1:
        raise ConfigError(f"'train.label_smoothing' must be in [0, 1), got {cfg.train.label_smoothing}.")
    if not 0 < cfg.train.ema.decay < 1:
        raise ConfigError(f"'train.ema.decay' must be in (0, 1), got {cfg.train.ema.decay} (timm's default: 0.9998 per "
                          "step; or set train.ema.half_life_images).")
    for key in ("optim.norm_weight_decay", "optim.bias_weight_decay"):
        if OmegaConf.select(cfg, key) is not None and OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"'{key}' must be 0 or more (or null for optim.weight_decay), got "
                              f"{OmegaConf.select(cfg, key)}.")
    for key in ("train.mix.prob", "train.mix.switch_prob"):
        if not 0 <= OmegaConf.select(cfg, key) <= 1:
            raise ConfigError(f"'{key}' is a probability: it must be in [0, 1], got {OmegaConf.select(cfg, key)}.")
    ramp = cfg.data.progressive
    if ramp.enabled and not (ramp.min_size <= ramp.max_size and ramp.start_epoch <= ramp.end_epoch
                             and ramp.min_size % ramp.step == 0 and ramp.max_size % ramp.step == 0):
        raise ConfigError(f"'data.progressive' goes from {ramp.min_size} px at epoch {ramp.start_epoch} to "
                          f"{ramp.max_size} px at epoch {ramp.end_epoch} in steps of {ramp.step}: min_size must not "
                          "exceed max_size, start_epoch must not come after end_epoch, and both sizes must be "
                          "multiples of step (FFCV: 160 to 192 in steps of 32).")
    if cfg.train.ema.enabled and cfg.train.ema.warmup_epochs >= cfg.train.epochs:
        raise ConfigError(f"'train.ema.warmup_epochs' ({cfg.train.ema.warmup_epochs}) must be less than "
                          f"'train.epochs' ({cfg.train.epochs}): until then the average is the weights themselves.")
    crop = cfg.data.val_image_size or cfg.data.image_size
    if cfg.data.val_resize and cfg.data.val_resize < crop:
        raise ConfigError(f"'data.val_resize' ({cfg.data.val_resize}) is smaller than the validation crop "
                          f"({crop}, 'data.val_image_size' or else 'data.image_size'): the centre crop would not fit "
                          f"in the resized image. Resize to at least the crop, e.g. data.val_resize="
                          f"{round(crop * 256 / 224)} (256/224 of it), or set data.val_resize=0 for that.")
    if ramp.enabled and cfg.train.compile and (ramp.max_size - ramp.min_size) // ramp.step + 1 > COMPILED_SIZES:
        raise ConfigError(f"'data.progressive' trains at {(ramp.max_size - ramp.min_size) // ramp.step + 1} sizes "
                          f"({ramp.min_size} to {ramp.max_size} in steps of {ramp.step}) with train.compile=true: "
                          f"torch.compile keeps at most {COMPILED_SIZES} graphs of a model, and would run the later "
                          "sizes uncompiled. Use a larger data.progressive.step (FFCV: 32), or train.compile=false.")
    if cfg.checkpoint.best == "ema" and not cfg.train.ema.enabled:
        raise ConfigError("'checkpoint.best' is ema but 'train.ema.enabled' is false: there is no EMA to pick the "
                          "best checkpoint by. Set train.ema.enabled=true, or checkpoint.best=model.")
    batch, per_gpu = cfg.train.batch_size, cfg.train.batch_per_gpu
    if (batch is None) == (per_gpu is None):
        raise ConfigError(f"Set exactly one of 'train.batch_size' (the global batch; now {batch}) and "
                          f"'train.batch_per_gpu' (per GPU; now {per_gpu}): e.g. train.batch_size=null "
                          "train.batch_per_gpu=64 for 64 images per GPU at any world size.")
    for key, value in (("train.batch_size", batch), ("train.batch_per_gpu", per_gpu)):
        if value is not None and not value > 0:
            raise ConfigError(f"'{key}' must be greater than 0, got {value!r}.")
    warmup = cfg.schedule.warmup_epochs
    if warmup != "auto" and (isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0):
        raise ConfigError(f"'schedule.warmup_epochs' is {warmup!r}: a number of epochs (0 or more), or auto (none "
                          f"up to a global batch of {WARMUP_ABOVE}, {AUTO_WARMUP_EPOCHS} epochs above).")
    if warmup != "auto" and warmup >= cfg.train.epochs:
        raise ConfigError(f"'schedule.warmup_epochs' ({warmup}) must be less than "
                          f"'train.epochs' ({cfg.train.epochs}).")
    if cfg.run.hang_timeout_s and cfg.run.hang_timeout_s >= cfg.run.dist_timeout_s:
        raise ConfigError(f"'run.hang_timeout_s' ({cfg.run.hang_timeout_s:g}) is not below 'run.dist_timeout_s' "
                          f"({cfg.run.dist_timeout_s}): a stuck collective would time out before the hang watch "
                          "names where each rank waits. Keep run.hang_timeout_s well below run.dist_timeout_s "
                          "(defaults: 600 and 1800), or set it to 0 to turn the watch off.")
    if cfg.optim.nesterov and not cfg.optim.momentum > 0:
        raise ConfigError(f"'optim.nesterov' is true but 'optim.momentum' is {cfg.optim.momentum}: Nesterov momentum "
                          "needs a momentum above 0. Set optim.momentum (e.g. 0.9) or optim.nesterov=false.")
    if list(cfg.schedule.milestones) != sorted(cfg.schedule.milestones):
        raise ConfigError(f"'schedule.milestones' must be increasing epochs, got {list(cfg.schedule.milestones)}.")
    if cfg.model.name == "densenet_bc" and (cfg.model.depth < 10 or (cfg.model.depth - 4) % 6):
        raise ConfigError(f"'model.depth' is {cfg.model.depth}; a DenseNet-BC depth is 6n + 4 with n >= 1 "
                          "(e.g. 40, 100, 190).")
    if cfg.data.read_ahead > MAX_READ_AHEAD:  # a thread and a batch of encoded bytes each
        raise ConfigError(f"'data.read_ahead' is {cfg.data.read_ahead}: at most {MAX_READ_AHEAD} batches are prepared "
                          "ahead (each holds a thread and a batch of encoded bytes in memory); 2 to 4 hide a network "
                          "filesystem's latency (see `python -m pipeline.bench feed`).")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3 or min(cfg.data.std) <= 0:
        raise ConfigError("'data.mean' and 'data.std' must each hold 3 numbers (RGB, 0-1 scale), std > 0.")
    if cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).is_file():
        raise ConfigError(f"'run.resume' is {cfg.run.resume!r}: use auto (the newest good checkpoint in run.dir), "
                          "never (start fresh, refuse a run.dir that holds files), or the path of a checkpoint file "
                          "that exists.")
    if cfg.data.magnitude_bins < 2:
        raise ConfigError(f"'data.magnitude_bins' is {cfg.data.magnitude_bins}; RandAugment and TrivialAugmentWide "
                          "need at least 2 bins (torchvision's default is 31).")
    if not 0 <= cfg.data.ra_magnitude < cfg.data.magnitude_bins:
        raise ConfigError(f"'data.ra_magnitude' is {cfg.data.ra_magnitude}: RandAugment's magnitude is a bin, "
                          f"0 to data.magnitude_bins - 1 ({cfg.data.magnitude_bins - 1}); torchvision's default is 9.")
    if not 0 <= cfg.data.random_erase <= 1:
        raise ConfigError(f"'data.random_erase' is {cfg.data.random_erase}: the probability of erasing a box of a "
                          "training image, 0 (off) to 1; torchvision's recipes use 0.1 or 0.25.")
    if cfg.train.freeze:
        problem = unknown_prefixes(cfg.model, list(cfg.train.freeze))
        if problem:
            raise ConfigError(problem)
    if cfg.data.generate.max_side < cfg.data.generate.min_side:
        raise ConfigError("'data.generate.max_side' must be at least 'data.generate.min_side'.")


PROFILES = Path(__file__).resolve().parents[1] / "configs" / "slurm"


def profile_path(profile: str) -> Path:
    """``slurm.profile``: a name in configs/slurm/ or the path of a YAML file."""
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = PROFILES / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ConfigError(f"Unknown 'slurm.profile' {profile!r}. Profiles in {PROFILES}: {', '.join(known) or 'none'}; "
                          "or give the path of a YAML file.")
    return path


def _load_yaml(path: Path, what: str) -> DictConfig:
    try:
        tree = OmegaConf.load(path)
    except Exception as err:  # YAML syntax errors come from several libraries
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}") from None
    if not isinstance(tree, DictConfig):
        raise ConfigError(f"{what} '{path}' must hold a mapping of sections (run:, model:, ...).")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                profiles: bool = True) -> DictConfig:
    """Schema defaults, the YAML recipe at ``path``, the SLURM profile it names (``slurm.profile``), then
    ``key=value`` overrides; validated and resolved. ``profiles=False`` reads a resolved config as it is."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"Config file '{path}' does not exist. Pass a YAML recipe such as configs/mini.yaml.")
        cfg = _merge(cfg, _load_yaml(Path(path), "Config file"), f"config file '{path}'")
    words = _parse_overrides(list(overrides))
    profile = OmegaConf.select(_merge(cfg, words, "the command-line overrides"), "slurm.profile", default="")
    if profile and profiles:
        cfg = _merge(cfg, _load_yaml(profile_path(profile), "SLURM profile"), f"SLURM profile '{profile}'")
    cfg = _merge(cfg, words, "the command-line overrides")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"Could not resolve an interpolation in the config: {err}") from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, as written to ``run.dir/config.yaml``."""
    return OmegaConf.to_yaml(cfg, resolve=True)
