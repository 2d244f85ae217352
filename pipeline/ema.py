"""An exponential moving average (EMA) of the weights: evaluated each epoch, saved in every checkpoint and as
``model_ema.pt``.

Every floating parameter and buffer is averaged, BatchNorm's running statistics included, as torchvision's
``AveragedModel(use_buffers=True)`` (its reference recipe's EMA) and timm's ``ModelEmaV3`` do: the averaged
weights are then evaluated with statistics of the same averaged history, without a pass over the data to
recompute them. Integer buffers (BatchNorm's count of batches) are copied. The first update copies the weights,
as ``AveragedModel`` does, and so does every update before ``train.ema.warmup_epochs`` (torchvision restarts its
EMA during the learning rate's warm-up). The average lives in fp32 on the training device; an update is a few
fused kernels with no host sync. Under DDP every rank holds the same averaged parameters; the averaged buffers
are rank 0's (each rank's BatchNorm saw its own share of the batch), as the model's own are: rank 0's are
broadcast before evaluating.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def decay_per_step(ema_cfg, global_batch: int) -> float:
    """``train.ema.decay``, or the decay per optimizer step that halves a step's weight after
    ``train.ema.half_life_images`` images."""
    if ema_cfg.half_life_images:
        return 0.5 ** (global_batch / ema_cfg.half_life_images)
    return float(ema_cfg.decay)


class WeightsEma:
    """The averaged copy of ``model`` (``module``, a plain model for evaluation and saving) and its update."""

    def __init__(self, model: nn.Module, ema_cfg, global_batch: int, steps_per_epoch: int):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.every = ema_cfg.every_steps
        self.decay = decay_per_step(ema_cfg, global_batch) ** self.every  # per update
        self.warmup_steps = round(ema_cfg.warmup_epochs * steps_per_epoch)
        self.updates = 0
        self._pairs = None

    def _tensors(self, model: nn.Module) -> tuple[list, list, list, list]:
        """(averaged, source) floating tensors, then (averaged, source) integer ones, in the module's order; listed
        once (the training model is always the same)."""
        if self._pairs is None:
            ours = [*self.module.parameters(), *self.module.buffers()]
            theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
            floats = [i for i, t in enumerate(ours) if t.is_floating_point()]
            ints = [i for i, t in enumerate(ours) if not t.is_floating_point()]
            self._pairs = ([ours[i] for i in floats], [theirs[i] for i in floats],
                           [ours[i] for i in ints], [theirs[i] for i in ints])
        return self._pairs

    def update(self, model: nn.Module, global_step: int) -> None:
        """After optimizer step ``global_step`` (counted from 1): average ``model``'s weights in, every
        ``train.ema.every_steps`` steps; copy them on the first update and during the warm-up."""
        if global_step % self.every:
            return
        averaged, current, averaged_ints, current_ints = self._tensors(model)
        with torch.no_grad():
            if self.updates == 0 or global_step <= self.warmup_steps:
                torch._foreach_copy_(averaged, current)
            else:  # the fused lerp torch.optim.swa_utils.get_ema_multi_avg_fn uses
                torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
            if averaged_ints:
                torch._foreach_copy_(averaged_ints, current_ints)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
