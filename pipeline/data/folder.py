"""The torchvision backend: Pillow decoding in DataLoader workers, the same samples and crop windows as DALI.

The workers send uint8 images; they are normalised (and erased) where the batch lands, on the device.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import functional as F

from pipeline.data.augment import apply_ops, erase
from pipeline.data.layout import DatasetError, DecodeError, decode_error
from pipeline.data.order import TrainPlan, val_sizes
from pipeline.data.samples import SampleBytes
from pipeline.data.views import Views
from pipeline.signals import end_workers_at_exit, ignore_stop_signals

_MARK = "undecodable image file: "
NO_BOX = np.zeros(4, np.int32)  # an erase box that erases nothing


class IndexedImages(Dataset):
    """Samples of a split by ``(id, epoch, draw key)``, decoded to RGB (CMYK, grayscale and PNG files
    included), as ``(HWC uint8 tensor, label, id, erase box)``. ``plan`` given (train): the sample's crop
    window and flip of that epoch (drawn by its key), resized to the epoch's image size, then its augmentation
    ops; its erase box (top, left, height, width; zeros for none) is applied after normalising, by
    :func:`normalise`. Without (val): ``transform``.
    """

    def __init__(self, reader: SampleBytes, plan: TrainPlan | None = None, transform: Callable | None = None):
        self.reader, self.plan, self.transform = reader, plan, transform

    def __len__(self) -> int:
        return len(self.reader.split)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, int, np.ndarray]:
        index, epoch, draw = key
        data = self.reader.read(index)
        try:
            with Image.open(io.BytesIO(data)) as image:
                changed = self.reader.size_problem(index, *image.size)
                image = image.convert("RGB")
        except Exception as err:  # Pillow raises several types for damaged files
            # the path travels back from the worker inside the message, between markers
            raise DecodeError(f"{_MARK}{self.reader.path(index)}\n{type(err).__name__}: {err}") from None
        if changed:  # another image than the one indexed: its crop window would not fit it
            raise DatasetError(changed)
        label = int(self.reader.split.label[index])
        if self.plan is None:
            return torch.from_numpy(np.array(self.transform(image))), label, index, NO_BOX
        keys = np.array([draw])
        x, y, w, h, flip = (int(a[0]) for a in self.plan.windows(epoch, np.array([index]), keys))
        size = self.plan.image_size(epoch)
        image = F.resized_crop(image, y, x, h, w, [size, size], interpolation=transforms.InterpolationMode.BILINEAR,
                               antialias=True)
        if flip:
            image = F.hflip(image)
        aug = self.plan.augmentation(epoch, keys)
        if aug is None:
            return torch.from_numpy(np.array(image)), label, index, NO_BOX
        image = apply_ops(image, aug.op[0], aug.magnitude[0])
        return torch.from_numpy(np.array(image)), label, index, aug.box[0]


def stack(samples: list[tuple[torch.Tensor, int, int, np.ndarray]]) -> tuple[torch.Tensor, ...]:
    """Stacks a batch in the worker as it was decoded: HWC uint8 images (a quarter of float32's bytes through
    shared memory and to the device), labels, ids and erase boxes; :func:`normalise` finishes it where it lands."""
    return (torch.stack([image for image, _, _, _ in samples]), torch.tensor([label for _, label, _, _ in samples]),
            torch.tensor([i for _, _, i, _ in samples]), torch.from_numpy(np.stack([box for *_, box in samples])))


def normalise(images: torch.Tensor, boxes: torch.Tensor, device: torch.device, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool) -> torch.Tensor:
    """A batch of NHWC uint8 images on ``device``, normalised, then each sample's box erased (as torchvision's
    recipe: erasing comes after normalising): NHWC floats, returned as the channels-last NCHW view (no copy), or
    made contiguous NCHW when ``channels_last`` is off. ``mean`` and ``std`` are on ``device``."""
    images = images.to(device, non_blocking=True).float().sub_(mean).div_(std).permute(0, 3, 1, 2)
    boxes = boxes.numpy()  # host numbers: no sync with the device
    for k in np.flatnonzero(boxes[:, 2]):
        erase(images[k], boxes[k])
    if not channels_last:
        images = images.contiguous()
    return images


class StepSampler(Sampler[tuple[int, int, int]]):
    """Yields ``(id, epoch, draw key)`` for ``ids_of(epoch, step)`` and ``keys_of(epoch, step)`` (default: the
    ids), step by step from step ``start``."""

    def __init__(self, ids_of: Callable[[int, int], np.ndarray], steps: Callable[[], int],
                 keys_of: Callable[[int, int], np.ndarray] | None = None):
        self.ids_of, self.keys_of, self.steps, self.epoch, self.start = ids_of, keys_of or ids_of, steps, 0, 0

    def __len__(self) -> int:
        return sum(len(self.ids_of(self.epoch, s)) for s in range(self.start, self.steps()))

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for step in range(self.start, self.steps()):
            for i, key in zip(self.ids_of(self.epoch, step), self.keys_of(self.epoch, step), strict=True):
                yield int(i), self.epoch, int(key)


class FolderLoader:
    """Iterates ``(images, labels)`` batches of one rank; a decode failure names the file.

    Its state is the epoch and the steps consumed: windows are a function of (seed, epoch, draw key), so
    that is all a restored loader needs to yield exactly the batches the interrupted one would have.
    """

    def __init__(self, loader: DataLoader, sampler: StepSampler, root: str, finish: Callable):
        self.loader, self.sampler, self.root, self._finish = loader, sampler, root, finish
        self._consumed = 0
        self.last_ids: np.ndarray | None = None  # the sample ids of the batch last yielded, from the workers

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch, self.sampler.start, self._consumed = epoch, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "step": self.sampler.start + self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch, self.sampler.start, self._consumed = state["epoch"], state["step"], 0

    def close(self) -> None:
        """Ends the workers: they ignore stop signals, so the training process ends them when it stops.

        Dropping the DataLoader drops its persistent iterator, which tells each worker to exit and joins it.
        """
        self.loader = None

    def __len__(self) -> int:
        return max(0, self.sampler.steps() - self.sampler.start)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._consumed = 0
        try:
            for images, labels, ids, boxes in self.loader:
                self._consumed += 1
                self.last_ids = ids.numpy()
                yield self._finish(images, boxes), labels
        except DecodeError as err:
            found = re.search(re.escape(_MARK) + r"(.+)\n(.*)", str(err))
            raise decode_error([found.group(1)] if found else [], self.root,
                               found.group(2) if found else str(err)) from None
        except DatasetError as err:  # from a worker, its message at the end of the worker's traceback
            raise DatasetError(str(err).strip().splitlines()[-1].split("DatasetError: ", 1)[-1]) from None


def stack_padded(samples: list[tuple[torch.Tensor, int, int, np.ndarray]]) -> tuple[torch.Tensor, ...]:
    """:func:`stack` for images of different sizes (resized, not cropped): each padded at the bottom and right to
    the batch's largest, with each image's (height, width) in the place of the erase boxes."""
    height, width = (max(image.shape[k] for image, *_ in samples) for k in (0, 1))
    images = torch.zeros(len(samples), height, width, 3, dtype=torch.uint8)
    for k, (image, *_) in enumerate(samples):
        images[k, :image.shape[0], :image.shape[1]] = image
    sizes = torch.tensor([image.shape[:2] for image, *_ in samples], dtype=torch.int64)
    return images, torch.tensor([label for _, label, _, _ in samples]), torch.tensor([i for _, _, i, _ in samples]), \
        sizes


def normalise_views(images: torch.Tensor, sizes: torch.Tensor, views: Views, device: torch.device,
                    mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The ``views`` of a padded batch of resized NHWC uint8 images (:func:`stack_padded`), cut on ``device`` and
    normalised: ``views.count`` images per sample, sample by sample."""
    crops = views.cut(images.to(device, non_blocking=True), sizes.numpy())
    return normalise(crops, torch.from_numpy(np.tile(NO_BOX, (len(crops), 1))), device, mean, std, channels_last)


