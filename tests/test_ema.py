"""The EMA of the weights against torch.optim.swa_utils.AveragedModel, and its decay settings."""

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.config import ConfigError, load_config
from pipeline.ema import WeightsEma, decay_per_step
from pipeline.models import build_model
from pipeline.models.densenet import densenet_bc


def ema_config(**overrides):
    return OmegaConf.merge(load_config(None).train.ema, overrides)


def train_steps(model, steps, after_step):
    """``steps`` SGD steps of ``model`` on random batches (BatchNorm statistics move too)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x, y = torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        after_step(step)


@pytest.mark.parametrize("every,warmup_steps", [(1, 0), (3, 0), (2, 4)],
                         ids=["every-step", "every-3-steps", "warmup-4-steps"])
def test_ema_equals_averaged_model_with_the_same_decay_over_the_same_steps(every, warmup_steps):
    torch.manual_seed(0)
    model = densenet_bc(16, 12, num_classes=10).train()
    steps_per_epoch = 4
    ema = WeightsEma(model, ema_config(decay=0.9, every_steps=every, warmup_epochs=warmup_steps / steps_per_epoch),
                     global_batch=8, steps_per_epoch=steps_per_epoch)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9 ** every), use_buffers=True)

    def after_step(step):
        ema.update(model, step)
        if step % every == 0:
            if step <= warmup_steps:  # torchvision's reference script restarts the average during warm-up
                reference.n_averaged.fill_(0)
            reference.update_parameters(model)

    train_steps(model, 12, after_step)
    ours, theirs = ema.module.state_dict(), reference.module.state_dict()
    assert ema.updates == 12 // every
    for key, value in theirs.items():
        if value.is_floating_point():
            assert torch.allclose(ours[key], value, rtol=0, atol=1e-6), key
        else:  # BatchNorm's count of batches is copied, not averaged
            assert torch.equal(ours[key], model.state_dict()[key]), key
    # not the weights themselves: it averaged
    assert not torch.allclose(ours["classifier.weight"], model.classifier.weight, atol=1e-4)


def test_ema_state_restores_the_same_average():
    torch.manual_seed(0)
    model = densenet_bc(16, 12, num_classes=10).train()
    cfg = ema_config(decay=0.8)
    ema = WeightsEma(model, cfg, global_batch=8, steps_per_epoch=10)
    train_steps(model, 3, lambda step: ema.update(model, step))
    restored = WeightsEma(densenet_bc(16, 12, num_classes=10), cfg, global_batch=8, steps_per_epoch=10)
    restored.load_state_dict(ema.state_dict())
    for s in range(4, 6):  # both continue from the same weights
        ema.update(model, s)
        restored.update(model, s)
    for (key, a), b in zip(ema.module.state_dict().items(), restored.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_a_half_life_in_images_gives_the_decay_that_halves_a_steps_weight_after_that_many_images():
    decay = decay_per_step(ema_config(half_life_images=2560), global_batch=256)
    assert decay ** 10 == pytest.approx(0.5)
    assert decay_per_step(ema_config(decay=0.999), global_batch=256) == 0.999


def test_ema_settings_are_checked():
    with pytest.raises(ConfigError, match="train.ema.decay"):
        load_config(None, ["train.ema.decay=1.0"])
    with pytest.raises(ConfigError, match="train.ema.enabled"):
        load_config(None, ["checkpoint.best=ema"])
    with pytest.raises(ConfigError, match=r"'train.ema.warmup_epochs' \(90.0\) must be less than 'train.epochs'"):
        load_config(None, ["train.ema.enabled=true", "train.ema.warmup_epochs=90"])


def test_the_average_loads_into_torchvisions_densenet121():
    ema = WeightsEma(build_model("densenet121"), ema_config(), global_batch=256, steps_per_epoch=10)
    torchvision.models.densenet121().load_state_dict(ema.state_dict()["module"])
