"""The torchvision backend: Pillow decoding in DataLoader workers, the same augmentations and file lists as DALI."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from pipeline.data.files import FileList
from pipeline.data.layout import DecodeError, decode_error
from pipeline.signals import default_signal_handlers

_MARK = "undecodable image file: "


class ImageFiles(Dataset):
    """The images of a :class:`FileList`, decoded to RGB (CMYK, grayscale and PNG files included)."""

    def __init__(self, files: FileList, transform: Callable):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = key
        path = self.files.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as err:  # Pillow raises several types for damaged files
            # the path travels back from the worker inside the message, between markers
            raise DecodeError(f"{_MARK}{path}\n{type(err).__name__}: {err}") from None
        with torch.random.fork_rng(devices=[]):
            # each sample's crop and flip follow from its own seed, whichever worker draws them
            torch.manual_seed(sample_seed)
            return self.transform(image), self.files.labels[index]


def stack(samples: list[tuple[torch.Tensor, int]], channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks samples into a batch, channels-last when asked: the copy happens in the worker processes."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.stack([image for image, _ in samples]).contiguous(memory_format=memory_format)
    return images, torch.tensor([label for _, label in samples])


class EpochIndices(Sampler[tuple[int, int]]):
    """Yields ``(index, sample seed)`` for ``indices_for(epoch)``, from position ``start`` on."""

    def __init__(self, indices_for: Callable[[int], list[int]], seed: int):
        self.indices_for, self.seed, self.epoch, self.start = indices_for, seed, 0, 0

    def __len__(self) -> int:
        return len(self.indices_for(self.epoch)) - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.indices_for(self.epoch)
        base = (self.seed * 1_000_003 + self.epoch) * 2**24
        for position in range(self.start, len(indices)):
            yield indices[position], (base + position) % 2**63


class FolderLoader:
    """Iterates ``(images, labels)`` batches of one rank; a decode failure names the file.

    Its state is the epoch and the number of samples consumed; with per-sample seeds that is all
    a restored loader needs to yield exactly the batches the interrupted one would have.
    """

    def __init__(self, loader: DataLoader, sampler: EpochIndices, root: str):
        self.loader, self.sampler, self.root = loader, sampler, root
        self._consumed = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch, self.sampler.start, self._consumed = epoch, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "position": self.sampler.start + self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch, self.sampler.start, self._consumed = state["epoch"], state["position"], 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for images, labels in self.loader:
                self._consumed += labels.numel()
                yield images, labels
        except DecodeError as err:
            found = re.search(re.escape(_MARK) + r"(.+)\n(.*)", str(err))
            raise decode_error(found and found.group(1), self.root, found.group(2) if found else str(err)) from None


def train_transform(image_size: int, mean: list[float], std: list[float]) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def val_transform(image_size: int, resize: int, mean: list[float], std: list[float]) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(resize, antialias=True),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def build_folder_loaders(data_cfg, all_train: FileList, train_indices: Callable[[int], list[int]],
                         val_files: FileList, batch_size: int, val_batch_size: int, device: torch.device,
                         channels_last: bool, seed: int) -> tuple[FolderLoader, FolderLoader]:
    """Train and val loaders; ``train_indices(epoch)`` indexes ``all_train``, ``val_files`` is this rank's share."""
    mean, std, size = list(data_cfg.mean), list(data_cfg.std), data_cfg.image_size
    resize = data_cfg.val_resize or round(size * 256 / 224)
    common = dict(num_workers=data_cfg.workers, pin_memory=device.type == "cuda",
                  collate_fn=functools.partial(stack, channels_last=channels_last),
                  persistent_workers=data_cfg.workers > 0, worker_init_fn=default_signal_handlers,
                  prefetch_factor=data_cfg.prefetch if data_cfg.workers > 0 else None)
    train_sampler = EpochIndices(train_indices, seed)
    train = DataLoader(ImageFiles(all_train, train_transform(size, mean, std)), sampler=train_sampler,
                       batch_size=batch_size, **common)
    val_sampler = EpochIndices(lambda epoch: list(range(len(val_files))), seed)
    val = DataLoader(ImageFiles(val_files, val_transform(size, resize, mean, std)), sampler=val_sampler,
                     batch_size=val_batch_size, **common)
    root = str(data_cfg.root)
    return FolderLoader(train, train_sampler, root), FolderLoader(val, val_sampler, root)
