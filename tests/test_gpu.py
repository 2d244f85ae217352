"""Checks that need CUDA; skipped without it (see tests/conftest.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.engine import build_scaler, train_step
from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def test_channels_last_survives_every_block_on_cuda():
    model = build_model("densenet121", num_classes=10).cuda().to(memory_format=torch.channels_last).eval()
    outputs = {}
    for name, module in model.features.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outputs.values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_step_on_cuda(precision):
    model = build_model("densenet121", num_classes=10).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = build_scaler(torch.device("cuda"), precision)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device="cuda")
    for _ in range(3):
        loss = train_step(model, x, y, torch.nn.CrossEntropyLoss(), optimizer, scaler, precision)
    assert torch.isfinite(loss)


def test_memory_efficient_matches_plain_on_cuda():
    torch.manual_seed(0)
    plain = build_model("densenet121", num_classes=10).cuda()
    efficient = build_model("densenet121", num_classes=10, memory_efficient=True).cuda()
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 64, 64, device="cuda")
    a, b = plain(x), efficient(x)
    assert torch.allclose(a, b, atol=1e-4)
    a.sum().backward()
    b.sum().backward()
    assert torch.allclose(plain.classifier.weight.grad, efficient.classifier.weight.grad, atol=1e-3)
    assert torch.allclose(plain.features.conv0.weight.grad, efficient.features.conv0.weight.grad, atol=1e-3,
                          rtol=1e-3)


def test_mini_config_on_the_gpu_with_bf16_and_channels_last(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "pipeline.train", str(ROOT / "configs/mini.yaml"),
                             f"run.dir={run_dir}", "data.backend=synthetic", "train.precision=bf16",
                             "train.channels_last=true", "tracking.backend=none"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cuda" in result.stdout and "cudnn.benchmark" in result.stdout
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] > 0
