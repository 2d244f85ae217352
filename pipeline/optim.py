"""The optimizer: SGD or LARS, weight decay by parameter kind, and its state across a change of groups.

Parameters fall into groups as torchvision's reference scripts split them (``set_weight_decay``): with
``optim.bias_weight_decay`` set, every bias (normalisation layers' too) is in a group of its own; with
``optim.norm_weight_decay`` set, the other parameters of normalisation layers are; the rest are in the first
group, with ``optim.weight_decay``. The defaults (both null) build the one group of earlier versions. With
``optim.backbone_lr_scale`` other than 1, the classifier's parameters form groups of their own (first: the logged
learning rate is the classifier's), and every other group's learning rate is scaled by it. Parameters that
``train.freeze`` holds still are in no group.

LARS (You et al., "Large Batch Training of Convolutional Networks", 2017) scales each parameter's update by a
trust ratio ``eta * ||w|| / (||g|| + weight_decay * ||w||)``, then runs SGD with momentum; groups without weight
decay (biases and normalisation layers, with ``optim.norm_weight_decay=0``) are not adapted, as timm's ``Lars``
does. Plain SGD with the linear scaling rule loses accuracy above a global batch of 8192 (Goyal et al. 2017
reached 8k); LARS trained 32k (You et al.).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from pipeline.finetune import CLASSIFIER, under

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)
LARS_ABOVE = 8192  # global batch above which plain SGD with linear scaling is known to lose accuracy
FUSED_DEVICES = ("cuda", "cpu")  # where torch.optim.SGD(fused=True) has a kernel (CUDA since torch 2.2, CPU 2.4)


class Group(NamedTuple):
    """One group of the optimizer: its parameters' names, weight decay, and learning rate as a multiple of the
    schedule's."""

    names: list[str]
    weight_decay: float
    lr_scale: float = 1.0


def parameter_groups(model: nn.Module, optim_cfg, freeze=()) -> list[Group]:
    """The groups in the optimizer's order, without the parameters under the module names ``freeze``.
    ``optim_cfg`` may be a config of a checkpoint from before some keys (then they have their defaults)."""
    norm_decay, bias_decay = (getattr(optim_cfg, key, None) for key in ("norm_weight_decay", "bias_weight_decay"))
    scale = getattr(optim_cfg, "backbone_lr_scale", None) or 1.0
    parts = ("head", "backbone") if scale != 1 else ("backbone",)
    groups: dict[tuple[str, str], list[str]] = {(part, kind): [] for part in parts
                                                for kind in ("other", "norm", "bias")}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(prefix=module_name, recurse=False):
            if under(name, freeze):
                continue
            part = "head" if scale != 1 and under(name, (CLASSIFIER,)) else "backbone"
            if bias_decay is not None and name.rsplit(".", 1)[-1] == "bias":
                groups[part, "bias"].append(name)
            elif norm_decay is not None and isinstance(module, NORM_LAYERS):
                groups[part, "norm"].append(name)
            else:
                groups[part, "other"].append(name)
    decays = {"other": optim_cfg.weight_decay, "norm": norm_decay, "bias": bias_decay}
    scales = {"head": 1.0, "backbone": scale}
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return [Group(sorted(names, key=order.__getitem__), decays[kind], scales[part])
            for (part, kind), names in groups.items() if names]


