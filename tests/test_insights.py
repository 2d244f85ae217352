"""Feature-reuse heatmaps and gradient flow: the numbers, the pictures, and bad weights."""

import csv
import json

import pytest
import torch
from torch import nn

from pipeline.insights import GradientFlow, InsightsError, TrainingInsights, feature_reuse, main
from pipeline.models import build_model


def direct_cell(conv_weight: torch.Tensor, first: int, count: int) -> float:
    return conv_weight[:, first:first + count].abs().mean().item()


def test_densenet121_first_block_cells_equal_a_direct_computation_from_the_weights():
    state = build_model("densenet121", 1000).state_dict()
    block = feature_reuse(state)[0]
    assert block.sources == ["input"] + [f"layer {j}" for j in range(1, 7)]
    assert block.targets == [f"layer {j}" for j in range(1, 7)] + ["transition"]
    k, c0 = 32, 64
    for layer in range(1, 7):
        w = state[f"features.denseblock1.denselayer{layer}.conv1.weight"]
        assert w.shape[1] == c0 + (layer - 1) * k
        expected = [direct_cell(w, 0, c0)] + [direct_cell(w, c0 + (s - 1) * k, k) for s in range(1, layer)]
        assert block.weights[layer - 1, :layer] == pytest.approx(expected, rel=1e-6)
        assert all(v != v for v in block.weights[layer - 1, layer:])  # NaN: a layer cannot read later layers
    w = state["features.transition1.conv.weight"]
    expected = [direct_cell(w, 0, c0)] + [direct_cell(w, c0 + (s - 1) * k, k) for s in range(1, 7)]
    assert block.weights[6] == pytest.approx(expected, rel=1e-6)
    assert block.normalized[:, 0].max() <= 1 and (block.normalized[~(block.weights != block.weights)] <= 1).all()


def test_a_source_whose_outgoing_weights_are_zero_shows_a_zero_column():
    state = build_model("densenet121", 1000).state_dict()
    k, c0, source = 32, 64, 3  # the output of layer 3 of block 1
    channels = slice(c0 + (source - 1) * k, c0 + source * k)
    for layer in range(source + 1, 7):
        state[f"features.denseblock1.denselayer{layer}.conv1.weight"][:, channels] = 0
    state["features.transition1.conv.weight"][:, channels] = 0
    block = feature_reuse(state)[0]
    assert (block.weights[source:, source] == 0).all()  # layers 4-6 and the transition
    others = [s for s in range(7) if s != source]
    assert (block.weights[6, others] > 0).all()


def test_the_last_block_is_read_by_the_classifier():
    blocks = feature_reuse(build_model("densenet_bc", 10, depth=16, growth_rate=12).state_dict())
    assert [b.targets[-1] for b in blocks] == ["transition", "transition", "classifier"]


def test_gradient_flow_is_one_norm_per_paper_unit_in_depth_order():
    model = build_model("densenet_bc", 10, depth=16, growth_rate=12)
    flow = GradientFlow(model)
    assert flow.sample() is None  # before any backward
    nn.CrossEntropyLoss()(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    norms = flow.sample()
    assert list(norms) == ["stem", "block1.layer01", "block1.layer02", "block1.transition", "block2.layer01",
                           "block2.layer02", "block2.transition", "block3.layer01", "block3.layer02", "classifier"]
    layer = model.features.denseblock2.denselayer1
    expected = torch.cat([layer.conv1.weight.grad.flatten(), layer.conv2.weight.grad.flatten()]).norm().item()
    assert norms["block2.layer01"] == pytest.approx(expected, rel=1e-5)


@pytest.fixture
def run_dir(tmp_path):
    """A run dir as training leaves it: model_final.pt and gradient samples in metrics.jsonl."""
    model = build_model("densenet_bc", 10, depth=16, growth_rate=12)
    torch.save(model.state_dict(), tmp_path / "model_final.pt")
    units = list(GradientFlow(model).units)
    events = [{"event": "grad", "norms": {u: 0.1 * (i + 1) * step for i, u in enumerate(units)}, "global_step": step}
              for step in (5, 10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return tmp_path


def test_the_command_writes_the_heatmaps_the_csv_and_the_gradient_flow(run_dir, capsys):
    assert main([str(run_dir / "model_final.pt")]) == 0
    out = run_dir / "insights"
    for name in ("feature_reuse.png", "feature_reuse.csv", "gradient_flow.png"):
        assert (out / name).stat().st_size > 500, name
    rows = list(csv.DictReader(open(out / "feature_reuse.csv")))
    # 3 blocks of 2 layers: 1 + 2 cells for the layers, 3 for the reader after the block
    assert len(rows) == 3 * (1 + 2 + 3)
    assert {r["target"] for r in rows} == {"layer 1", "layer 2", "transition", "classifier"}
    assert max(float(r["normalized"]) for r in rows) == 1.0


def test_weights_of_another_model_than_the_config_says_are_refused(tmp_path, capsys):
    torch.save(build_model("densenet121", 1000).state_dict(), tmp_path / "model_final.pt")
    assert main([str(tmp_path / "model_final.pt"), "configs/densenet169.yaml"]) == 2
    err = capsys.readouterr().err
    assert "is not a model.name=densenet169" in err and "Pass the config the weights were trained with" in err
    assert not (tmp_path / "insights").exists()


def test_a_state_dict_that_is_not_a_densenet_is_refused(tmp_path, capsys):
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet.pt")
    assert main([str(tmp_path / "resnet.pt")]) == 2
    assert "no DenseNet layers" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_weights_saved_from_a_ddp_or_compiled_model_are_read_the_same():
    state = build_model("densenet_bc", 10, depth=16, growth_rate=12).state_dict()
    plain = feature_reuse(state)
    for prefix in ("module.", "_orig_mod."):
        wrapped = feature_reuse({prefix + k: v for k, v in state.items()})
        assert all((a.weights[a.weights == a.weights] == b.weights[b.weights == b.weights]).all()
                   for a, b in zip(plain, wrapped, strict=True))


def test_a_densenet_without_its_classifier_is_named_not_a_traceback():
    state = build_model("densenet_bc", 10, depth=16, growth_rate=12).state_dict()
    del state["classifier.weight"]
    with pytest.raises(InsightsError, match="no 'classifier.weight'"):
        feature_reuse(state)


def test_a_resumed_epoch_keeps_the_gradient_samples_taken_before_the_interruption(run_dir):
    model = build_model("densenet_bc", 10, depth=16, growth_rate=12)
    insights = TrainingInsights(model, 5, run_dir, metrics=None, tracker=None, epoch_start=5)
    assert [step for step, _ in insights.samples] == [10]  # step 5 belongs to the epoch before


def test_insights_that_cannot_write_turn_themselves_off_and_training_goes_on(tmp_path, caplog):
    (tmp_path / "insights").write_text("a file where the folder should be")
    model = build_model("densenet_bc", 10, depth=16, growth_rate=12)
    insights = TrainingInsights(model, 1, tmp_path, metrics=None, tracker=None, epoch_start=0)
    nn.CrossEntropyLoss()(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    insights.on_step(1)
    insights.on_epoch_end(0, 1)  # cannot create insights/: reported, not raised
    assert insights.off and "Insights are off for the rest of this run" in caplog.text
    insights.on_step(2)
    assert len(insights.samples) == 0
