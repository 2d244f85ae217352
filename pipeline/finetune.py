"""Starting a run from existing weights (``model.init_from``) and what fine-tuning holds still (``train.freeze``).

A weights file is a torchvision-layout state_dict: torchvision's DenseNet files (also the old ones, whose keys read
``denselayer1.norm.1.weight``), timm's DenseNets (the same keys as torchvision's; ``.safetensors`` too), a run's
``model_final.pt`` or ``model_ema.pt``, or a checkpoint of this pipeline (its ``model``), of torchvision's reference
scripts (``model``) or of timm's ``train.py`` (``state_dict``). Its keys must match the model's exactly; only the
classifier may differ in its number of classes, and is then replaced by a new one.

Rank 0 alone reads the file (one read of a shared file per job, not one per rank), checks it and hashes it; a
refusal reaches every rank in the same broadcast. The other ranks receive the weights from rank 0 by a broadcast
over the world group (NCCL on GPUs), as DDP would at construction, but before the EMA copies them.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline import collective

log = logging.getLogger(__name__)

CLASSIFIER = "classifier"
# torchvision's DenseNet files from before 0.3 (its densenet.py remaps them with this pattern in _load_state_dict)
OLD_TORCHVISION_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
# files saved before PyTorch 0.4.1 have no BatchNorm step counts: the model's own (0) stay, as BatchNorm's loader does
OPTIONAL = "num_batches_tracked"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's, in state_dicts saved from the wrapper
SHOWN = 5  # keys named in a refusal; the rest are counted


class InitError(ValueError):
    """A weights file that ``model.init_from`` cannot start from."""


def _load_file(path: Path) -> object:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InitError(f"model.init_from='{path}' is a .safetensors file: install the safetensors package "
                            "(pip install safetensors) to read it.") from None
        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``path``, in torchvision's key layout (see the module's docstring for the files)."""
    from pipeline.checkpoint import first_line  # (pipeline.config imports this module)

    path = Path(path)
    if not path.is_file():
        raise InitError(f"model.init_from='{path}' does not exist. Give the path of a weights file (a torchvision "
                        "or timm DenseNet state_dict, a run's model_final.pt, or a checkpoint), or model.init_from='' "
                        "to start from random weights.")
    if path.stat().st_size == 0:
        raise InitError(f"model.init_from='{path}' is empty (0 bytes): a download or copy that did not finish. Copy "
                        "it again.")
    try:
        state = _load_file(path)
    except InitError:
        raise
    except Exception as err:
        raise InitError(f"model.init_from='{path}' could not be read as a weights file "
                        f"({first_line(err)[:300]}). Give a state_dict saved with torch.save (or a "
                        ".safetensors file).") from None
    for key in ("model", "state_dict"):  # a checkpoint: its weights only
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitError(f"model.init_from='{path}' holds a {type(state).__name__}, not a state_dict of tensors.")
    remapped = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        match = OLD_TORCHVISION_KEY.match(key)
        remapped[match.group(1) + match.group(2) if match else key] = value
    return remapped


def _meta_model(name: str, num_classes: int = 1000, depth: int = 100, growth_rate: int = 12) -> nn.Module:
    from pipeline.models import build_model

    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        return build_model(name, num_classes, depth=depth, growth_rate=growth_rate)


def _shapes(state: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items() if not k.startswith(CLASSIFIER + ".")}


def fitting_models(state: dict[str, torch.Tensor]) -> list[str]:
    """The model settings whose layers (all but the classifier) have exactly the keys and shapes of ``state``."""
    from pipeline.models.densenet import IMAGENET_CONFIGS

    shapes = _shapes(state)
    fits = [f"model.name={name}" for name in IMAGENET_CONFIGS if _shapes(_meta_model(name).state_dict()) == shapes]
    layers = [k for k in state if re.fullmatch(r"features\.denseblock1\.denselayer\d+\.conv2\.weight", k)]
    if layers and "features.norm4.weight" in state and "features.denseblock4.denselayer1.conv2.weight" not in state:
        depth, growth = 6 * len(layers) + 4, state[layers[0]].shape[0]
        if _shapes(_meta_model("densenet_bc", depth=depth, growth_rate=growth).state_dict()) == shapes:
            fits.append(f"model.name=densenet_bc model.depth={depth} model.growth_rate={growth}")
    return fits


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def describe_model(model_cfg) -> str:
    if model_cfg.name == "densenet_bc":
        return f"model.name=densenet_bc model.depth={model_cfg.depth} model.growth_rate={model_cfg.growth_rate}"
    return f"model.name={model_cfg.name}"


