"""DALI pipelines over the dataset index: decode and augment on the CPU or the GPU (``mixed``).

Train: the encoded bytes of this rank's share of each global batch, with each sample's crop window
and flip computed outside DALI (:mod:`pipeline.data.order`), enter through ``external_source``; DALI
decodes exactly that window (ROI decode), resizes it to ``image_size``, flips and normalises. With
augmentation on, each sample's ops and erase box (:mod:`pipeline.data.augment`) enter the same way: DALI
flips, applies the ops to the uint8 image, normalises, then erases. Those inputs are prepared
``data.read_ahead`` batches ahead on threads of the loader (:mod:`pipeline.data.feed`), not on the training
thread when DALI asks. Each pipeline is built once and reset for every pass.
Val: decode, resize the shorter side to ``val_resize``, centre crop. Both emit HWC, which a
``permute`` turns into a channels-last NCHW view without a copy. An evaluation's views (several crops, mirrored:
:mod:`pipeline.data.views`) are cut by torch from the resized images that the val views pipeline emits.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.data import dali_augment
from pipeline.data.augment import dali_params
from pipeline.data.feed import BatchFeed
from pipeline.data.folder import normalise_views
from pipeline.data.layout import DatasetError, decode_error, short_reason
from pipeline.data.order import TrainPlan, val_sizes
from pipeline.data.samples import SampleBytes
from pipeline.data.views import Views


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
def train_pipeline(source, image_size: int, mean: list[float], std: list[float], on_gpu: bool, slots: int = 0,
                   erase: bool = False):
    """``slots`` ops per sample and an erase box (``erase``) come after the crop's outputs; with ``slots``
    the pipeline needs ``enable_conditionals=True``."""
    extra = [types.INT32, types.FLOAT, types.FLOAT] * slots + [types.FLOAT, types.FLOAT] * erase
    encoded, anchor, shape, flip, labels, *augment, ids = fn.external_source(
        source=source, num_outputs=6 + len(extra), batch=True,
        dtype=[types.UINT8, types.INT32, types.INT32, types.INT32, types.INT32, *extra, types.INT64])
    # the index's width and height are the stored pixels: no EXIF rotation, as Pillow reads them
    images = fn.decoders.image_slice(encoded, anchor, shape, device="mixed" if on_gpu else "cpu",
                                     output_type=types.RGB, axis_names="WH", adjust_orientation=False)
    images = fn.resize(images, resize_x=image_size, resize_y=image_size)
    if slots:  # the policy sees the flipped image, as in torchvision's recipe
        images = fn.flip(images, horizontal=flip)
        images = dali_augment.apply_ops(images, augment[0:3 * slots:3], augment[1:3 * slots:3],
                                        augment[2:3 * slots:3], image_size)
    images = _normalize(images, image_size, mean, std, mirror=None if slots else flip)
    if erase:
        images = dali_augment.erase(images, augment[-2], augment[-1])
    return images, labels.gpu() if on_gpu else labels, ids, _stored_shape(encoded)


def _stored_shape(encoded):
    """Each image's (height, width, channels) from its header, as stored: compared with the index's."""
    return fn.peek_image_shape(encoded, adjust_orientation=False)


@pipeline_def
def val_pipeline(source, image_size: int, resize: int, mean: list[float], std: list[float], on_gpu: bool):
    encoded, labels, ids = fn.external_source(source=source, num_outputs=3, batch=True,
                                              dtype=[types.UINT8, types.INT32, types.INT64])
    images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                               adjust_orientation=False)
    images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_TRIANGULAR)
    images = _normalize(images, image_size, mean, std, crop=True)
    return images, labels.gpu() if on_gpu else labels, ids, _stored_shape(encoded)


@pipeline_def
def val_views_pipeline(source, resize: int, on_gpu: bool):
    """The resized images (uint8), padded at the bottom and right to the batch's largest, and each one's size
    before padding: the views (:mod:`pipeline.data.views`) are cut from them where the batch lands."""
    encoded, labels, ids = fn.external_source(source=source, num_outputs=3, batch=True,
                                              dtype=[types.UINT8, types.INT32, types.INT64])
    images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                               adjust_orientation=False)
    images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_TRIANGULAR)
    size = images.shape()  # on the host (DALI's dynamic executor) even for images on the GPU
    return fn.pad(images, axes=(0, 1)), labels.gpu() if on_gpu else labels, ids, _stored_shape(encoded), size


class DaliLoader:
    """Iterates ``(images, labels)``: images a float NCHW tensor (channels-last unless told otherwise).

    ``batches(epoch, start)`` gives ``k -> (outputs..., ids)`` for the k-th batch from step ``start``, or
    None past the end; a :class:`BatchFeed` prepares them ``read_ahead`` batches ahead of DALI, off the training
    thread. ``make_pipeline(feed, epoch)`` builds the pipeline of an epoch, whose image size is
    ``size_of(epoch)``. The pipeline is built once and reset for each pass, and built again only when the size
    changes, when a pass was left unfinished (its prefetched batches are stale) or after an error (a failed
    pipeline is never reused). State: the epoch and the steps consumed. ``last_ids`` are the sample ids of the
    batch last yielded, as DALI returned them with it; ``builds`` counts the pipelines built. ``finish``: what makes
    the images from the pipeline's ``data`` and ``size`` outputs (the views of :func:`val_views_pipeline`).
    """

    def __init__(self, make_pipeline: Callable[[BatchFeed, int], object], size_of: Callable[[int], int],
                 batches: Callable[[int, int], Callable], steps: Callable[[], int], reader: SampleBytes,
                 channels_last: bool, root: str, prefetch: int, read_ahead: int, name: str = "feed",
                 finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self._make_pipeline, self._size_of, self._batches, self._steps = make_pipeline, size_of, batches, steps
        self._finish = finish
        self.reader, self.channels_last, self.root = reader, channels_last, root
        self.epoch, self.start, self._consumed = 0, 0, 0
        self._it: DALIGenericIterator | None = None
        self._size = 0  # the image size the pipeline was built for
        self._ended = False  # the pipeline ran its last pass to the end: reset, it serves the next
        self._fed = fed = deque(maxlen=prefetch + 2)  # the batches DALI may hold when one fails
        # no reference back to the loader: its pipeline must be freed when the loader is, never by a garbage
        # collection, which may run in a forked DataLoader worker and hang there freeing DALI's threads
        self._feed = BatchFeed(read_ahead, lambda batch: fed.append(batch[-1]), name)
        self.last_ids: np.ndarray | None = None
        self.builds = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch or self.start or self._consumed:
            self._leave_pass()
        self.epoch, self.start, self._consumed = epoch, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.start + self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._leave_pass()
        self.epoch, self.start, self._consumed = state["epoch"], state["step"], 0

    def __len__(self) -> int:
        return self._steps() - self.start

    def close(self) -> None:
        """Releases the pipeline (its threads and buffers) and ends the feed's and the reader's threads."""
        self._it, self._ended = None, False
        self._feed.close()
        self.reader.close()

    def _leave_pass(self) -> None:
        """A pass left unfinished: DALI holds batches prefetched for it, so its pipeline serves no other."""
        if not self._ended:
            self._it = None

    def _iterator(self) -> DALIGenericIterator:
        if self._ended:  # the pass before ran to its end: this one starts from the start
            self._consumed, self._ended = 0, False
            if self._size == self._size_of(self.epoch):
                self._begin()
                self._it.reset()  # DALI schedules this pass's first batches now
                return self._it
            self._it = None  # another image size: another pipeline
        if self._it is None:
            self._begin()
            self._size = self._size_of(self.epoch)
            pipe = self._make_pipeline(self._feed, self.epoch)
            pipe.build()
            self.builds += 1
            outputs = ["data", "label", "id", "shape", *(["size"] if self._finish else [])]
            self._it = DALIGenericIterator(pipe, outputs, prepare_first_batch=False)
        return self._it

    def _begin(self) -> None:
        self._fed.clear()
        self._feed.begin(self._batches(self.epoch, self.start))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if len(self) <= 0:
            return
        it = self._iterator()
        try:
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    error = self._feed.failure()
                    if error is not None:  # a read failed: here, after the batches before it
                        raise error from None
                    self._ended = True
                    return
                except RuntimeError as err:
                    raise self._failure(str(err)) from None
                self._consumed += 1
                self.last_ids = ids = batch[0]["id"].view(-1).numpy()
                shape = batch[0]["shape"].numpy()
                split = self.reader.split
                wrong = np.flatnonzero((shape[:, 0] != split.height[ids]) | (shape[:, 1] != split.width[ids]))
                if len(wrong):  # another image than the one indexed, though DALI could crop it
                    i, (height, width) = int(ids[wrong[0]]), shape[wrong[0], :2].tolist()
                    raise DatasetError(self.reader.size_problem(i, width, height))
                if self._finish:
                    yield self._finish(batch[0]["data"], batch[0]["size"][:, :2]), batch[0]["label"].view(-1).long()
                    continue
                images = batch[0]["data"].permute(0, 3, 1, 2)  # HWC -> channels-last NCHW view, no copy
                if not self.channels_last:
                    images = images.contiguous()
                yield images, batch[0]["label"].view(-1).long()
        except Exception:
            # a pipeline that failed is rebuilt, never reused; nor may the error's frames keep it (and its threads)
            # alive: a process forked later (verify's decoders) would hang freeing it
            it = self._it = None  # noqa: F841
            self._ended = False
            raise

    def _failure(self, message: str) -> Exception:
        """Why DALI failed on the batches in flight, each of their samples tried alone: one that is not what was
        indexed (bytes, or the size in its header), else the files Pillow cannot decode either (all, if none).
        DALI's own words are kept."""
        from pipeline.data.index import decode_with_pillow

        ids = [int(i) for batch in self._fed for i in batch]
        for i in ids:
            changed = self.reader.header_problem(i)
            if changed:
                return DatasetError(f"{changed} DALI stopped on it: {dali_reason(message)}")
        bad = [self.reader.path(i) for i in ids if decode_with_pillow(self.reader.read(i).tobytes())]
        return decode_error(bad or [self.reader.path(i) for i in ids], self.root, dali_reason(message))


