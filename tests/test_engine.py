import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.engine import (
    autocast,
    build_scaler,
    build_scheduler,
    compile_model,
    compile_report,
    evaluate,
    lr_factor,
    train_step,
)
from pipeline.models.densenet import densenet_bc
from pipeline.optim import build_optimizer
from pipeline.train import per_rank_batch

CPU = torch.device("cpu")


def schedule(**kw):
    return OmegaConf.create({"name": "step", "milestones": [30, 60], "gamma": 0.1, "warmup_epochs": 0.0, **kw})


def test_learning_rate_scales_linearly_with_the_global_batch():
    optim = OmegaConf.merge(load_config(None).optim, {"lr": 0.1, "momentum": 0.9, "nesterov": True,
                                                      "weight_decay": 1e-4})
    model = nn.Linear(2, 2)
    assert build_optimizer(model, optim, 256).param_groups[0]["lr"] == pytest.approx(0.1)
    assert build_optimizer(model, optim, 1024).param_groups[0]["lr"] == pytest.approx(0.4)
    assert build_optimizer(model, optim, 64).param_groups[0]["nesterov"]


def test_step_schedule_divides_by_ten_at_the_milestones():
    factors = [lr_factor(e * 10, 10, 90, schedule()) for e in (0, 29, 30, 59, 60, 89)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_schedule_after_linear_warmup():
    cfg = schedule(name="cosine", warmup_epochs=2)
    assert lr_factor(0, 10, 10, cfg) == pytest.approx(1 / 20)
    assert lr_factor(19, 10, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(20, 10, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 10, 10, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_scheduler_steps_per_optimizer_step():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, schedule(milestones=[1]), epochs=2, steps_per_epoch=3)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1])


def test_global_batch_that_does_not_divide_over_ranks_is_a_config_error():
    assert per_rank_batch(256, 8) == 32
    with pytest.raises(ConfigError, match="train.batch_size=100.*3 ranks"):
        per_rank_batch(100, 3)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_training_step_runs_and_updates_the_weights(precision):
    torch.manual_seed(0)
    model = densenet_bc(10, 4, num_classes=3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = build_scaler(CPU, precision)
    assert scaler.is_enabled() == (precision == "fp16")
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    loss = train_step(model, images, torch.tensor([0, 1, 2, 0]), nn.CrossEntropyLoss(), optimizer, scaler,
                      precision).loss
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with autocast(CPU, precision):
        out = model(images)
    assert out.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def test_evaluate_counts_every_sample_and_reports_percentages():
    class Fixed(nn.Module):
        def forward(self, x):  # ranks classes by their distance from the first pixel's value
            return -(torch.arange(6.0) - x[:, 0, 0, 0, None]).abs()

    images = torch.zeros(7, 3, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])  # 5 of 7 right; the 6th is ranked last of 6
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    result = evaluate(Fixed(), batches, CPU, "fp32", channels_last=False)
    assert result["count"] == 7
    assert result["top1"] == pytest.approx(100 * 5 / 7)
    assert result["top5"] == pytest.approx(100 * 6 / 7)


def test_compile_report_says_when_graph_breaks_split_the_model():
    from torch._dynamo.utils import counters

    def whole(x):
        return (x * 2).relu()

    def split(x):
        x = x * 2
        torch._dynamo.graph_break()
        return x.relu()

    torch._dynamo.reset()
    counters.clear()
    assert "no graph was captured" in compile_report()
    torch.compile(whole, backend="eager")(torch.ones(3))
    assert compile_report() == "torch.compile: the model runs as 1 graph"
    torch._dynamo.reset()
    counters.clear()
    torch.compile(split, backend="eager")(torch.ones(3))
    assert compile_report().startswith("torch.compile: graph breaks split the model into 2 graphs (")
    torch._dynamo.reset()
    counters.clear()


def test_the_flops_of_a_step_are_three_times_the_forward_of_densenet121():
    from pipeline.engine import step_flops

    # torchvision's DenseNet-121: 2.83 GMAC (5.67 GFLOP) forward per 224 px image; backward is about twice that
    cfg = OmegaConf.create({"name": "densenet121", "num_classes": 1000, "drop_rate": 0.0, "depth": 100,
                            "growth_rate": 12})
    assert step_flops(cfg, 2, 224) / 2 / 1e9 == pytest.approx(3 * 5.67, rel=0.03)


def test_a_compiled_model_compiles_once_per_size_when_sizes_change():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    compiled = compile_model(net, sizes_change=True)
    for size in (16, 24, 32, 32, 32):  # progressive resizing: each size from its first epoch on
        compiled(torch.randn(2, 3, size, size)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()


def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_said_so_and_the_others_match_unfused_sgd():
    """The fused SGD takes the grad scaler's verdict on the device (no host sync): a step with an overflowing
    gradient leaves the weights and momentum as they were and reports itself skipped; the steps after it match
    PyTorch's unfused SGD under the same scaler (the scaler's own host-side skip) up to float rounding."""
    torch.manual_seed(0)
    fused = densenet_bc(10, 4, num_classes=3).to(memory_format=torch.channels_last)
    plain = densenet_bc(10, 4, num_classes=3).to(memory_format=torch.channels_last)
    plain.load_state_dict(fused.state_dict())
    cfg = load_config(None).optim
    optimizers = [build_optimizer(fused, cfg, 256),
                  torch.optim.SGD(plain.parameters(), lr=0.1, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                  weight_decay=cfg.weight_decay)]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    # a scale of 2^21: the first backward overflows fp16; the scaler halves the scale after each skip
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**21, growth_interval=1000) for _ in range(2)]
    images = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in fused.parameters()]
    first = train_step(fused, images, labels, nn.CrossEntropyLoss(), optimizers[0], scalers[0], "fp16")
    assert bool(first.skipped) and not math.isfinite(first.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, fused.parameters(), strict=True))
    assert all(not s["momentum_buffer"].any() for s in optimizers[0].state.values())  # zeros, as primed
    train_step(plain, images, labels, nn.CrossEntropyLoss(), optimizers[1], scalers[1], "fp16")
    skipped = []
    for _ in range(8):  # until the scale fits, then a few steps applied
        step = train_step(fused, images, labels, nn.CrossEntropyLoss(), optimizers[0], scalers[0], "fp16")
        train_step(plain, images, labels, nn.CrossEntropyLoss(), optimizers[1], scalers[1], "fp16")
        skipped.append(bool(step.skipped))
        assert bool(step.skipped) == (not math.isfinite(step.grad_norm))
    assert skipped[-4:] == [False] * 4 and scalers[0].get_scale() == scalers[1].get_scale()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