def match_state(state: dict[str, torch.Tensor], model_cfg, path: str | Path) -> tuple[dict, str]:
    """``state`` checked against the model of ``model_cfg``, key by key and shape by shape: the state to load
    (without the classifier when it has another number of classes) and a note saying so ("" if none)."""
    expected = {k: tuple(v.shape) for k, v in _meta_model(model_cfg.name, model_cfg.num_classes, model_cfg.depth,
                                                          model_cfg.growth_rate).state_dict().items()}
    note = ""
    weight = state.get(f"{CLASSIFIER}.weight")
    wanted = expected[f"{CLASSIFIER}.weight"]
    if weight is not None and weight.dim() == 2 and weight.shape[1] == wanted[1] and weight.shape[0] != wanted[0]:
        state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER + ".")}
        note = (f"the classifier is replaced: the file's has {weight.shape[0]} outputs, model.num_classes="
                f"{model_cfg.num_classes} (a new classifier, initialised as a new model's)")
        expected = {k: v for k, v in expected.items() if not k.startswith(CLASSIFIER + ".")}
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} (the model's: {expected[k]})" for k in expected
                  if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        problems = [f"{len(keys)} {what}: {_some(keys)}" for what, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("keys of another shape", mismatched))
                    if keys]
        fits = fitting_models(state)
        hint = (f"It fits {' or '.join(fits)}: set that, or give a file of {describe_model(model_cfg)}."
                if fits else f"Give a state_dict of {describe_model(model_cfg)}.")
        raise InitError(f"model.init_from='{path}' does not fit {describe_model(model_cfg)}: {'; '.join(problems)}. "
                        f"{hint}")
    return state, note


@dataclass
class InitWeights:
    """``model.init_from`` at the start of an attempt: the file's SHA-256 on rank 0 (None if it is gone); on a new
    run, rank 0's checked weights to load (``state``) and the note on the classifier."""

    path: str
    sha256: str | None
    resuming: bool
    state: dict | None = None
    note: str = ""

    def record(self) -> dict:
        """What checkpoints and the MLflow run keep of it."""
        return {"path": self.path, "sha256": self.sha256}


def will_resume(run_cfg) -> bool:
    """Whether the attempt continues a checkpoint (``run.resume``: a file, or auto with checkpoints in run.dir)."""
    from pipeline.checkpoint import checkpoint_dir

    if run_cfg.resume == "never":
        return False
    return run_cfg.resume != "auto" or any(checkpoint_dir(run_cfg.dir).glob("step-*.pt"))


def read_init(cfg, is_main: bool) -> InitWeights | None:
    """``model.init_from`` read and checked by rank 0 (every rank calls it; a refusal is raised by all). On a
    resume only its SHA-256 is taken: the checkpoint's weights win."""
    if not cfg.model.init_from:
        return None
    from pipeline.data.samples import file_sha256

    path, found = cfg.model.init_from, None
    if is_main:
        resuming = will_resume(cfg.run)
        try:
            if resuming:
                try:  # a requeued job must not stop for a file it no longer needs: gone or unreadable is noted
                    found = InitWeights(path, file_sha256(Path(path)), True)
                except OSError:
                    found = InitWeights(path, None, True)
            else:
                state, note = match_state(read_state_dict(path), cfg.model, path)
                found = InitWeights(path, file_sha256(Path(path)), False, state, note)
        except (InitError, OSError) as err:
            found = str(err)
        except Exception as err:  # noqa: BLE001 - any error: the other ranks are waiting for this broadcast
            found = f"model.init_from='{path}' could not be used ({type(err).__name__}: {err})."
    verdict = collective.broadcast_from_main(found if isinstance(found, str) else
                                             (found.sha256, found.resuming) if found else None)
    if isinstance(verdict, str):
        from pipeline.config import ConfigError

        raise collective.on_every_rank(ConfigError(verdict))
    return found if is_main else InitWeights(path, *verdict)


