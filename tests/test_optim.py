"""Weight decay by parameter kind, gradient clipping, LARS, and the optimizer's state across a change of groups."""

import copy
import logging

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pipeline.config import flatten, load_config
from pipeline.distributed import DistInfo
from pipeline.engine import build_scaler, build_scheduler, train_step
from pipeline.models.densenet import densenet_bc
from pipeline.optim import Lars, build_optimizer, load_optimizer_state, parameter_groups, regroup_state
from pipeline.train import apply_changed_settings, check_batch_settings


def optim(*words):
    return load_config(None, list(words)).optim


def model():
    torch.manual_seed(0)
    return densenet_bc(16, 12, num_classes=10)


def step(net, optimizer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()


def test_default_settings_keep_one_group_with_every_parameter():
    net = model()
    [group] = build_optimizer(net, optim(), 256).param_groups
    assert group["weight_decay"] == 1e-4 and len(group["params"]) == len(list(net.parameters()))


def test_norm_and_bias_parameters_get_their_own_weight_decay_as_torchvisions_set_weight_decay():
    net = model()
    norms = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    # a bias is a bias first (torchvision checks its custom key "bias" before the normalisation classes)
    groups = parameter_groups(net, optim("optim.norm_weight_decay=0", "optim.bias_weight_decay=0.5"))
    (other, other_decay, _), (norm, norm_decay, _), (bias, bias_decay, _) = groups
    assert set(norm) == {f"{m}.weight" for m in norms} and norm_decay == 0
    assert set(bias) == {f"{m}.bias" for m in norms} | {"classifier.bias"} and bias_decay == 0.5
    assert all(n.endswith("conv1.weight") or n.endswith("conv2.weight") or n.endswith(".conv.weight")
               or n in ("features.conv0.weight", "classifier.weight") for n in other) and other_decay == 1e-4
    _, (norm, _, _) = parameter_groups(net, optim("optim.norm_weight_decay=0"))
    assert set(norm) == {f"{m}.{p}" for m in norms for p in ("weight", "bias")}
    # a parameter whose gradient is zero decays only if its group has weight decay
    optimizer = build_optimizer(net, optim("optim.norm_weight_decay=0", "optim.momentum=0", "optim.nesterov=false"),
                                256)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = dict(net.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in norm)
    assert torch.allclose(after["classifier.weight"], before["classifier.weight"] * (1 - 0.1 * 1e-4))


def test_a_resume_with_other_groups_keeps_each_parameters_momentum():
    net = model()
    saved_cfg, new_cfg = optim(), optim("optim.norm_weight_decay=0")
    optimizer = build_optimizer(net, saved_cfg, 256)
    step(net, optimizer)
    momentum = {n: optimizer.state[p]["momentum_buffer"] for n, p in net.named_parameters()}
    regrouped = build_optimizer(net, new_cfg, 256)
    regrouped.load_state_dict(regroup_state(optimizer.state_dict(), net, saved_cfg, new_cfg))
    assert [g["weight_decay"] for g in regrouped.param_groups] == [1e-4, 0.0]
    for name, p in net.named_parameters():
        assert torch.equal(regrouped.state[p]["momentum_buffer"], momentum[name]), name
    assert regroup_state(optimizer.state_dict(), net, saved_cfg, saved_cfg) == optimizer.state_dict()


def test_a_checkpoint_of_the_unfused_sgd_resumes_on_the_fused_one_in_another_memory_layout():
    """A checkpoint of an earlier version (unfused SGD, its groups say so) of a run without channels-last, resumed
    with channels-last: the fused kernel stays, each momentum follows its parameter's layout, the step matches."""
    saved_net, net = model(), model().to(memory_format=torch.channels_last)
    old = torch.optim.SGD(saved_net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    step(saved_net, old)
    optimizer = build_optimizer(net, optim(), 256)
    net.load_state_dict(saved_net.state_dict())
    load_optimizer_state(optimizer, copy.deepcopy(old.state_dict()))  # a copy, as from a file
    assert optimizer.param_groups[0]["fused"] and old.state_dict()["param_groups"][0]["fused"] is None
    assert all(optimizer.state[p]["momentum_buffer"].stride() == p.stride() for p in net.parameters())
    step(saved_net, old, seed=1)
    step(net, optimizer, seed=1)
    for a, b in zip(net.parameters(), saved_net.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clipping_bounds_the_true_gradients_norm(precision):
    net = model()
    optimizer = build_optimizer(net, optim(), 256)
    scaler = build_scaler(torch.device("cpu"), precision)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    train_step(net, x, y, nn.CrossEntropyLoss(), optimizer, scaler, "fp32", clip_grad_norm=0.05)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in net.parameters()]))
    assert norm == pytest.approx(0.05, rel=1e-4)  # unclipped it is far above (about 1): clipped, and unscaled


