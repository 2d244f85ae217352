"""ImageNet on disk: ``prepare`` the official archives into class folders, ``verify`` every file.

    python -m pipeline.data.imagenet prepare --train-tar ILSVRC2012_img_train.tar \\
        --val-tar ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz --out /data/imagenet
    python -m pipeline.data.imagenet verify /data/imagenet

``verify`` decodes every file with the training loader's decoder (DALI's, or Pillow's where DALI
is missing) on all cores, and writes ``verify.json`` beside the dataset: the counts per split and
class, the files that cannot be decoded (training leaves them out), and the PNG, CMYK and grayscale
files named ``.JPEG`` (these decode to RGB and train normally).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.checkpoint import atomic_write_bytes
from pipeline.data.files import REPORT_NAME, scan_split
from pipeline.data.layout import SPLITS, DatasetError, check_image_folder, short_reason
from pipeline.signals import default_signal_handlers

IMAGENET_1K = {"train": 1_281_167, "val": 50_000, "classes": 1000}
DECODE_BATCH = 64
log = logging.getLogger("pipeline.data.imagenet")


def prepare(train_tar: str | Path, val_tar: str | Path, devkit: str | Path, out: str | Path) -> Path:
    """Extract the official archives into ``out/train/<wnid>/`` and ``out/val/<wnid>/`` with torchvision's parsers."""
    from torchvision.datasets.imagenet import parse_devkit_archive, parse_train_archive, parse_val_archive

    archives = {"--train-tar": Path(train_tar), "--val-tar": Path(val_tar), "--devkit": Path(devkit)}
    for flag, path in archives.items():
        if not path.is_file():
            raise DatasetError(f"{flag} '{path}' does not exist. Download it from image-net.org "
                               "(ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz).")
    out = Path(out).absolute()
    for split in SPLITS:
        if (out / split).exists():
            raise DatasetError(f"'{out / split}' already exists: prepare writes a new tree. Remove it or choose "
                               "another --out.")
    out.mkdir(parents=True, exist_ok=True)
    steps = [(parse_devkit_archive, archives["--devkit"]), (parse_train_archive, archives["--train-tar"]),
             (parse_val_archive, archives["--val-tar"])]
    for parse, archive in steps:
        log.info("Extracting %s", archive)
        try:  # torchvision joins root and file; an absolute file path is used as is
            parse(str(out), str(archive.absolute()))
        except RuntimeError as err:
            raise DatasetError(f"Could not use '{archive}': {err} Re-download it if it is damaged.") from None
    return out


def _inspect(path: str) -> tuple[str, str, str | None]:
    """(format, mode, error) of one file by its header: Pillow reads no pixels here."""
    try:
        with Image.open(path) as image:
            return image.format or "", image.mode, None
    except Exception as err:
        return "", "", f"{type(err).__name__}: {err}"


def _decode_with_pillow(path: str) -> tuple[str, str, str | None]:
    fmt, mode, error = _inspect(path)
    if error is None:
        try:
            with Image.open(path) as image:
                image.convert("RGB").load()
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
    return fmt, mode, error