def val_transform(image_size: int, resize: int) -> transforms.Compose:
    return transforms.Compose([transforms.Resize(resize, antialias=True), transforms.CenterCrop(image_size)])


def own_generator() -> torch.Generator:
    """A DataLoader's own generator, for the seed each new iterator draws for its workers (who draw nothing from
    it). Without one the seed comes from torch's global generator, whose state (dropout's) a resume restores: the
    iterator a resumed run makes after the restore would shift every later dropout mask."""
    return torch.Generator().manual_seed(0)


def build_folder_loaders(data_cfg, plan: TrainPlan | None, train: SampleBytes, val: SampleBytes, val_ids: range,
                         val_batch_size: int, device: torch.device, channels_last: bool,
                         views: Views | None = None) -> tuple[FolderLoader | None, FolderLoader]:
    """Train (None without a plan) and val loaders; ``val_ids`` is this rank's share of the val split. With
    ``views`` the val loader yields each image's views (:class:`~pipeline.data.views.Views`) instead of its
    centre crop."""
    val_size, resize = val_sizes(data_cfg)
    mean, std = (255 * torch.tensor(list(v), dtype=torch.float32, device=device) for v in (data_cfg.mean, data_cfg.std))
    finish = functools.partial(normalise, device=device, mean=mean, std=std, channels_last=channels_last)
    common = dict(num_workers=data_cfg.workers, pin_memory=device.type == "cuda", collate_fn=stack,
                  persistent_workers=data_cfg.workers > 0, worker_init_fn=ignore_stop_signals,
                  prefetch_factor=data_cfg.prefetch if data_cfg.workers > 0 else None)
    if data_cfg.workers:
        end_workers_at_exit()
    root = str(data_cfg.root)
    train_loader = None
    if plan is not None:
        sampler = StepSampler(plan.ids, lambda: plan.steps, plan.keys)
        loader = DataLoader(IndexedImages(train, plan), sampler=sampler, batch_size=plan.per_rank_batch,
                            generator=own_generator(), **common)
        train_loader = FolderLoader(loader, sampler, root, finish)
    val_steps = -(-len(val_ids) // val_batch_size)
    val_sampler = StepSampler(lambda epoch, k: np.asarray(val_ids[k * val_batch_size:(k + 1) * val_batch_size]),
                              lambda: val_steps)
    if views is None:
        val_images = IndexedImages(val, transform=val_transform(val_size, resize))
    else:  # the resized images, of different sizes: the views are cut where the batch lands
        val_images = IndexedImages(val, transform=transforms.Resize(views.resize, antialias=True))
        common["collate_fn"] = stack_padded
        finish = functools.partial(normalise_views, views=views, device=device, mean=mean, std=std,
                                   channels_last=channels_last)
    val_loader = DataLoader(val_images, sampler=val_sampler, batch_size=val_batch_size, generator=own_generator(),
                            **common)
    return train_loader, FolderLoader(val_loader, val_sampler, root, finish)
