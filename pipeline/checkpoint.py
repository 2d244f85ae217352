"""Checkpoints that a crash cannot damage, and finding the newest good one on resume.

A checkpoint is written by rank 0 to ``run.dir/checkpoints/`` as a temporary file in that
folder, flushed, fsynced and renamed; a small JSON sidecar with its SHA-256 follows the same way,
and only then the ``latest`` pointer. A reader never sees half a checkpoint; one that fails to
load or fails its checksum is reported and the one before it is used. The file holds plain
containers only and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import os
import platform
import random
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import flatten

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
POINTER = "latest"
NAME = re.compile(r"^step-(\d{9})\.pt$")
# a run stopped by a signal after checkpointing exits with this status: "start me again to resume"
RESUME_EXIT_CODE = 75


def resume_command(resume: str = "auto") -> str:
    """This process's command line and folder, to run again to resume from the last checkpoint: with
    ``run.resume=auto`` added when it ran with another ``run.resume`` (never: refused; a file: that older one)."""
    words = sys.orig_argv + ([] if resume == "auto" else ["run.resume=auto"])
    return f"from {os.getcwd()}:\n  {shlex.join(words)}"


def run_again(resume: str = "auto") -> str:
    """The words for what :func:`resume_command` gives."""
    return "the same command again" if resume == "auto" else "the same command with run.resume=auto"


def resume_hint(run_dir: str | Path, resume: str = "auto") -> str:
    """What to run to resume a run that stopped to be resumed."""
    again = run_again(resume)
    return (f"Stopped after checkpointing (exit {RESUME_EXIT_CODE}). To resume the run in {Path(run_dir).absolute()} "
            f"from its last checkpoint, run {again} {resume_command(resume)}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, or a resume that would not continue the same run."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a quota: leave no half-written file taking the space
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj: Any, path: str | Path) -> bytes:
    """``torch.save`` through :func:`atomic_write_bytes`; returns the bytes written."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return data


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(state: dict, run_dir: str | Path, global_step: int, keep_last: int,
                    best_step: int | None) -> Path:
    """Write ``state`` as ``step-NNNNNNNNN.pt`` with its checksum sidecar, move the pointer, prune old ones."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{global_step:09d}.pt"
    try:
        data = atomic_torch_save(state, path)
        meta = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "global_step": global_step, "epoch": state["progress"]["epoch"],
                "step_in_epoch": state["progress"]["step_in_epoch"]}
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta).encode())
        atomic_write_bytes(folder / POINTER, json.dumps(meta).encode())
    except OSError:  # the pointer still names the checkpoint before: this one's parts only take space
        if (read_pointer(run_dir) or {}).get("file") != path.name:
            for part in (path, path.with_suffix(".json")):
                part.unlink(missing_ok=True)
        raise
    _prune(folder, keep_last, best_step)
    return path


def size(n: float) -> str:
    """A byte count as a person reads it: 96.0 KiB, 7.9 GiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def unwritable(err: OSError, run_dir: str | Path, global_step: int) -> str:
    """What to tell a person whose checkpoint of ``global_step`` could not be written (a full disk, a quota)."""
    try:
        usage = shutil.disk_usage(run_dir)
        space = f"{size(usage.free)} free of {size(usage.total)} on its filesystem"
    except OSError:
        space = "its free space unknown"
    pointer = read_pointer(run_dir)
    kept = (f"The checkpoint before it ({pointer['file']}, step {pointer['global_step']}) and the latest pointer are "
            f"intact: once there is room, run the same command again to resume from step {pointer['global_step']}."
            if pointer else "No checkpoint was written before it: the run starts over when started again.")
    return (f"Cannot write the checkpoint of step {global_step} into {checkpoint_dir(run_dir)}: "
            f"{err.strerror or err} ({space}). {kept} Free space or raise the quota, or move run.dir to a "
            "filesystem with room (checkpoint.keep_last keeps fewer checkpoints).")


def _steps(folder: Path) -> list[int]:
    """Steps of the checkpoint files present, newest first."""
    return sorted((int(m.group(1)) for p in folder.iterdir() if (m := NAME.match(p.name))), reverse=True)


