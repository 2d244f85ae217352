"""The optimizer: SGD or LARS, weight decay by parameter kind, and its state across a change of groups.

Parameters fall into three kinds, as torchvision's reference scripts split them: those of normalisation layers
(``optim.norm_weight_decay``), other biases (``optim.bias_weight_decay``) and the rest (``optim.weight_decay``).
Each kind with its own decay is a parameter group of its own; the kinds that share ``optim.weight_decay`` stay in
the first group, so the default settings build the one group of earlier versions.

LARS (You et al., "Large Batch Training of Convolutional Networks", 2017) scales each parameter's update by a
trust ratio ``eta * ||w|| / (||g|| + weight_decay * ||w||)``, then runs SGD with momentum; groups without weight
decay (biases and normalisation layers, with ``optim.norm_weight_decay=0``) are not adapted, as timm's ``Lars``
does. Plain SGD with the linear scaling rule loses accuracy above a global batch of 8192 (Goyal et al. 2017
reached 8k); LARS trained 32k (You et al.).
"""

from __future__ import annotations

import torch
from torch import nn

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)
LARS_ABOVE = 8192  # global batch above which plain SGD with linear scaling is known to lose accuracy


def parameter_groups(model: nn.Module, optim_cfg) -> list[tuple[list[str], float]]:
    """(parameter names, weight decay) of each group, in the optimizer's order."""
    kinds: dict[str, list[str]] = {"other": [], "norm": [], "bias": []}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(prefix=module_name, recurse=False):
            kind = "norm" if isinstance(module, NORM_LAYERS) else "bias" if name.endswith("bias") else "other"
            kinds[kind].append(name)
    decays = {"other": optim_cfg.weight_decay, "norm": optim_cfg.get("norm_weight_decay"),
              "bias": optim_cfg.get("bias_weight_decay")}
    groups = [(list(kinds["other"]), optim_cfg.weight_decay)]
    for kind in ("norm", "bias"):
        if decays[kind] is None:
            groups[0][0].extend(kinds[kind])
        elif kinds[kind]:
            groups.append((kinds[kind], decays[kind]))
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return [(sorted(names, key=order.__getitem__), decay) for names, decay in groups if names]


class Lars(torch.optim.SGD):
    """SGD whose update of each adapted parameter is scaled by LARS's trust ratio (``trust_coefficient``)."""

    def __init__(self, params, trust_coefficient: float = 0.001, **sgd):
        super().__init__(params, **sgd)
        self.trust_coefficient = trust_coefficient

    @torch.no_grad()
    def step(self, closure=None):
        decays = []
        for group in self.param_groups:
            decay = group["weight_decay"]
            decays.append(decay)
            if decay == 0:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                ratio = self.trust_coefficient * w_norm / (g_norm + decay * w_norm)
                ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
                p.grad.add_(p, alpha=decay).mul_(ratio)
            group["weight_decay"] = 0.0  # applied above, inside the trust ratio
        try:
            return super().step(closure)
        finally:
            for group, decay in zip(self.param_groups, decays, strict=True):
                group["weight_decay"] = decay


def build_optimizer(model: nn.Module, optim_cfg, global_batch: int) -> torch.optim.SGD:
    """SGD (or LARS) with the learning rate scaled linearly from 256 images to the global batch."""
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in names], "weight_decay": decay}
              for names, decay in parameter_groups(model, optim_cfg)]
    sgd = dict(lr=optim_cfg.lr * global_batch / 256, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)
    if optim_cfg.get("name", "sgd") == "lars":
        return Lars(groups, trust_coefficient=optim_cfg.lars_trust_coefficient, **sgd)
    return torch.optim.SGD(groups, **sgd)


def regroup_state(state: dict, model: nn.Module, saved_cfg, optim_cfg) -> dict:
    """An optimizer state saved with ``saved_cfg``'s groups, laid out for ``optim_cfg``'s (each parameter's
    momentum follows its name); unchanged when the groups are the same."""
    saved, current = parameter_groups(model, saved_cfg), parameter_groups(model, optim_cfg)
    if [names for names, _ in saved] == [names for names, _ in current]:
        return state
    index = {name: i for i, name in enumerate(n for names, _ in saved for n in names)}
    order = [n for names, _ in current for n in names]
    template = state["param_groups"][0]
    groups, start = [], 0
    for names, decay in current:
        groups.append({**template, "weight_decay": decay, "params": list(range(start, start + len(names)))})
        start += len(names)
    per_param = {i: state["state"][index[n]] for i, n in enumerate(order) if index[n] in state["state"]}
    return {"state": per_param, "param_groups": groups}
