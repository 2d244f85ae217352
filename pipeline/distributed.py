"""The process group, built from the standard variables that torchrun (or the SLURM launcher) sets."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (defaults: one process), pick the device, join the group."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        global _control
        # small decisions (stop, checkpoint now) travel on CPU tensors over gloo: no GPU sync per step
        _control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return DistInfo(rank, world_size, local_rank, device)


_control = None


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag is true on every rank if it is true on any: one small all-reduce, so ranks never disagree."""
    if not dist.is_initialized():
        return flags
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_control)
    return tuple(bool(v) for v in tensor.tolist())


def gather_to_main(obj: object) -> list | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order); None on the other ranks."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=_control)
    return out


def broadcast_from_main(obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating or saving."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def parameters_digest(module: nn.Module) -> str:
    """A hash of the exact bytes of every parameter."""
    digest = hashlib.sha256()
    for p in module.parameters():
        digest.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replicas_identical(module: nn.Module) -> bool:
    """Whether every rank holds bitwise the same parameters (DDP keeps them so; a mismatch is a bug)."""
    if not dist.is_initialized():
        return True
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, parameters_digest(module), group=_control)
    return len(set(digests)) == 1


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
