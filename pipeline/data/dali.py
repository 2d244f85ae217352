"""DALI pipelines for ImageNet-style JPEG trees: decode, augment and shard, on the CPU or the GPU.

Train: random-resized crop (area 0.08-1, aspect 3/4-4/3) fused into the decoder, resize to
``image_size``, random flip, normalise. Val: resize the shorter side to ``val_resize``, centre crop.
Both emit HWC, which a ``permute`` turns into a channels-last NCHW view without a copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy

READER = "Reader"


def _normalize(images, image_size: int, mean: list[float], std: list[float], mirror=None, crop: bool = False):
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="HWC",
        crop=(image_size, image_size) if crop else None,
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
        mirror=mirror if mirror is not None else 0,
    )


@pipeline_def
def train_pipeline(root: str, shard_id: int, num_shards: int, image_size: int, mean: list[float],
                   std: list[float], on_gpu: bool):
    jpegs, labels = fn.readers.file(file_root=root, shard_id=shard_id, num_shards=num_shards,
                                    random_shuffle=True, pad_last_batch=True, name=READER)
    images = fn.decoders.image_random_crop(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                           random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                           num_attempts=100)
    images = fn.resize(images, resize_x=image_size, resize_y=image_size)
    images = _normalize(images, image_size, mean, std, mirror=fn.random.coin_flip(probability=0.5))
    return images, labels.gpu() if on_gpu else labels


@pipeline_def
def val_pipeline(root: str, shard_id: int, num_shards: int, image_size: int, resize: int, mean: list[float],
                 std: list[float], on_gpu: bool):
    jpegs, labels = fn.readers.file(file_root=root, shard_id=shard_id, num_shards=num_shards,
                                    random_shuffle=False, pad_last_batch=True, name=READER)
    images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
    images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_TRIANGULAR)
    images = _normalize(images, image_size, mean, std, crop=True)
    return images, labels.gpu() if on_gpu else labels


class DaliLoader:
    """Iterates ``(images, labels)``: images a float NCHW tensor (channels-last unless told otherwise).

    Every image of the shard is seen once per epoch: the reader pads the shard's last batch and
    the iterator drops the padding (``LastBatchPolicy.PARTIAL``), so the last batch may be smaller.
    """

    def __init__(self, pipe, channels_last: bool):
        pipe.build()
        self._it = DALIClassificationIterator(pipe, reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL,
                                              auto_reset=True)
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self._it)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._it:
            images = batch[0]["data"].permute(0, 3, 1, 2)  # HWC -> channels-last NCHW view, no copy
            if not self.channels_last:
                images = images.contiguous()
            yield images, batch[0]["label"].view(-1).long()


def build_dali_loaders(data_cfg, batch_size: int, rank: int, world_size: int, local_rank: int,
                       device: torch.device, channels_last: bool, seed: int) -> tuple[DaliLoader, DaliLoader]:
    """Train and val loaders for this rank's shard; ``batch_size`` is the per-rank batch."""
    on_gpu = device.type == "cuda"
    common = dict(batch_size=batch_size, num_threads=data_cfg.workers, device_id=local_rank if on_gpu else None,
                  prefetch_queue_depth=data_cfg.prefetch, shard_id=rank, num_shards=world_size,
                  image_size=data_cfg.image_size, mean=list(data_cfg.mean), std=list(data_cfg.std), on_gpu=on_gpu)
    root = Path(data_cfg.root)
    resize = data_cfg.val_resize or round(data_cfg.image_size * 256 / 224)
    train = train_pipeline(root=str(root / "train"), seed=seed + rank, **common)
    val = val_pipeline(root=str(root / "val"), resize=resize, seed=seed, **common)
    return DaliLoader(train, channels_last), DaliLoader(val, channels_last)