def _prune(folder: Path, keep_last: int, best_step: int | None) -> None:
    for step in _steps(folder)[keep_last:]:
        if step != best_step:
            for suffix in (".pt", ".json"):
                (folder / f"step-{step:09d}{suffix}").unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    """Load one checkpoint, checking its sidecar's SHA-256 when there is one; plain containers only."""
    path = Path(path)
    data = path.read_bytes()
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        expected = json.loads(sidecar.read_text())["sha256"]
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"checksum mismatch (the file is damaged): {path}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        lines = str(err).splitlines()
        reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise CheckpointError(f"cannot be loaded ({reason[:300]}): {path}") from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), int):
        raise CheckpointError(f"not a checkpoint of this pipeline (format {FORMAT_VERSION}): {path}")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"written by another version of this pipeline (checkpoint format {state['format']}, "
                              f"this version reads {FORMAT_VERSION}; finish that run with the version that wrote "
                              f"it, or start a new run.dir): {path}")
    return state


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, or of another model."""


def first_line(err: BaseException) -> str:
    """An exception's first line of text, or its type's name when it has none (torch.load's EOFError of an empty
    file)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in a ``model_final.pt``, or the ``model`` entry of a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file '{path}' does not exist. Pass a run's model_final.pt or a checkpoint.")
    if path.stat().st_size == 0:
        raise WeightsError(f"Weights file '{path}' is empty (0 bytes): a save or copy that did not finish. Copy it "
                           "again, or pass another model_final.pt or checkpoint.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"Could not read weights file '{path}': {first_line(err)}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"'{path}' holds a {type(state).__name__}, not a state_dict of tensors.")
    return state


def read_pointer(run_dir: str | Path) -> dict | None:
    """The ``latest`` pointer of ``run_dir`` (file, sha256, bytes, global_step, ...), or None if unreadable."""
    try:
        return json.loads((checkpoint_dir(run_dir) / POINTER).read_text())
    except (OSError, ValueError):
        return None


def find_and_load_latest(run_dir: str | Path) -> tuple[dict, Path] | None:
    """The newest checkpoint of ``run_dir`` that loads and passes its checksum; older ones on failure."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return None
    candidates = [folder / f"step-{s:09d}.pt" for s in _steps(folder)]
    pointer = read_pointer(run_dir)
    if pointer and "file" in pointer:  # the pointer names the newest; files newer than it were never completed
        pointed = folder / pointer["file"]
        candidates = [pointed] + [c for c in candidates if c != pointed and c.name < pointed.name]
    for path in candidates:
        try:
            return load_checkpoint(path), path
        except (OSError, CheckpointError) as err:
            log.warning("Skipping checkpoint %s: %s. Trying the one before it.", path.name, err)
    if candidates:
        raise CheckpointError(f"None of the {len(candidates)} checkpoints in {folder} could be loaded. Remove "
                              "them to start over, or set run.resume to a good checkpoint file.")
    return None


def rng_state() -> dict:
    """This process's random generators (python, numpy, torch, CUDA) as plain containers and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def library_versions() -> dict:
    versions = {"torch": str(torch.__version__), "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in ("torchvision", "nvidia.dali"):
        try:
            versions[name.split(".")[-1]] = str(importlib.import_module(name).__version__)
        except ImportError:
            versions[name.split(".")[-1]] = None
    return versions


# keys that define the model and the data of a run: a resume must not change them
# (the dataset is named by its index hash, checked apart, not by data.root: a moved or packed copy may continue)
MUST_MATCH = ("model.", "data.backend", "data.image_size", "data.val_resize", "data.val_image_size", "data.mean",
              "data.std", "data.aug_repeats", "data.progressive.",
              "data.generate.", "run.seed")  # the global batch is checked on its own (with train.batch_per_gpu)
# SyncBatchNorm holds the same parameters and statistics as BatchNorm; a resume takes the checkpoint's weights,
# not model.init_from's (its file's SHA-256 is compared apart)
MAY_CHANGE = ("model.sync_bn", "model.init_from")


def check_resumable(saved_config: dict, config: dict, path: Path) -> None:
    """Refuse a resume whose config changes the model or the data; other changes (epochs, logging) are fine."""
    old, new = flatten(saved_config), flatten(config)
    # a key the saved config lacks came with a newer version, whose default keeps the old behaviour
    changed = [k for k in sorted(set(old) | set(new)) if k in old and k not in MAY_CHANGE
               and (k.startswith(MUST_MATCH) or k in MUST_MATCH) and old.get(k) != new.get(k)]
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise CheckpointError(f"Cannot resume from {path}: the config changes {details}. These keys define the "
                              "model and the data of the run. Set them back, or start a new run with another "
                              "run.dir (or run.resume=never in an empty one).")