def test_lars_scales_each_adapted_update_by_its_trust_ratio():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    cfg = optim("optim.name=lars", "optim.norm_weight_decay=0", "optim.bias_weight_decay=0", "optim.weight_decay=0.01")
    optimizer = build_optimizer(net, cfg, 256)
    assert isinstance(optimizer, Lars)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x = torch.randn(8, 6)
    net(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    optimizer.step()
    lr, momentum, eta, decay = 0.1, 0.9, 0.001, 0.01
    w, g = before["0.weight"], grads["0.weight"]
    ratio = eta * w.norm() / (g.norm() + decay * w.norm())
    update = (g + decay * w) * ratio  # the first step's momentum buffer; Nesterov adds momentum x it
    assert torch.allclose(net[0].weight, w - lr * (1 + momentum) * update, rtol=0, atol=1e-7)
    for name in ("0.bias", "1.weight", "1.bias"):  # no weight decay: not adapted, plain SGD
        assert torch.allclose(dict(net.named_parameters())[name], before[name] - lr * (1 + momentum) * grads[name],
                              rtol=0, atol=1e-7), name
    assert all(torch.equal(p.grad, grads[n]) for n, p in net.named_parameters())  # the gradients as they were


def test_a_global_batch_above_8192_without_lars_is_warned_about(caplog):
    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        check_batch_settings(load_config(None), cpu, 16384, 64, 5.0)
        check_batch_settings(load_config(None, ["optim.name=lars", "optim.norm_weight_decay=0",
                                                "optim.bias_weight_decay=0"]), cpu, 16384, 64, 5.0)
        check_batch_settings(load_config(None), cpu, 8192, 64, 5.0)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("A global batch of 16384 with optim.name=sgd") \
        and "optim.name=lars" in said[0]


def test_lars_with_decayed_norms_and_biases_is_warned_about(caplog):
    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        check_batch_settings(load_config(None, ["optim.name=lars"]), cpu, 16384, 64, 5.0)
    [said] = [r.getMessage() for r in caplog.records]
    assert said.startswith("optim.name=lars with optim.norm_weight_decay=None") and "=0 optim.bias" in said


def test_a_checkpoint_from_before_the_groups_resumes_with_new_groups_and_one_learning_rate():
    """Its config lacks optim.norm_weight_decay: it ran with the default (one group)."""
    net = model()
    old = optim()
    optimizer = build_optimizer(net, old, 256)
    scheduler = build_scheduler(optimizer, OmegaConf.merge(load_config(None).schedule, {"warmup_epochs": 1.0}), 90,
                                10)
    step(net, optimizer)
    scheduler.step()
    saved = OmegaConf.to_container(load_config(None))
    for key in ("norm_weight_decay", "bias_weight_decay", "name"):
        del saved["optim"][key]
    cfg = load_config(None, ["optim.norm_weight_decay=0"])
    resumed = build_optimizer(net, cfg.optim, 256)
    resumed.load_state_dict(regroup_state(optimizer.state_dict(), net, OmegaConf.create(saved).optim, cfg.optim))
    schedule = build_scheduler(resumed, OmegaConf.merge(cfg.schedule, {"warmup_epochs": 1.0}), 90, 10)
    schedule.load_state_dict(scheduler.state_dict())
    assert apply_changed_settings(flatten(saved), cfg, net, resumed, schedule, 256) == \
        "optim.norm_weight_decay None -> 0.0"
    schedule.step()
    assert len({g["lr"] for g in resumed.param_groups}) == 1 and resumed.param_groups[0]["lr"] == pytest.approx(0.03)
    assert [g["weight_decay"] for g in resumed.param_groups] == [1e-4, 0.0]
