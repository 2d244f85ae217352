"""DALI pipelines for ImageNet-style JPEG trees: decode and augment on the CPU or the GPU.

Train: random-resized crop (area 0.08-1, aspect 3/4-4/3) fused into the decoder, resize to
``image_size``, random flip, normalise. Val: resize the shorter side to ``val_resize``, centre crop.
Both emit HWC, which a ``permute`` turns into a channels-last NCHW view without a copy.
Each rank reads the explicit file list that :mod:`pipeline.data.files` gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy

from pipeline.data.files import FileList
from pipeline.data.layout import decode_error

READER = "Reader"


def _read(files: FileList):
    # the list is already this rank's share, in order: no reader-side shuffle or sharding
    return fn.readers.file(files=files.paths, labels=files.labels, random_shuffle=False, pad_last_batch=True,
                           name=READER)


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
def train_pipeline(files: FileList, image_size: int, mean: list[float], std: list[float], on_gpu: bool):
    jpegs, labels = _read(files)
    images = fn.decoders.image_random_crop(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                           random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                           num_attempts=100)
    images = fn.resize(images, resize_x=image_size, resize_y=image_size)
    images = _normalize(images, image_size, mean, std, mirror=fn.random.coin_flip(probability=0.5))
    return images, labels.gpu() if on_gpu else labels


@pipeline_def
def val_pipeline(files: FileList, image_size: int, resize: int, mean: list[float], std: list[float], on_gpu: bool):
    jpegs, labels = _read(files)
    images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
    images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_TRIANGULAR)
    images = _normalize(images, image_size, mean, std, crop=True)
    return images, labels.gpu() if on_gpu else labels


class DaliLoader:
    """Iterates ``(images, labels)``: images a float NCHW tensor (channels-last unless told otherwise).

    ``files_for(epoch)`` gives the rank's file list of an epoch; the pipeline is rebuilt when it
    changes. With ``keep`` false (train) a finished epoch releases its pipeline at once, so it never
    decodes a pass that will not be read; with ``keep`` true (val) the pipeline resets and is reused.
    The reader pads the list's last batch and the iterator drops the padding
    (``LastBatchPolicy.PARTIAL``): every listed file is read exactly once per epoch. ``state_dict``
    holds DALI's own checkpoint (reader position and random state, prefetched batches accounted
    for), so a restored loader yields exactly the batches the interrupted one would have.
    """

    def __init__(self, make_pipeline: Callable[..., object], files_for: Callable[[int], FileList],
                 batch_size: int, channels_last: bool, root: str, keep: bool):
        self._make_pipeline, self._files_for, self._keep = make_pipeline, files_for, keep
        self.batch_size, self.channels_last, self.root = batch_size, channels_last, root
        self.epoch = 0
        self._files: FileList | None = None
        self._it = None
        self._restore: bytes | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._restore = epoch, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "dali": self._it.checkpoints()[0] if self._it is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._restore, self._files = state["epoch"], state["dali"], None

    def __len__(self) -> int:
        return -(-len(self._files_for(self.epoch)) // self.batch_size)

    def _iterator(self) -> DALIClassificationIterator | None:
        files = self._files_for(self.epoch)
        if files is not self._files:
            self._it = None  # releases the previous pipeline's threads and buffers
            if len(files):
                pipe = self._make_pipeline(files, self.epoch, self._restore)
                pipe.build()
                self._it = DALIClassificationIterator(pipe, reader_name=READER,
                                                      last_batch_policy=LastBatchPolicy.PARTIAL,
                                                      auto_reset=self._keep)
            self._files, self._restore = files, None
        return self._it

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        it = self._iterator()
        if it is None:
            return
        while True:
            try:
                batch = next(it)
            except StopIteration:
                if not self._keep:
                    self._files, self._it = None, None
                return
            except RuntimeError as err:
                self._files, self._it = None, None  # a pipeline that failed is rebuilt, never reused
                path = next((p for p in self._files_for(self.epoch).paths if p in str(err)), None)
                raise decode_error(path, self.root, str(err)) from None
            images = batch[0]["data"].permute(0, 3, 1, 2)  # HWC -> channels-last NCHW view, no copy
            if not self.channels_last:
                images = images.contiguous()
            yield images, batch[0]["label"].view(-1).long()


def build_dali_loaders(data_cfg, train_files: Callable[[int], FileList], val_files: FileList, batch_size: int,
                       val_batch_size: int, local_rank: int, device: torch.device, channels_last: bool,
                       seed: int) -> tuple[DaliLoader, DaliLoader]:
    """Train and val loaders; ``train_files(epoch)`` and ``val_files`` are this rank's share; ``seed`` this rank's."""
    on_gpu = device.type == "cuda"
    common = dict(num_threads=data_cfg.workers, device_id=local_rank if on_gpu else None,
                  prefetch_queue_depth=data_cfg.prefetch, image_size=data_cfg.image_size, mean=list(data_cfg.mean),
                  std=list(data_cfg.std), on_gpu=on_gpu)
    resize = data_cfg.val_resize or round(data_cfg.image_size * 256 / 224)

    def make_train(files: FileList, epoch: int, checkpoint: bytes | None):
        # augmentation randomness is a function of (seed, epoch): the same run draws the same crops
        return train_pipeline(files=files, batch_size=batch_size, seed=(seed * 1_000_003 + epoch) % 2**31,
                              enable_checkpointing=True, checkpoint=checkpoint, **common)

    def make_val(files: FileList, epoch: int, checkpoint: bytes | None):
        return val_pipeline(files=files, batch_size=val_batch_size, resize=resize, seed=seed, **common)

    root = str(data_cfg.root)
    return (DaliLoader(make_train, train_files, batch_size, channels_last, root, keep=False),
            DaliLoader(make_val, lambda epoch: val_files, val_batch_size, channels_last, root, keep=True))
