"""Checks that need CUDA; skipped without it (see tests/conftest.py)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.engine import build_scaler, train_step
from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


def steps_without_a_host_sync(step, count: int = 20) -> list:
    """``step(k)`` for k = 2 .. count + 1 under ``torch.cuda.set_sync_debug_mode("error")``, after a first step
    (k = 1) that chooses its kernels and allocates: any host sync in them raises."""
    step(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return [step(k) for k in range(2, count + 2)]
    finally:
        torch.cuda.set_sync_debug_mode(0)


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
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = [float(train_step(model, x, y, torch.nn.CrossEntropyLoss(), optimizer, scaler, precision).loss)
              for _ in range(3)]
    assert all(math.isfinite(v) for v in losses), losses
    still = [name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])]
    assert not still, f"{len(still)} parameters did not move in 3 steps, e.g. {still[:3]}"
    if precision == "fp16":  # a scaler that skipped all 3 steps halved its scale 3 times
        assert scaler.get_scale() >= 2.0 ** 14, scaler.get_scale()  # at most 2 of 3 skipped


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
    weights = torch.load(run_dir / "model_final.pt", weights_only=True)  # as the README loads it, no map_location
    assert {t.device.type for t in weights.values()} == {"cpu"}  # loads on a machine without a GPU



def test_mini_config_trains_two_steps_with_the_dali_mixed_decoder(tmp_path):
    """The DALI ``mixed`` (GPU) decoder on a generated mini tree: 2 train steps of the mini config and its
    validation, the images decoded on the GPU. Skipped where DALI is not installed."""
    pytest.importorskip("nvidia.dali")
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "pipeline.train", str(ROOT / "configs/mini.yaml"),
                             f"run.dir={run_dir}", f"data.root={tmp_path / 'mini'}", "data.backend=dali",
                             "data.generate.train_per_class=7", "data.generate.val_per_class=2", "train.epochs=1",
                             "train.log_every_steps=1", "train.precision=bf16", "tracking.backend=none"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cuda" in result.stdout and "DALI could not be imported" not in result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["epochs_completed"] == 1, summary
    assert math.isfinite(summary["val_top1"])

def _sync_bn_rank(rank: int, world: int, port: int, out, backend: str) -> None:
    import os

    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch import nn

    from pipeline.train import build_net

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank if backend == "nccl" else 0)
    torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides
    model_cfg = OmegaConf.create({"name": "densenet_bc", "num_classes": 10, "memory_efficient": False,
                                  "drop_rate": 0.0, "depth": 16, "growth_rate": 12, "sync_bn": True})
    torch.manual_seed(0)
    reference = build_net(model_cfg, device, False, 1)  # one process: plain BatchNorm
    model = build_net(model_cfg, device, False, world)  # the pipeline's own conversion
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    model.load_state_dict(reference.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2)).to(device)
    loss = nn.functional.cross_entropy(ddp(x[rank * 8:(rank + 1) * 8]), y[rank * 8:(rank + 1) * 8])
    loss.backward()  # DDP averages the gradients: the gradient of the mean loss over all 16 images
    losses = [torch.zeros((), device=device) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        full = nn.functional.cross_entropy(reference(x), y)  # one process, the whole batch of 16
        full.backward()
        grads = {n: p.grad for n, p in reference.named_parameters()}
        worst, name = max((((p.grad - grads[n]).abs().max() / grads[n].abs().max().clamp_min(1e-12)).item(), n)
                          for n, p in model.named_parameters())
        stats = max((a - b).abs().max().item() for (k, a), (_, b) in zip(model.state_dict().items(),
                                                                      reference.state_dict().items(), strict=True)
                    if "running" in k)
        out.put((abs((sum(losses) / 2 - full).item()), worst, name, stats))
    dist.destroy_process_group()


def test_sync_batchnorm_at_world_2_matches_one_process_with_the_whole_batch():
    """Per-rank batch 8 at world 2 with SyncBatchNorm (the pipeline's build_net): the loss, every gradient and
    the running statistics of one process with the batch of 16 (fp32, no TF32). One GPU: both ranks share it
    over gloo; two or more: NCCL."""
    from pipeline.distributed import run_local_ranks

    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    [(loss_gap, worst_grad, worst_name, stats_gap)] = run_local_ranks(_sync_bn_rank, 2, backend, timeout_s=300)
    assert loss_gap < 1e-5 and worst_grad < 1e-4 and stats_gap < 1e-5, (loss_gap, worst_grad, worst_name, stats_gap)


def test_mixing_the_ema_and_clipping_add_no_host_sync_to_the_step():
    from pipeline.config import load_config
    from pipeline.ema import WeightsEma
    from pipeline.mix import BatchMixer
    from pipeline.optim import build_optimizer

    cfg = load_config(None, ["train.mix.mixup_alpha=0.2", "train.mix.cutmix_alpha=1.0", "train.mix.mode=elem",
                             "train.ema.enabled=true", "optim.norm_weight_decay=0"])
    model = build_model("densenet_bc", num_classes=10, depth=16, growth_rate=12).cuda()
    model = model.to(memory_format=torch.channels_last)
    optimizer, scaler = build_optimizer(model, cfg.optim, 16), build_scaler(torch.device("cuda"), "bf16")
    mixer, ema = BatchMixer(cfg.train.mix, 0, 0, 16, 1, 10), WeightsEma(model, cfg.train.ema, 16, 10)
    x = torch.randn(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device="cuda")
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(k):
        images, targets = mixer(x, y, 0, k)
        loss = train_step(model, images, targets, criterion, optimizer, scaler, "bf16", clip_grad_norm=1.0).loss
        ema.update(model, k)
        return loss

    losses = steps_without_a_host_sync(step)
    assert all(math.isfinite(float(v)) for v in losses)


@pytest.mark.parametrize("precision,clip", [("fp16", 0.0), ("fp16", 1.0), ("bf16", 0.0)])
def test_training_steps_and_the_step_boundary_make_no_host_sync(precision, clip):
    """20 steps through train_step, the schedule and the step boundary under sync-debug 'error': with fp16 the
    fused SGD takes the grad scaler's verdict on the device, and whether it skipped travels with the loss."""
    from pipeline.boundary import StepBoundary
    from pipeline.config import load_config
    from pipeline.engine import build_scheduler
    from pipeline.optim import build_optimizer

    class Signals:
        received, name = None, ""

    cfg = load_config(None, ["optim.norm_weight_decay=0"])
    model = build_model("densenet_bc", num_classes=10, depth=16, growth_rate=12).cuda()
    model = model.to(memory_format=torch.channels_last)
    optimizer, scaler = build_optimizer(model, cfg.optim, 16), build_scaler(torch.device("cuda"), precision)
    assert optimizer.defaults["fused"]
    scheduler = build_scheduler(optimizer, cfg.schedule, epochs=2, steps_per_epoch=20)
    boundary = StepBoundary(Signals(), torch.device("cuda"), max_skipped=cfg.train.max_skipped_steps)
    x = torch.randn(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device="cuda")
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(k):
        result = train_step(model, x, y, criterion, optimizer, scaler, precision, clip_grad_norm=clip)
        scheduler.step()
        boundary.after_step(k, result.loss, result.skipped)
        return result

    results = steps_without_a_host_sync(step)
    assert all(math.isfinite(float(r.loss)) for r in results)
    assert (results[-1].skipped is None) == (precision == "bf16")
    if precision == "fp16":
        skips = [bool(r.skipped) for r in results]
        assert skips[-5:] == [False] * 5, skips  # the scale settled: the last steps were applied
        assert all(s == (not math.isfinite(float(r.grad_norm))) for s, r in zip(skips, results, strict=True))
    boundary.before_save(21, lambda: True)  # every loss and skip read: none stops the run


def test_a_profile_window_on_cuda_writes_a_memory_snapshot_for_memory_viz(tmp_path):
    import pickle

    from omegaconf import OmegaConf

    from pipeline.profiling import StepProfiler

    model = build_model("densenet_bc", num_classes=10, depth=16, growth_rate=12).cuda()
    optimizer, scaler = torch.optim.SGD(model.parameters(), lr=0.1, fused=True), build_scaler(torch.device("cuda"),
                                                                                              "bf16")
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    profiler = StepProfiler(OmegaConf.create({"start_step": 2, "steps": 2}), tmp_path, 0, torch.device("cuda"))
    for step in range(1, 5):
        profiler.before_step(step)
        train_step(model, x, y, torch.nn.CrossEntropyLoss(), optimizer, scaler, "bf16")
        profiler.after_step(step)
    names = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert names == ["rank-0.memory.pickle", "rank-0.ops.txt", "rank-0.trace.json"]
    snapshot = pickle.loads((tmp_path / "profile/rank-0.memory.pickle").read_bytes())
    assert snapshot["segments"] and any(trace for trace in snapshot["device_traces"])  # what memory_viz draws
    assert "Self CUDA" in (tmp_path / "profile/rank-0.ops.txt").read_text()
    trace = json.loads((tmp_path / "profile/rank-0.trace.json").read_text())
    assert any(event.get("cat") == "kernel" for event in trace["traceEvents"])  # the GPU's own kernels


def test_the_forward_timer_adds_no_host_sync_and_reads_the_forwards_after_the_log_lines_sync():
    from pipeline.stragglers import ForwardTimer

    model = build_model("densenet_bc", num_classes=10, depth=40, growth_rate=12).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler, criterion = build_scaler(torch.device("cuda"), "bf16"), torch.nn.CrossEntropyLoss()
    x, y = torch.randn(64, 3, 32, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    timer = ForwardTimer(model, torch.device("cuda"))
    train_step(model, x, y, criterion, optimizer, scaler, "bf16")  # kernels chosen, memory allocated
    torch.cuda.synchronize()
    timer.take()
    began = torch.cuda.Event(enable_timing=True)
    began.record()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_sum = sum(train_step(model, x, y, criterion, optimizer, scaler, "bf16").loss for _ in range(10))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ended = torch.cuda.Event(enable_timing=True)
    ended.record()
    assert math.isfinite(loss_sum.item())  # the log line's one sync: every event of the window is complete
    forward_ms, window_ms = 1e3 * timer.take(), began.elapsed_time(ended)
    assert 0 < forward_ms < window_ms  # the forwards are a part of the steps (the backward is the larger)
    assert timer.take() == 0.0


def test_the_torchvision_batch_is_normalised_and_erased_on_the_gpu_as_on_the_cpu_without_a_sync():
    from pipeline.data.folder import normalise

    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (4, 24, 24, 3), dtype=torch.uint8, generator=generator).pin_memory()
    boxes = torch.tensor([[0, 0, 0, 0], [2, 3, 5, 7], [0, 0, 24, 24], [10, 1, 3, 20]], dtype=torch.int32)
    mean, std = torch.tensor([123.7, 116.3, 103.5]), torch.tensor([58.4, 57.1, 57.4])
    on_cpu = normalise(raw, boxes, torch.device("cpu"), mean, std, channels_last=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = normalise(raw, boxes, torch.device("cuda"), mean.cuda(), std.cuda(), channels_last=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert on_gpu.is_cuda and on_gpu.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_the_gpu_dali_pipeline_is_built_once_and_gives_the_batches_of_pipelines_built_per_epoch(tmp_path):
    from pipeline.config import load_config
    from pipeline.data.imagenet import verify
    from pipeline.data.loaders import build_loaders
    from pipeline.data.synthetic import write_synthetic_imagenet
    from pipeline.distributed import DistInfo

    root = write_synthetic_imagenet(tmp_path / "tree", 4, 10, 3, 20, 60)
    verify(root, workers=2)
    cfg = load_config(None, [f"data.root={root}", "data.backend=dali", "data.image_size=24", "data.workers=2",
                             "model.num_classes=4", "data.random_erase=0.5"])
    dist = DistInfo(0, 1, 0, torch.device("cuda", 0))
    train, _ = build_loaders(cfg, dist, 4)
    for epoch in range(3):
        train.set_epoch(epoch)
        once = [(x.clone(), y.clone()) for x, y in train]
        fresh, _ = build_loaders(cfg, dist, 4)
        fresh.set_epoch(epoch)
        rebuilt = [(x.clone(), y.clone()) for x, y in fresh]
        fresh.close()
        assert len(once) == len(rebuilt) > 0 and once[0][0].is_cuda
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(once, rebuilt, strict=True))
    assert train.builds == 1
    train.close()


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_the_ten_views_are_cut_on_the_gpu_as_on_the_cpu_and_evaluate_in_bf16(tmp_path, backend):
    if backend == "dali":  # the GPU machine has DALI only when tests/gpu/run.sh installed its wheel parts
        pytest.importorskip("nvidia.dali", reason="no DALI on this GPU machine: DALI=1 tests/gpu/wheels.sh")
    from pipeline.config import load_config
    from pipeline.data.imagenet import verify
    from pipeline.data.loaders import build_loaders
    from pipeline.data.synthetic import write_synthetic_imagenet
    from pipeline.data.views import Views
    from pipeline.distributed import DistInfo
    from pipeline.evaluate import evaluate_views

    root = write_synthetic_imagenet(tmp_path / "tree", 4, 1, 5, 20, 60)
    verify(root, workers=2)
    cfg = load_config(None, [f"data.root={root}", f"data.backend={backend}", "data.image_size=24",
                             "data.workers=2", "model.num_classes=4"])
    views = Views(resize=34, size=24, crops=10)
    batches = {}
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        _, val = build_loaders(cfg, DistInfo(0, 1, 0, device), 4, train=False, views=views)
        batches[device.type] = [(x.cpu(), y.cpu(), x.is_cuda) for x, y in val]
        if device.type == "cuda":
            model = build_model("densenet_bc", num_classes=4, depth=10, growth_rate=4).cuda()
            result = evaluate_views(model.to(memory_format=torch.channels_last), val, views, device, "bf16", True)
            assert result["count"] == 20 and math.isfinite(result["loss"])
    for (a, y, _), (b, z, on_gpu) in zip(batches["cpu"], batches["cuda"], strict=True):
        assert on_gpu and a.shape == b.shape == (10 * len(y), 3, 24, 24) and torch.equal(y, z)
        if backend == "torchvision":  # the same bytes, cut and normalised on either device
            assert torch.equal(a, b)
        else:  # nvJPEG and DALI's GPU resize against its CPU decoder and resize: the same windows, nearly the pixels
            assert (a - b).abs().mean().item() < 0.05