class Lars(torch.optim.SGD):
    """SGD (momentum, Nesterov; its state and state_dict) whose update of each parameter in a group with weight
    decay is scaled by LARS's trust ratio (``trust_coefficient``). The gradients are left as they are."""

    def __init__(self, params, trust_coefficient: float = 0.001, **sgd):
        super().__init__(params, **sgd)
        self.trust_coefficient = trust_coefficient

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            decay, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad.add(p, alpha=decay)
                if decay:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    ratio = self.trust_coefficient * w_norm / (g_norm + decay * w_norm)
                    update.mul_(torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio)))
                if momentum:
                    state = self.state[p]
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = update.clone()
                    else:
                        buffer.mul_(momentum).add_(update)
                    update = update.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                p.add_(update, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, optim_cfg, global_batch: int, freeze=()) -> torch.optim.SGD:
    """SGD (or LARS) with the learning rate scaled linearly from 256 images to the global batch (times each
    group's ``lr_scale``), for every parameter not under the module names ``freeze``.

    SGD is PyTorch's fused kernel on CUDA and CPU (torch >= 2.4 has both): one kernel for all parameters, and
    the fp16 grad scaler hands it its verdict on the device, so a step is skipped without a host sync. LARS
    steps parameter by parameter; under fp16 the scaler reads its verdict on the host first (a sync per step).
    """
    params = dict(model.named_parameters())
    base = optim_cfg.lr * global_batch / 256
    groups = [{"params": [params[n] for n in group.names], "weight_decay": group.weight_decay,
               "lr": base * group.lr_scale} for group in parameter_groups(model, optim_cfg, freeze)]
    sgd = dict(lr=base, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)
    if optim_cfg.name == "lars":
        return Lars(groups, trust_coefficient=optim_cfg.lars_trust_coefficient, **sgd)
    device = next(iter(params.values())).device.type
    if device not in FUSED_DEVICES:
        return torch.optim.SGD(groups, **sgd)
    return prime_momentum(torch.optim.SGD(groups, **sgd, fused=True))


def prime_momentum(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Give every parameter without one a momentum buffer of zeros (where there is momentum): the same first step
    (``0 * momentum + g`` is ``g``), and a first step the fp16 scaler skips keeps them zero. Unprimed, fused SGD
    makes its buffers with ``torch.empty_like`` before its kernel sees the skip, and the next step adds whatever
    that memory held."""
    for group in optimizer.param_groups:
        if group["momentum"]:
            for p in group["params"]:
                if "momentum_buffer" not in optimizer.state[p]:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load ``state`` into ``optimizer``, keeping the kernel this build chose (a saved group's ``fused`` and
    ``foreach`` would replace it) and each momentum buffer in its parameter's memory layout (the fused kernel
    needs them alike; a checkpoint of another train.channels_last has the other)."""
    kernels = [{key: group[key] for key in ("fused", "foreach") if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, chosen in zip(optimizer.param_groups, kernels, strict=True):
        group.update(chosen)
    for p, p_state in optimizer.state.items():
        buffer = p_state.get("momentum_buffer")
        if buffer is not None and buffer.stride() != p.stride():
            p_state["momentum_buffer"] = torch.empty_like(p).copy_(buffer)
    if any(group.get("fused") for group in optimizer.param_groups):
        prime_momentum(optimizer)  # a checkpoint saved before any step was applied has no buffers


def regroup_state(state: dict, model: nn.Module, saved_cfg, optim_cfg, saved_freeze=(), freeze=()) -> dict:
    """An optimizer state saved with ``saved_cfg``'s groups (and ``saved_freeze``), laid out for ``optim_cfg``'s
    (and ``freeze``): each parameter's momentum follows its name; one that was frozen starts without. Unchanged
    when the groups are the same."""
    saved = parameter_groups(model, saved_cfg, saved_freeze)
    current = parameter_groups(model, optim_cfg, freeze)
    if [g.names for g in saved] == [g.names for g in current]:
        return state
    index = {name: i for i, name in enumerate(n for group in saved for n in group.names)}
    order = [n for group in current for n in group.names]
    template = state["param_groups"][0]  # the first saved group's settings, its learning rate unscaled
    groups, start = [], 0
    for group in current:
        rates = {key: template[key] / saved[0].lr_scale * group.lr_scale for key in ("lr", "initial_lr")
                 if key in template}
        groups.append({**template, **rates, "weight_decay": group.weight_decay,
                       "params": list(range(start, start + len(group.names)))})
        start += len(group.names)
    per_param = {i: state["state"][index[n]] for i, n in enumerate(order) if n in index and index[n] in state["state"]}
    return {"state": per_param, "param_groups": groups}