def dali_reason(message: str) -> str:
    """The line of a DALI error that says what went wrong (after its pipeline context), else the decoder's."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    after = [line for k, line in enumerate(lines) if k and lines[k - 1].endswith("encountered:")]
    return after[0][:400] if after else short_reason(message)


def augment_inputs(plan: TrainPlan, epoch: int, keys: np.ndarray) -> list[np.ndarray]:
    """The batch's per-sample augmentation arguments (drawn by ``keys``), in ``train_pipeline``'s order: kind,
    factor and matrix of each op slot, then the erase box's anchor and shape; none without augmentation."""
    aug = plan.augmentation(epoch, keys)
    if aug is None:
        return []
    inputs = []
    if plan.augment.slots:
        ops = dali_params(aug, plan.image_size(epoch))
        for k in range(plan.augment.slots):
            inputs += [ops.kind[:, k], ops.factor[:, k], ops.matrix[:, k]]
    if plan.augment.erase > 0:
        inputs += [aug.box[:, :2].astype(np.float32), aug.box[:, 2:].astype(np.float32)]
    return [np.ascontiguousarray(a) for a in inputs]  # external_source refuses strided arrays


def build_dali_loaders(data_cfg, plan: TrainPlan | None, train: SampleBytes, val: SampleBytes, val_ids: range,
                       val_batch_size: int, device: torch.device, channels_last: bool, seed: int = 0,
                       views: Views | None = None) -> tuple[DaliLoader | None, DaliLoader]:
    """Train (None without a plan) and val loaders; ``val_ids`` is this rank's share of the val split. ``seed``:
    DALI's own generator's, which no operator here draws from (every random choice arrives as data), so it is
    not in the checkpoint. With ``views`` the val loader yields each image's views
    (:class:`~pipeline.data.views.Views`) instead of its centre crop."""
    on_gpu = device.type == "cuda"
    common = dict(num_threads=data_cfg.workers, device_id=device.index if on_gpu else None,
                  prefetch_queue_depth=data_cfg.prefetch, mean=list(data_cfg.mean), std=list(data_cfg.std),
                  on_gpu=on_gpu, seed=seed)
    val_size, resize = val_sizes(data_cfg)
    root = str(data_cfg.root)
    train_loader = None
    if plan is not None:
        def train_batches(epoch: int, start: int) -> Callable[[int], tuple | None]:
            def batch(k: int) -> tuple | None:
                if start + k >= plan.steps:
                    return None
                ids, keys = plan.ids(epoch, start + k), plan.keys(epoch, start + k)
                x, y, w, h, flip = plan.windows(epoch, ids, keys)
                return (train.read_many(ids), np.stack([x, y], 1), np.stack([w, h], 1), flip.astype(np.int32),
                        train.split.label[ids].astype(np.int32), *augment_inputs(plan, epoch, keys),
                        ids.astype(np.int64))
            return batch

        slots, erase = (plan.augment.slots, plan.augment.erase > 0) if plan.augment else (0, False)
        train_loader = DaliLoader(
            lambda feed, epoch: train_pipeline(source=feed, batch_size=plan.per_rank_batch,
                                               image_size=plan.image_size(epoch), slots=slots, erase=erase,
                                               enable_conditionals=slots > 0, **common),
            plan.image_size, train_batches, lambda: plan.steps, train, channels_last, root, data_cfg.prefetch,
            data_cfg.read_ahead, "train-feed")

    val_steps = -(-len(val_ids) // val_batch_size)

    def val_batches(epoch: int, start: int) -> Callable[[int], tuple | None]:
        def batch(k: int) -> tuple | None:
            if k >= val_steps:
                return None
            ids = np.asarray(val_ids[k * val_batch_size:(k + 1) * val_batch_size])
            return val.read_many(ids), val.split.label[ids].astype(np.int32), ids.astype(np.int64)
        return batch

    if views is not None:
        mean, std = (255 * torch.tensor(list(v), dtype=torch.float32, device=device)
                     for v in (data_cfg.mean, data_cfg.std))
        finish = functools.partial(normalise_views, views=views, device=device, mean=mean, std=std,
                                   channels_last=channels_last)
        plain = {k: v for k, v in common.items() if k not in ("mean", "std")}  # normalised after the cut
        return train_loader, DaliLoader(
            lambda feed, epoch: val_views_pipeline(source=feed, batch_size=val_batch_size, resize=views.resize,
                                                   **plain),
            lambda epoch: views.resize, val_batches, lambda: val_steps, val, channels_last, root, data_cfg.prefetch,
            data_cfg.read_ahead, "val-feed", finish)
    val_loader = DaliLoader(
        lambda feed, epoch: val_pipeline(source=feed, batch_size=val_batch_size, image_size=val_size, resize=resize,
                                         **common),
        lambda epoch: val_size, val_batches, lambda: val_steps, val, channels_last, root, data_cfg.prefetch,
        data_cfg.read_ahead, "val-feed")
    return train_loader, val_loader
