"""Starting from existing weights (model.init_from), freezing modules (train.freeze) and the backbone's learning
rate (optim.backbone_lr_scale)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from pipeline.config import ConfigError, flatten, load_config
from pipeline.engine import build_scaler, build_scheduler, train_one_epoch
from pipeline.finetune import InitError, InitWeights, freeze, load_init, match_state, read_init, read_state_dict
from pipeline.models import build_model
from pipeline.optim import build_optimizer, parameter_groups, regroup_state
from pipeline.train import apply_changed_settings

ROOT = Path(__file__).resolve().parents[1]
MINI = str(ROOT / "configs/mini.yaml")


def train(*words, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.train", MINI, "tracking.backend=none", *words], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def mini(num_classes=10, seed=0):
    torch.manual_seed(seed)
    return build_model("densenet_bc", num_classes, depth=16, growth_rate=12)


def model_cfg(*words):
    return load_config(MINI, list(words)).model


def torchvision_state(name):
    """torchvision's ``name`` state_dict, each tensor filled with its own number (no slow initialisation)."""
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    state = model.to_empty(device="cpu").state_dict()
    for i, tensor in enumerate(state.values()):
        tensor.fill_(i)
    return state


def start_from(path, cfg):
    """The model of ``cfg``, started from the file at ``path`` as a run's rank 0 starts it."""
    model = build_model(cfg.name, cfg.num_classes, depth=cfg.depth, growth_rate=cfg.growth_rate)
    state, note = match_state(read_state_dict(path), cfg, path)
    load_init(model, InitWeights(str(path), "0" * 64, False, state, note), is_main=True)
    return model, note


def test_a_timm_densenet121_loads_into_ours_with_the_same_logits(tmp_path):
    import timm  # the dev extra installs it: a missing one is a failure, not a skip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    theirs = timm.create_model("densenet121", pretrained=False).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so that they matter
        for module in theirs.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 1.5)
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "model.safetensors")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = theirs(images)
        for name in ("timm.pth", "model.safetensors"):  # timm's hub files are safetensors
            ours, note = start_from(tmp_path / name, model_cfg("model.name=densenet121", "model.num_classes=1000"))
            assert note == ""
            torch.testing.assert_close(ours.eval()(images), expected, atol=1e-5, rtol=0)


def test_old_torchvision_keys_and_wrapped_checkpoints_are_read_in_torchvisions_layout(tmp_path):
    state = torchvision_state("densenet121")
    # the layout of torchvision's first files, from before PyTorch counted BatchNorm steps (num_batches_tracked)
    old = {k.replace("norm1.", "norm.1.").replace("conv1.", "conv.1.").replace("norm2.", "norm.2.")
           .replace("conv2.", "conv.2."): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "densenet121-old.pth")
    read = read_state_dict(tmp_path / "densenet121-old.pth")
    assert read.keys() == {k for k in state if not k.endswith("num_batches_tracked")}
    model, _ = start_from(tmp_path / "densenet121-old.pth", model_cfg("model.name=densenet121",
                                                                      "model.num_classes=1000"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in read.items())
    # a checkpoint of torchvision's reference scripts, saved from the DDP wrapper
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "checkpoint.pth")
    assert read_state_dict(tmp_path / "checkpoint.pth").keys() == state.keys()


def test_a_file_of_another_architecture_is_refused_naming_the_model_and_what_would_fit(tmp_path):
    torch.save(mini().state_dict(), tmp_path / "mini.pt")
    with pytest.raises(InitError) as refused:
        match_state(read_state_dict(tmp_path / "mini.pt"), model_cfg("model.name=densenet121"), tmp_path / "mini.pt")
    message = str(refused.value)
    assert f"model.init_from='{tmp_path / 'mini.pt'}' does not fit model.name=densenet121" in message
    assert "It fits model.name=densenet_bc model.depth=16 model.growth_rate=12" in message
    assert "missing keys" in message and "unexpected keys" in message
    torch.save(torchvision_state("densenet169"), tmp_path / "densenet169.pth")
    with pytest.raises(InitError, match="It fits model.name=densenet169: set that"):
        match_state(read_state_dict(tmp_path / "densenet169.pth"), model_cfg("model.name=densenet121"), "f")


