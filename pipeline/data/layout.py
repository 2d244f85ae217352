"""Checks of an ImageNet-style folder tree, made before any training starts."""

from __future__ import annotations

import os
import re
from pathlib import Path

# the extensions DALI's decoders and torchvision's ImageFolder both take
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val")
RAW_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")  # ImageNet's val images as the archive holds them


class DatasetError(ValueError):
    """The dataset on disk does not have the layout or the classes the config expects."""


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)


def check_not_raw_val(folder: Path) -> None:
    """Refuse, naming the command that sorts it, a folder that holds ImageNet's val images as the archive has them."""
    with os.scandir(folder) as entries:
        raw_val = any(RAW_VAL_NAME.fullmatch(e.name) for e in entries)
    if raw_val:
        raise DatasetError(
            f"'{folder}' holds ImageNet's raw validation images (ILSVRC2012_val_*.JPEG) in one flat folder, not in "
            "class folders. Sort them into class folders with the devkit's labels: python -m pipeline.data.imagenet "
            f"prepare --devkit ILSVRC2012_devkit_t12.tar.gz --val-flat {folder}")


def list_classes(split_dir: Path) -> list[str]:
    """The sorted class folders of one split; each must hold at least one image."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        check_not_raw_val(split_dir)
        raise DatasetError(f"'{split_dir}' has no class folders. Expected {split_dir}/<class>/<image>.JPEG, "
                           "one folder per class.")
    for name in classes:
        if not _has_image(split_dir / name):
            raise DatasetError(
                f"Class folder '{split_dir / name}' holds no images ({', '.join(IMAGE_EXTENSIONS)}). "
                "Every class needs images in both train/ and val/: restore its files or remove the folder "
                "from both splits (and set model.num_classes to match)."
            )
    return classes


def check_image_folder(root: str | Path, num_classes: int) -> list[str]:
    """Check ``root/train`` and ``root/val`` hold the same ``num_classes`` non-empty class folders."""
    root = Path(root)
    hint = ("Point data.root at a folder with train/<class>/*.JPEG and val/<class>/*.JPEG, or set "
            "data.generate.enabled=true to write a small synthetic dataset there.")
    if not root.is_dir():
        raise DatasetError(f"Dataset folder data.root='{root}' does not exist. {hint}")
    found = {}
    for split in SPLITS:
        if not (root / split).is_dir():
            check_not_raw_val(root)  # the val folder itself given as the dataset
            raise DatasetError(f"Dataset folder '{root}' has no '{split}/' folder. {hint}")
        found[split] = list_classes(root / split)
    train, val = found["train"], found["val"]
    if train != val:
        only_train = sorted(set(train) - set(val))[:5]
        only_val = sorted(set(val) - set(train))[:5]
        raise DatasetError(f"'{root}/train' and '{root}/val' hold different classes (only in train: {only_train}; "
                           f"only in val: {only_val}). Both splits need the same class folders.")
    if len(train) != num_classes:
        raise DatasetError(f"model.num_classes={num_classes} but '{root}/train' has {len(train)} class folders. "
                           f"Set model.num_classes={len(train)}, or point data.root at the intended dataset.")
    return train


class DecodeError(DatasetError):
    """An image file could not be decoded during training or evaluation."""


def short_reason(message: str) -> str:
    """The telling line of a decoder's message (DALI's span many lines of pipeline context)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if line.lower().startswith(("failed", "file mapping failed")) or "failure" in line.lower():
            return line[:300]
    return (lines[-1] if lines else "unknown error")[:300]


def decode_error(paths: list[str], root: str | Path, detail: str) -> DecodeError:
    """A message that names the damaged file (or the files it is among) and the command that finds all of them."""
    if len(paths) == 1:
        what = f"Could not decode image file {paths[0]}"
    elif paths:
        shown = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
        what = f"Could not decode an image file of this rank's batch, one of {shown}"
    else:
        what = "Could not decode an image file of this rank's data"
    if (Path(root) / "shards").is_dir():
        fix = ("This packed dataset holds a file that does not decode: run `python -m pipeline.data.imagenet verify` "
               "on the folder tree it was packed from, then pack it again; the new index leaves such files out.")
    else:
        fix = (f"Run `python -m pipeline.data.imagenet verify {root}` to list every damaged file; training then "
               "leaves them out.")
    return DecodeError(f"{what} ({short_reason(detail)}). {fix}")