def _dali_decode_failures(paths: list[str], threads: int) -> dict[str, str]:
    """Decode ``paths`` with DALI's CPU decoder in batches; returns the files that fail and why."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=DECODE_BATCH, num_threads=threads, device_id=None, prefetch_queue_depth=1)
    def decode():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    def run(pipe, batch: list[str]) -> None:
        pipe.feed_input("encoded", [np.fromfile(p, dtype=np.uint8) for p in batch])
        pipe.run()

    # an empty file is undecodable whatever the decoder; DALI is not given one
    failures = {p: "empty file (0 bytes)" for p in paths if os.path.getsize(p) == 0}
    paths = [p for p in paths if p not in failures]
    pipe = decode()
    pipe.build()
    bar = tqdm(total=len(paths), desc="decoding", unit="img", disable=None, mininterval=2)
    for start in range(0, len(paths), DECODE_BATCH):
        batch = paths[start:start + DECODE_BATCH]
        try:
            run(pipe, batch)
        except Exception:
            # a pipeline that failed is not reused: find the culprits one file at a time, each in a fresh one
            for path in batch:
                pipe = decode()
                pipe.build()
                try:
                    run(pipe, [path])
                except Exception as err:
                    failures[path] = short_reason(str(err))
            pipe = decode()
            pipe.build()
        bar.update(len(batch))
    bar.close()
    return failures


def default_decoder() -> str:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "pillow"
    return "dali"


def verify(root: str | Path, decoder: str | None = None, workers: int | None = None) -> dict:
    """Count, decode and classify every image under ``root``; writes and returns the ``verify.json`` report."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise DatasetError(f"Dataset folder '{root}' does not exist.")
    classes = _classes(root)
    decoder = decoder or default_decoder()
    workers = workers or os.cpu_count() or 1
    splits = {split: scan_split(root / split, classes) for split in SPLITS}
    paths = [p for files in splits.values() for p in files.paths]
    log.info("Verifying %d images in %s with the %s decoder on %d cores", len(paths), root, decoder, workers)

    per_file = _decode_with_pillow if decoder == "pillow" else _inspect
    # close + join, never terminate: the workers finish their queue and exit on their own
    pool = Pool(workers, initializer=default_signal_handlers)
    try:
        headers = dict(zip(paths, pool.imap(per_file, paths, chunksize=64), strict=True))
    finally:
        pool.close()
        pool.join()
    if decoder == "pillow":
        failures = {p: err for p, (_, _, err) in headers.items() if err}
    else:
        failures = _dali_decode_failures(paths, workers)

    def rel(path: str) -> str:
        return str(Path(path).relative_to(root))

    def named_jpeg(path: str) -> bool:
        return path.lower().endswith((".jpeg", ".jpg"))

    decodable = [p for p in paths if p not in failures]
    counts = {split: len(files) for split, files in splits.items()}
    report = {
        "root": str(root),
        "decoder": decoder,
        "counts": {**counts, "classes": len(classes)},
        "per_class": {split: dict(Counter(classes[i] for i in files.labels)) for split, files in splits.items()},
        "imagenet_1k": counts == {"train": IMAGENET_1K["train"], "val": IMAGENET_1K["val"]}
        and len(classes) == IMAGENET_1K["classes"],
        "undecodable": sorted(rel(p) for p in failures),
        "errors": {rel(p): err for p, err in sorted(failures.items())},
        "png_as_jpeg": sorted(rel(p) for p in decodable if named_jpeg(p) and headers[p][0] == "PNG"),
        "cmyk": sorted(rel(p) for p in decodable if headers[p][1] == "CMYK"),
        "grayscale": sorted(rel(p) for p in decodable if headers[p][1] in ("L", "LA", "I;16", "1")),
    }
    atomic_write_bytes(root / REPORT_NAME, json.dumps(report, indent=1).encode())
    return report


def _classes(root: Path) -> list[str]:
    """The class folders of ``root`` (train and val must agree), whatever their number."""
    train = sorted(e.name for e in os.scandir(root / "train") if e.is_dir()) if (root / "train").is_dir() else []
    return check_image_folder(root, len(train))


def summarize(report: dict) -> str:
    counts = report["counts"]
    lines = [f"{report['root']}: {counts['train']} train and {counts['val']} val images in {counts['classes']} classes"
             + (" (the full ImageNet-1k)" if report["imagenet_1k"] else ""),
             f"  undecodable (left out of training): {len(report['undecodable'])}",
             f"  PNG named .JPEG: {len(report['png_as_jpeg'])}, CMYK: {len(report['cmyk'])}, "
             f"grayscale: {len(report['grayscale'])} (decoded to RGB, kept)"]
    lines += [f"    {path}: {err}" for path, err in list(report["errors"].items())[:20]]
    lines.append(f"  report: {Path(report['root']) / REPORT_NAME}")
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.imagenet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="extract the official archives into train/<wnid>/ and val/<wnid>/")
    prep.add_argument("--train-tar", required=True)
    prep.add_argument("--val-tar", required=True)
    prep.add_argument("--devkit", required=True)
    prep.add_argument("--out", required=True)
    ver = sub.add_parser("verify", help="count and decode every image; write verify.json beside the dataset")
    ver.add_argument("root")
    ver.add_argument("--decoder", choices=("dali", "pillow"), default=None, help="default: dali when installed")
    ver.add_argument("--workers", type=int, default=None, help="processes/threads (default: all cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if args.command == "prepare":
            out = prepare(args.train_tar, args.val_tar, args.devkit, args.out)
            print(f"Prepared {out}. Next: python -m pipeline.data.imagenet verify {out}")
        else:
            print(summarize(verify(args.root, args.decoder, args.workers)))
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