def test_a_bad_init_from_is_refused_at_start_before_any_data_or_run_dir(tmp_path):
    torch.save(torchvision_state("densenet121"), tmp_path / "densenet121.pth")
    result = train(f"run.dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                   f"model.init_from={tmp_path / 'densenet121.pth'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "does not fit model.name=densenet_bc model.depth=16 model.growth_rate=12" in result.stderr
    assert "It fits model.name=densenet121" in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing written, nothing generated
    with pytest.raises(ConfigError, match=f"model.init_from='{tmp_path / 'missing.pth'}' does not exist"):
        read_init(load_config(MINI, [f"model.init_from={tmp_path / 'missing.pth'}", f"run.dir={tmp_path / 'run'}"]),
                  is_main=True)
    (tmp_path / "empty.pth").touch()  # a download cut short
    with pytest.raises(ConfigError, match=f"model.init_from='{tmp_path / 'empty.pth'}' is empty"):
        read_init(load_config(MINI, [f"model.init_from={tmp_path / 'empty.pth'}", f"run.dir={tmp_path / 'run'}"]),
                  is_main=True)


def test_a_resume_is_not_stopped_by_an_init_from_file_it_no_longer_needs(tmp_path):
    """A requeued job resumes from its checkpoint: a weights file since removed or made unreadable is noted, not
    refused (root reads any file, so unreadable is shown with a folder in place of the file)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000005.pt").write_bytes(b"a checkpoint")
    (tmp_path / "unreadable.pth").mkdir()  # open() raises IsADirectoryError, an OSError, as EACCES or EIO would
    for name in ("gone.pth", "unreadable.pth"):
        found = read_init(load_config(MINI, [f"model.init_from={tmp_path / name}", f"run.dir={run_dir}"]),
                          is_main=True)
        assert found.resuming and found.sha256 is None, name


def train_three_steps(model, optimizer, seed=0):
    scheduler = build_scheduler(optimizer, load_config(MINI).schedule, 1, 3)
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator))
               for _ in range(3)]
    train_cfg = OmegaConf.create({"channels_last": False, "precision": "fp32", "log_every_steps": 100})
    cpu = torch.device("cpu")
    train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer, scheduler, build_scaler(cpu, "fp32"),
                    train_cfg, cpu, 0, 1, lambda record: None, lambda step, loss, skipped: False)


@pytest.mark.slow  # two ranks under torchrun: 30 s on 2 busy cores
def test_two_ranks_refuse_a_file_of_another_architecture_together_and_leave_nothing(tmp_path):
    torch.save(torchvision_state("densenet121"), tmp_path / "densenet121.pth")
    result = subprocess.run([sys.executable, "-m", "launch.local", MINI, "--nproc-per-node", "2",
                             "tracking.backend=none", f"run.dir={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
                             f"model.init_from={tmp_path / 'densenet121.pth'}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("does not fit model.name=densenet_bc") == 2  # each rank, the same words
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_freezing_keeps_the_frozen_weights_and_batchnorm_statistics_bitwise(memory_efficient):
    torch.manual_seed(0)
    model = build_model("densenet_bc", 10, memory_efficient, depth=16, growth_rate=12)
    line = freeze(model, ["features.conv0", "features.denseblock1"])
    assert "features.conv0, features.denseblock1 frozen" in line and "trainable parameters" in line
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("features.conv0.",
                                                                                    "features.denseblock1."))}
    others = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("features.transition1.")}
    optimizer = build_optimizer(model, load_config(MINI).optim, 8, ["features.conv0", "features.denseblock1"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())
    train_three_steps(model, optimizer)
    after = model.state_dict()
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key
    assert not model.features.denseblock1.training and model.features.denseblock2.training
    changed = [k for k, v in others.items() if not torch.equal(after[k], v)]  # the rest trains, statistics too
    assert "features.transition1.norm.running_mean" in changed and "features.transition1.conv.weight" in changed


@pytest.mark.slow  # torch.compile on a CPU: a minute
def test_a_compiled_model_keeps_its_frozen_part_and_statistics():
    from pipeline.engine import compile_model

    model = mini()
    freeze(model, ["features.conv0", "features.denseblock1"])
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("features.conv0.",
                                                                                    "features.denseblock1."))}
    before = model.features.transition1.norm.running_mean.clone()
    optimizer = build_optimizer(model, load_config(MINI).optim, 8, ["features.conv0", "features.denseblock1"])
    train_three_steps(compile_model(model, sizes_change=False), optimizer)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert not torch.equal(model.features.transition1.norm.running_mean, before)


def _start_rank(rank: int, world: int, port: int, out, path: str, run_dir: str, device: str) -> None:
    """One rank of a job that starts from ``path`` (rank 0 reads it) with its own random weights first."""
    import os

    import torch.distributed as dist

    from pipeline.finetune import train_mode
    from pipeline.train import build_net, wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(MINI, [f"model.init_from={path}", f"run.dir={run_dir}", "model.num_classes=5",
                             f"model.sync_bn={device != 'cpu'}", "train.freeze=[features.conv0,features.denseblock1]"])
    torch.manual_seed(rank)  # the ranks' own weights differ until rank 0's arrive
    model = build_net(cfg.model, torch.device(device), True, world)
    load_init(model, read_init(cfg, rank == 0), rank == 0)
    # before DDP, which sends rank 0's parameters anyway, and its buffers only on some versions (broadcast_buffers)
    digest = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in model.state_dict().values())).hexdigest()
    freeze(model, cfg.train.freeze)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("features.denseblock1.")}
    net = train_mode(wrap_ddp(model, torch.device(device)))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(rank))
    x = x.to(device, memory_format=torch.channels_last)
    torch.nn.functional.cross_entropy(net(x), torch.arange(4).to(device) % 5).backward()
    kept = all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    layout = model.features.conv0.weight.is_contiguous(memory_format=torch.channels_last)
    sync = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    out.put((rank, digest, kept, layout, sync, model.features.transition1.norm.training))
    dist.destroy_process_group()


def two_ranks_start_from_rank_0s_file(tmp_path, device):
    from pipeline.distributed import run_local_ranks

    state = mini().state_dict()
    for key, value in state.items():  # BatchNorm statistics unlike a new model's, so that they must travel too
        if key.endswith(("running_mean", "running_var")):
            value.uniform_(0.5, 1.5)
    torch.save(state, tmp_path / "mini.pt")
    found = sorted(run_local_ranks(_start_rank, 2, str(tmp_path / "mini.pt"), str(tmp_path / "run"), device,
                                   timeout_s=300))
    assert found[0][1] == found[1][1]  # the same weights and statistics on both ranks
    assert all(kept and layout and training for _, _, kept, layout, _, training in found)
    return found


@pytest.mark.slow  # two processes: 20 s on 2 busy cores
def test_every_rank_starts_from_rank_0s_weights_in_channels_last_and_keeps_the_frozen_part(tmp_path):
    two_ranks_start_from_rank_0s_file(tmp_path, "cpu")


@pytest.mark.gpu
def test_with_sync_batchnorm_on_cuda_every_rank_starts_from_rank_0s_weights_and_frozen_statistics_stay(tmp_path):
    """Both ranks share one GPU over gloo, with SyncBatchNorm: the frozen ones normalise with their running
    statistics (eval mode: no exchange), the others over both ranks' batches."""
    found = two_ranks_start_from_rank_0s_file(tmp_path, "cuda:0")
    assert all(sync for *_, sync, _ in found)


def test_an_unknown_freeze_prefix_is_refused_naming_the_nearest_modules():
    with pytest.raises(ConfigError, match=r"'features.denseblok1' is not a module of model.name=densenet_bc .*"
                                          r"nearest: features.denseblock1"):
        load_config(MINI, ["train.freeze=[features.denseblok1]"])
    with pytest.raises(ConfigError, match="freezes every parameter"):
        load_config(MINI, ["train.freeze=[features,classifier]"])


def test_the_backbone_learning_rate_scale_is_in_the_optimizers_groups_and_follows_the_schedule():
    model = mini()
    cfg = load_config(MINI, ["optim.backbone_lr_scale=0.1", "optim.norm_weight_decay=0"])
    optimizer = build_optimizer(model, cfg.optim, 256)
    head, *backbone = optimizer.param_groups
    assert head["params"] == [model.classifier.weight, model.classifier.bias] and head["lr"] == pytest.approx(0.8)
    assert [g["lr"] for g in backbone] == pytest.approx([0.08, 0.08])  # the other parameters, the norms
    assert {id(p) for g in backbone for p in g["params"]} == {id(p) for n, p in model.named_parameters()
                                                              if not n.startswith("classifier.")}
    scheduler = build_scheduler(optimizer, OmegaConf.merge(cfg.schedule, {"warmup_epochs": 0}), 2, 10)
    for _ in range(5):
        optimizer.step(), scheduler.step()
    assert backbone[0]["lr"] == pytest.approx(0.1 * head["lr"]) and head["lr"] < 0.8


def test_a_resume_with_another_scale_or_freeze_applies_them_and_keeps_each_parameters_momentum():
    model = mini()
    saved = load_config(MINI, ["train.freeze=[features.conv0]"])
    optimizer = build_optimizer(model, saved.optim, 32, saved.train.freeze)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    momentum = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()
                if p in optimizer.state}
    cfg = load_config(MINI, ["optim.backbone_lr_scale=0.5"])
    resumed = build_optimizer(model, cfg.optim, 32)
    resumed.load_state_dict(regroup_state(optimizer.state_dict(), model, saved.optim, cfg.optim,
                                          saved.train.freeze, cfg.train.freeze))
    scheduler = build_scheduler(resumed, cfg.schedule, cfg.train.epochs, 10)
    changed = apply_changed_settings(flatten(OmegaConf.to_container(saved)), cfg, model, resumed, scheduler, 32)
    assert "optim.backbone_lr_scale 1.0 -> 0.5" in changed and "train.freeze" in changed
    assert [g.lr_scale for g in parameter_groups(model, cfg.optim)] == [1.0, 0.5]
    assert [g["initial_lr"] for g in resumed.param_groups] == pytest.approx([0.1, 0.05])
    for name, p in model.named_parameters():
        if name in momentum:
            assert torch.equal(resumed.state[p]["momentum_buffer"], momentum[name]), name
    assert "features.conv0.weight" not in momentum  # frozen before: it starts without momentum


@pytest.mark.slow  # two short training runs, about a minute on 2 cores
def test_fine_tuning_the_mini_models_weights_onto_five_classes(tmp_path):
    from pipeline.data.synthetic import write_synthetic_imagenet

    first = tmp_path / "first"
    result = train(f"run.dir={first}", "data.backend=synthetic", "data.synthetic_steps=2", "train.batch_size=8",
                   "train.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = first / "model_final.pt"
    root = write_synthetic_imagenet(tmp_path / "five", 5, 4, 2, 16, 24)
    second = tmp_path / "second"
    words = [f"run.dir={second}", f"data.root={root}", "model.num_classes=5", f"model.init_from={weights}",
             "train.freeze=[features.conv0,features.denseblock1]", "optim.backbone_lr_scale=0.1",
             "train.batch_size=8", "train.epochs=1", "data.backend=torchvision", "train.ema.enabled=true"]
    result = train(*words, "tracking.backend=mlflow", cwd=tmp_path)  # a SQLite store beside the run dirs
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the classifier is replaced: the file's has 10 outputs, model.num_classes=5" in result.stdout
    assert "features.conv0, features.denseblock1 frozen" in result.stdout
    start, tuned = torch.load(weights, weights_only=True), torch.load(second / "model_final.pt", weights_only=True)
    assert tuned["classifier.weight"].shape == (5, start["classifier.weight"].shape[1])
    for key in start:
        if key.startswith(("features.conv0.", "features.denseblock1.")):
            assert torch.equal(tuned[key], start[key]), key
    assert not torch.equal(tuned["features.norm4.weight"], start["features.norm4.weight"])  # trained from the file
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    checkpoint = torch.load(next((second / "checkpoints").glob("step-*.pt")), weights_only=True)
    assert checkpoint["init_from"] == {"path": str(weights), "sha256": sha}
    assert json.loads((second / "summary.json").read_text())["epochs_completed"] == 1
    from mlflow import MlflowClient

    run_id = json.loads((second / "mlflow_run.json").read_text())["run_id"]
    params = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.params
    assert params["model.init_from_sha256"] == sha and params["model.init_from"] == str(weights)

    # a resume takes the checkpoint's weights; a changed file is named
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in start.items()}, weights)
    result = train(*words[:-3], "train.epochs=2", "data.backend=torchvision", "train.ema.enabled=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model.init_from={weights} changed since the run started" in result.stdout and sha[:16] in result.stdout
    resumed = torch.load(second / "model_final.pt", weights_only=True)
    assert torch.equal(resumed["features.conv0.weight"], start["features.conv0.weight"])  # still frozen, not the file
    checkpoint = torch.load(next(iter(sorted((second / "checkpoints").glob("step-*.pt"))[-1:])), weights_only=True)
    assert checkpoint["init_from"]["sha256"] == sha
