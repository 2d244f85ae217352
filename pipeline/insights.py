"""Why DenseNets work, from a run's own weights and gradients: ``python -m pipeline.insights WEIGHTS [CONFIG]``.

**Feature reuse** (the paper's Figure 5). In a dense block, layer l's first convolution reads the
concatenation [block input, output of layer 1, ..., output of layer l-1]. For each target layer and
each source, a cell holds the mean absolute weight of the target's first convolution over the input
channels that came from that source; each target's row is then divided by its largest cell, so 1
marks the source a layer leans on most. The transition after a block (or the classifier after the
last one) reads every source of the block and gets its own row the same way.

**Gradient flow**: the L2 norm of the gradient of each paper unit (the stem, every dense layer's two
convolutions, every transition, the classifier), in depth order, sampled after the backward pass that
training runs anyway.

Writes ``feature_reuse.png``, ``feature_reuse.csv`` and, when the weights sit in a run dir with a
``metrics.jsonl`` holding gradient samples, ``gradient_flow.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from pipeline.checkpoint import WeightsError, read_weights
from pipeline.cli import command, swapped_roles

log = logging.getLogger(__name__)
LAYER_KEY = re.compile(r"^features\.denseblock(\d+)\.denselayer(\d+)\.conv1\.weight$")


class InsightsError(WeightsError):
    """Weights that are not a DenseNet's, or not the configured model's."""


@dataclass
class BlockReuse:
    """One dense block: ``weights[t, s]`` is target t's mean |w| over source s's channels (NaN: t cannot read s)."""

    block: int
    sources: list[str]
    targets: list[str]
    weights: np.ndarray

    @property
    def normalized(self) -> np.ndarray:
        """Each target row divided by its largest cell."""
        peak = np.nanmax(self.weights, axis=1, keepdims=True)
        return self.weights / np.where(peak > 0, peak, 1.0)


def _mean_abs_by_source(weight: torch.Tensor, widths: list[int]) -> list[float]:
    """Mean |w| of a conv or linear weight over each consecutive group of input channels (one host copy)."""
    per_channel = weight.detach().float().abs().reshape(weight.shape[0], weight.shape[1], -1).mean(dim=(0, 2))
    return torch.stack([chunk.mean() for chunk in torch.split(per_channel, widths)]).tolist()


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the prefixes DDP (``module.``) and torch.compile (``_orig_mod.``) put on them."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def feature_reuse(state: dict[str, torch.Tensor]) -> list[BlockReuse]:
    """The reuse matrix of every dense block of a DenseNet state_dict (torchvision's layout)."""
    state = _unwrapped(state)
    try:
        return _feature_reuse(state)
    except KeyError as err:
        raise InsightsError(f"these weights have dense blocks but no {err}: not a whole DenseNet state_dict "
                            "in torchvision's layout.") from None


def _feature_reuse(state: dict[str, torch.Tensor]) -> list[BlockReuse]:
    layers: dict[int, int] = {}
    for key in state:
        if match := LAYER_KEY.match(key):
            block, layer = int(match[1]), int(match[2])
            layers[block] = max(layers.get(block, 0), layer)
    if not layers:
        raise InsightsError("no DenseNet layers (features.denseblockN.denselayerM.conv1.weight) in these weights: "
                            "pass a DenseNet's model_final.pt or a checkpoint of this pipeline.")
    blocks = []
    last = max(layers)
    for block in sorted(layers):
        prefix = f"features.denseblock{block}"
        count = layers[block]
        growth = state[f"{prefix}.denselayer1.conv2.weight"].shape[0]
        block_input = state[f"{prefix}.denselayer1.conv1.weight"].shape[1]
        sources = ["input"] + [f"layer {j}" for j in range(1, count + 1)]
        weights = np.full((count + 1, count + 1), np.nan)
        for layer in range(1, count + 1):
            conv = state[f"{prefix}.denselayer{layer}.conv1.weight"]
            widths = [block_input] + [growth] * (layer - 1)
            if conv.shape[1] != sum(widths):
                raise InsightsError(f"{prefix}.denselayer{layer}.conv1 reads {conv.shape[1]} channels, not the "
                                    f"{sum(widths)} a dense block of growth rate {growth} gives it.")
            weights[layer - 1, :layer] = _mean_abs_by_source(conv, widths)
        if block != last:
            reader, name = state[f"features.transition{block}.conv.weight"], "transition"
        else:
            reader, name = state["classifier.weight"], "classifier"
        if reader.shape[1] != block_input + count * growth:
            raise InsightsError(f"the {name} after dense block {block} reads {reader.shape[1]} channels, not the "
                                f"{block_input + count * growth} the block gives it.")
        weights[count, :] = _mean_abs_by_source(reader, [block_input] + [growth] * count)
        blocks.append(BlockReuse(block, sources, [f"layer {t}" for t in range(1, count + 1)] + [name], weights))
    return blocks


def load_state(path: str | Path, config: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in a ``model_final.pt`` or checkpoint; with ``config``, checked against its model."""
    state = _unwrapped(read_weights(path))
    if config is not None:
        from pipeline.config import load_config
        from pipeline.models import build_model

        cfg = load_config(config, [])
        expected = build_model(cfg.model.name, cfg.model.num_classes, depth=cfg.model.depth,
                               growth_rate=cfg.model.growth_rate).state_dict()
        wrong = sorted(set(expected) ^ set(state)) + [k for k in expected if k in state
                                                       and expected[k].shape != state[k].shape]
        if wrong:
            raise InsightsError(f"'{path}' is not a model.name={cfg.model.name} (model.num_classes="
                                f"{cfg.model.num_classes}) as {config} says: {len(wrong)} keys missing, extra or "
                                f"of another shape (e.g. {wrong[:2]}). Pass the config the weights were trained "
                                "with, or leave it out to read the structure from the weights.")
    return state


# ---------------------------------------------------------------- drawing

def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, safe beside training threads

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_feature_reuse(blocks: list[BlockReuse], path: Path, title: str = "") -> Path:
    """One heatmap panel per dense block: targets down, sources across, rows normalised to 1."""
    fig = _figure(4.2 * len(blocks) + 0.8, 4.6)
    axes = fig.subplots(1, len(blocks), squeeze=False)[0]
    image = None
    for ax, reuse in zip(axes, blocks, strict=True):
        image = ax.imshow(np.ma.masked_invalid(reuse.normalized), cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest", aspect="auto")
        n = len(reuse.sources)
        step = max(1, math.ceil(n / 12))  # readable ticks on a 48-layer block
        ticks = list(range(0, n, step))
        ax.set_xticks(ticks, ["in" if t == 0 else str(t) for t in ticks])
        rows = list(range(0, n - 1, step)) + [n - 1]
        ax.set_yticks(rows, [reuse.targets[r].replace("layer ", "") if r < n - 1 else reuse.targets[r][:5]
                             for r in rows])
        ax.set_xlabel("source: block input, then layer")
        ax.set_ylabel("target layer")
        ax.set_title(f"dense block {reuse.block}")
    fig.colorbar(image, ax=axes, shrink=0.8, label="mean |weight| / row max")
    if title:
        fig.suptitle(title)
    fig.savefig(path)
    return path


def write_feature_reuse_csv(blocks: list[BlockReuse], path: Path) -> Path:
    """One row per (block, target, source) with the mean |weight| and the row-normalised value."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["block", "target", "source", "mean_abs_weight", "normalized"])
        for reuse in blocks:
            for t, target in enumerate(reuse.targets):
                for s, source in enumerate(reuse.sources):
                    if not np.isnan(reuse.weights[t, s]):
                        out.writerow([reuse.block, target, source, f"{reuse.weights[t, s]:.6g}",
                                      f"{reuse.normalized[t, s]:.4f}"])
    return path


# ---------------------------------------------------------------- gradient flow

def gradient_units(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The paper's units in depth order: stem, ``block1.layer01`` ..., ``block1.transition``, ..., classifier."""
    units: dict[str, list[nn.Parameter]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        parts = name.split(".")
        if name == "classifier":
            unit = "classifier"
        elif parts[1].startswith("denseblock"):
            unit = f"block{parts[1][10:]}.layer{int(parts[2][10:]):02d}"
        elif parts[1].startswith("transition"):
            unit = f"block{parts[1][10:]}.transition"
        else:
            unit = "stem"
        units.setdefault(unit, []).append(module.weight)
    return units


class GradientFlow:
    """Per-unit gradient norms of ``model`` after a backward pass: one host sync per sample."""

    def __init__(self, model: nn.Module):
        self.units = {unit: params for unit, params in gradient_units(model).items()  # train.freeze: none
                      if all(p.requires_grad for p in params)}

    def sample(self) -> dict[str, float] | None:
        """``{unit: L2 norm of its weights' gradients}``, or None before any backward (or on inf/NaN)."""
        grads = [[p.grad for p in params if p.grad is not None] for params in self.units.values()]
        if not all(grads):
            return None
        norms = torch.stack([torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g))) for g in grads])
        values = norms.float().cpu().tolist()
        if not all(math.isfinite(v) for v in values):
            return None  # an fp16 step the grad scaler skipped
        return dict(zip(self.units, values, strict=True))


def plot_gradient_flow(samples: list[tuple[int, dict[str, float]]], path: Path, title: str = "") -> Path:
    """Gradient norm by depth, a line per sampled step (darker = earlier), log scale."""
    from matplotlib import colormaps

    fig = _figure(11, 4.4)
    ax = fig.subplots()
    units = list(samples[0][1])
    cmap = colormaps["viridis"]
    for i, (step, norms) in enumerate(samples):
        ax.plot(range(len(units)), [norms[u] for u in units], color=cmap(i / max(1, len(samples) - 1)),
                linewidth=1.2, alpha=0.85, label=f"step {step}" if i in (0, len(samples) - 1) else None)
    starts = [i for i, u in enumerate(units) if u.endswith("layer01")]
    for block, start in enumerate(starts, 1):
        ax.axvline(start - 0.5, color="0.8", linewidth=0.8)
        ax.text(start, 1.0, f"block {block}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_yscale("log")
    step = max(1, math.ceil(len(units) / 30))
    ax.set_xticks(range(0, len(units), step), [units[i] for i in range(0, len(units), step)], rotation=90,
                  fontsize=7)
    ax.set_xlabel("depth (stem, dense layers, transitions, classifier)")
    ax.set_ylabel("gradient L2 norm")
    ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path)
    return path


def gradient_samples(metrics_file: Path) -> list[tuple[int, dict[str, float]]]:
    """The ``grad`` events of a run's metrics.jsonl as (global step, norms)."""
    samples = []
    for line in metrics_file.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a run still going
            continue
        if event.get("event") == "grad":
            samples.append((event["global_step"], event["norms"]))
    return samples


def no_samples_reason(run_dir: Path) -> str:
    """Why the run in ``run_dir`` has no gradient samples, from its config.yaml and the steps it trained."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
    if not metrics.is_file():
        return f"no {metrics}: gradient_flow.png needs the metrics.jsonl of a run trained with insights.enabled"
    steps = 0
    for line in metrics.read_text().splitlines():
        try:
            steps = max(steps, json.loads(line).get("global_step", 0))
        except json.JSONDecodeError:  # the half-written last line of a run still going
            continue
    insights = OmegaConf.load(config).get("insights") if config.is_file() else None
    if insights is not None and not insights.enabled:
        return f"no gradient samples in {metrics}: the run was trained with insights.enabled=false"
    if insights is not None and insights.every_steps > steps:
        return (f"no gradient samples in {metrics}: insights were enabled, but insights.every_steps="
                f"{insights.every_steps} is more than the {steps} steps the run trained, so no step was sampled. "
                f"Train with insights.every_steps={max(steps, 1)} or less to sample this run's steps")
    return f"no gradient samples in {metrics}: gradient_flow.png needs a run trained with insights.enabled"


def write_insights(state: dict[str, torch.Tensor], out: Path, title: str = "",
                   samples: list[tuple[int, dict[str, float]]] | None = None) -> list[Path]:
    """``feature_reuse.png`` and ``.csv`` (and ``gradient_flow.png`` given samples) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    blocks = feature_reuse(state)
    written = [plot_feature_reuse(blocks, out / "feature_reuse.png", title),
               write_feature_reuse_csv(blocks, out / "feature_reuse.csv")]
    if samples:
        written.append(plot_gradient_flow(samples, out / "gradient_flow.png", title))
    return written


# MLflow's UI groups charts by the key's prefix and sorts the groups by name: "visual" comes after train/ and val/,
# and "visual/grad_norm" (one chart per layer) after the pictures.
PICTURES = "visual"
GRAD_NORMS = f"{PICTURES}/grad_norm"


class TrainingInsights:
    """Rank 0 during training: gradient norms every ``every_steps`` steps, pictures at each epoch end.

    The samples go to ``metrics.jsonl`` (event ``grad``) and to MLflow as ``visual/grad_norm/<unit>`` metrics;
    the pictures of the epoch (its weights' reuse, its gradient samples) to ``run.dir/insights/``, to the
    MLflow run's image charts, keyed ``visual/feature_reuse`` and ``visual/gradient_flow``, and as the
    artifacts ``insights/feature_reuse.png`` and ``insights/gradient_flow.png`` (replaced each epoch).
    Insights never stop training: a failure (a full disk, say) is reported once and turns them off.
    """

    def __init__(self, model: nn.Module, every_steps: int, run_dir: Path, metrics, tracker, epoch_start: int):
        import matplotlib  # noqa: F401  (fails here, at the start, rather than at the first epoch end)

        self.model, self.every_steps, self.out = model, every_steps, run_dir / "insights"
        self.flow = GradientFlow(model)
        self.metrics, self.tracker = metrics, tracker
        metrics_file = run_dir / "metrics.jsonl"
        # a resumed epoch's picture holds the samples taken before the interruption too
        self.samples = [s for s in (gradient_samples(metrics_file) if metrics_file.is_file() else [])
                        if s[0] > epoch_start]
        self.off = False

    def _failed(self, err: Exception) -> None:
        self.off = True
        log.warning("Insights are off for the rest of this run: %s: %s", type(err).__name__, err)

    def on_step(self, global_step: int) -> None:
        if self.off or global_step % self.every_steps:
            return
        try:
            if (norms := self.flow.sample()) is None:
                return
            self.samples.append((global_step, norms))
            if self.metrics:
                self.metrics.log("grad", norms=norms, global_step=global_step)
            if self.tracker:
                self.tracker.log_metrics({f"{GRAD_NORMS}/{unit}": value for unit, value in norms.items()}, global_step)
        except Exception as err:
            self._failed(err)

    def on_epoch_end(self, epoch: int, global_step: int) -> None:
        if self.off:
            return
        try:
            # the weights are read where they are: only the per-source means reach the host
            written = write_insights(self.model.state_dict(), self.out, f"epoch {epoch + 1}, step {global_step}",
                                     self.samples)
            if self.tracker:
                pictures = [path for path in written if path.suffix == ".png"]
                for path in pictures:
                    self.tracker.log_image(f"{PICTURES}/{path.stem}", path, global_step)
                self.tracker.log_artifacts(pictures, "insights")  # named files the Artifacts tab previews
        except Exception as err:
            self._failed(err)
        self.samples = []


def start_insights(cfg, model: nn.Module, run_dir: Path, metrics, tracker, epoch_start: int):
    """Rank 0's :class:`TrainingInsights` when ``insights.enabled``; None (with a warning) if they cannot run."""
    if not cfg.enabled:
        return None
    try:
        return TrainingInsights(model, cfg.every_steps, run_dir, metrics, tracker, epoch_start)
    except ImportError as err:
        log.warning("Insights are off: %s. Install matplotlib (pip install matplotlib), or set "
                    "insights.enabled=false to silence this.", err)
        return None


@command()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.insights", description=__doc__.splitlines()[0])
    parser.add_argument("weights", help="a model_final.pt or a checkpoint")
    parser.add_argument("config", nargs="?", help="the run's config.yaml: checks the weights are that model")
    parser.add_argument("--out", type=Path, default=None, help="default: insights/ beside the weights")
    args = parser.parse_args(argv)
    swapped = swapped_roles("python -m pipeline.insights WEIGHTS [CONFIG]", args.config, args.weights)
    if swapped:
        parser.error(swapped)
    state = load_state(args.weights, args.config)
    weights = Path(args.weights)
    run_dir = weights.parent.parent if weights.parent.name == "checkpoints" else weights.parent
    metrics = run_dir / "metrics.jsonl"
    samples = gradient_samples(metrics) if metrics.is_file() else []
    out = args.out or weights.parent / "insights"
    written = write_insights(state, out, title=f"{run_dir.name}: {weights.name}", samples=samples)
    for path in written:
        print(path)
    if not samples:
        print(f"({no_samples_reason(run_dir)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