def load_init(model: nn.Module, init: InitWeights, is_main: bool) -> None:
    """Rank 0 loads the checked weights into ``model`` (strictly); every rank then holds rank 0's weights."""
    if is_main:
        current = model.state_dict()
        model.load_state_dict({**{k: v for k, v in current.items() if k not in init.state}, **init.state})
        log.info("Started from model.init_from=%s (sha256 %s)%s", init.path, init.sha256[:16],
                 f"; {init.note}" if init.note else "")
    collective.broadcast_weights(model)
    init.state = None  # the model holds them now


def under(name: str, prefixes) -> bool:
    """Whether the parameter or module ``name`` is one of ``prefixes`` or inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def unknown_prefixes(model_cfg, prefixes) -> str | None:
    """A message naming each of ``prefixes`` that is not a module of the model and the nearest module names;
    None when all are. Freezing every parameter is refused too."""
    model = _meta_model(model_cfg.name, model_cfg.num_classes, model_cfg.depth, model_cfg.growth_rate)
    names = [n for n, _ in model.named_modules() if n]
    problems = []
    for prefix in prefixes:
        if prefix not in names:
            near = difflib.get_close_matches(prefix, names, n=3, cutoff=0.6)
            near += [n for n in names if n.endswith("." + prefix)][:2]
            hint = f" (nearest: {', '.join(dict.fromkeys(near))})" if near else ""
            problems.append(f"'{prefix}' is not a module of {describe_model(model_cfg)}{hint}")
    if problems:
        tops = ", ".join(n for n in names if n.count(".") <= 1)
        return (f"train.freeze: {'; '.join(problems)}. Name modules as model.named_modules() does, e.g. "
                f"[features.conv0, features.denseblock1]; the model's top modules: {tops}.")
    if all(under(n, prefixes) for n, _ in model.named_parameters()):
        return f"train.freeze={list(prefixes)} freezes every parameter: nothing would train. Leave out the classifier."
    return None


def freeze(model: nn.Module, prefixes) -> str:
    """Freeze the modules ``prefixes`` of ``model``: no gradients, and (through :func:`train_mode`) eval mode in
    training, so their BatchNorms normalise with, and keep, their running statistics. Returns the log's line."""
    if not prefixes:
        return ""
    for prefix in prefixes:
        module = model.get_submodule(prefix)
        module.requires_grad_(False)
        module.frozen = True
    params = list(model.named_parameters())
    frozen = sum(p.numel() for n, p in params if under(n, prefixes))
    total = sum(p.numel() for _, p in params)
    return (f"train.freeze: {', '.join(prefixes)} frozen ({frozen:,} parameters; their BatchNorm statistics kept); "
            f"trainable parameters: {total - frozen:,} of {total:,}")


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, but the modules :func:`freeze` froze stay in eval mode."""
    model.train()
    for module in model.modules():
        if getattr(module, "frozen", False):
            module.eval()
    return model


def compare_on_resume(init: InitWeights, recorded: dict | None, checkpoint: str) -> None:
    """Rank 0, resuming: say how ``model.init_from`` (``init``) relates to the file the run started from
    (``recorded`` in the checkpoint). The checkpoint's weights win; a changed file is a warning, not a refusal: it
    is not read again, and a requeued job must not stop for a file it no longer needs."""
    if recorded is None:
        log.warning("model.init_from=%s is not used: the run resumes from %s, and it did not start from a weights "
                    "file. To start from the file, use a new run.dir.", init.path, checkpoint)
    elif init.sha256 is None:
        log.info("model.init_from=%s is gone; the run resumes from %s, which holds its weights (it started from a "
                 "file with sha256 %s).", init.path, checkpoint, recorded["sha256"][:16])
    elif init.sha256 != recorded["sha256"]:
        log.warning("model.init_from=%s changed since the run started from %s (sha256 %s, now %s): the run resumes "
                    "from %s with the weights it trained, not the file's, and keeps the record of the first file. To "
                    "start from the new file, use a new run.dir.", init.path, recorded["path"],
                    recorded["sha256"][:16], init.sha256[:16], checkpoint)
