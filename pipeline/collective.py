"""The protocol between ranks: every collective of the control plane, the decisions all ranks make together.

Every function here but :func:`use_control_group`, :func:`control_group`, :func:`on_every_rank` and
:func:`parameters_digest` is a collective: each rank of the job must call it, at the same point of the run.
The call sites say so (``collective.first_problem(...)``). Anything else that ranks send to each other is the
training step's own (DDP's gradient all-reduce), the step boundary's (:mod:`pipeline.boundary`), and the
barrier with which the ranks leave the group together (``pipeline.distributed.shutdown``).

The rules that keep a job from stranding its ranks:

1. **The same calls in the same order on every rank.** Branch on the rank around the work, never around the
   call: rank 0 computes a verdict, and every rank calls :func:`main_decides` with it (None on the others). A
   collective that one rank skips leaves the others waiting in it.
2. **Errors are agreed before any barrier.** A rank whose part fails (rank 0 cannot write the checkpoint, one
   rank cannot read the dataset) does not raise alone: its problem travels in the next collective
   (:func:`main_decides`, :func:`first_problem_stops_all`, :func:`decide_on_main`), and every rank raises the
   same error at the same point, marked :func:`on_every_rank` so that ``shutdown`` waits for all of them before
   leaving the group. An error that a rank raises alone (a crash) ends the job through its launcher: torchrun
   stops the node's other ranks, ``srun --kill-on-bad-exit`` the whole step; a rank that hangs is ended by its
   own hang watch and by the watches of the ranks waiting for it (:mod:`pipeline.hang`).
3. **Timeouts.** Every collective waits at most ``run.dist_timeout_s`` (default 1800 s: the rendezvous, and
   rank 0 indexing a tree that has no index, happen before the first step). From the first step on, a rank that
   finishes no step for ``run.hang_timeout_s`` (default 600 s) ends itself, well before that.
4. **Small decisions travel on the control group**: gloo on CPU tensors (the world group itself on CPU ranks),
   so they never wait for a GPU stream. Nothing else is sent on it while the step boundary's reduction is in
   flight (:mod:`pipeline.boundary` reads it first).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

_control = None


def use_control_group(group) -> None:
    """The group the functions here send on (set when the process group is made; None once it is left)."""
    global _control
    _control = group


def control_group():
    """The group for small decisions: gloo on CPU tensors (the world group itself when it is gloo)."""
    return _control


def on_every_rank(err: Exception) -> Exception:
    """Marks ``err`` as raised by every rank at the same point (after agreeing on it): ``shutdown`` then waits
    for every rank before it leaves the group."""
    err.on_every_rank = True
    return err


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


def first_problem(problem: str | None) -> str | None:
    """The first rank's ``problem`` (in rank order) on every rank, or None if no rank has one: so every rank
    stops, or none does, and no rank is left waiting in a collective that the others have left."""
    found = gather_to_main(problem)
    return broadcast_from_main(next((p for p in found if p), None) if found is not None else None)


def first_problem_stops_all(problem: str | None, error: type[Exception]) -> None:
    """Every rank raises ``error`` with the first rank's ``problem``, or none does."""
    verdict = first_problem(problem)
    if verdict:
        raise on_every_rank(error(verdict))


def main_decides(problem: str | None, error: type[Exception]) -> None:
    """Every rank raises ``error`` with rank 0's ``problem`` (what the other ranks pass is ignored), or none does.
    No other rank goes on before rank 0 has got here (rank 0 itself does not wait for them)."""
    verdict = broadcast_from_main(problem)
    if verdict:
        raise on_every_rank(error(verdict))


def decide_on_main(make: Callable[[], object], error: type[Exception], is_main: bool):
    """``make()`` on rank 0 alone, its result on every rank; if it fails, every rank raises ``error`` with its
    message. A rank alone (no process group: as tests build them) makes its own."""
    result: tuple = (None, None)
    if is_main or not dist.is_initialized():
        try:
            result = (make(), None)
        except Exception as err:  # any error: the other ranks are waiting for this broadcast
            result = (None, str(err) if isinstance(err, error) else f"{type(err).__name__}: {err}")
    value, problem = broadcast_from_main(result)
    if problem:
        raise on_every_rank(error(problem))
    return value


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op in one process), on the world group: a device tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluating or saving."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_weights(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (on the world group: NCCL for CUDA tensors)."""
    if dist.is_initialized():
        with torch.no_grad():
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.is_contiguous():
                    dist.broadcast(tensor, src=0)
                else:  # channels-last weights: sent in the default layout, kept in theirs
                    sent = tensor.contiguous()
                    dist.broadcast(sent, src=0)
                    tensor.copy_(sent)


def parameters_digest(module: nn.Module) -> str:
    """A hash of the exact bytes of every parameter (computed by each rank alone)."""
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
