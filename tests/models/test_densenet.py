import pytest
import torch
import torchvision

from pipeline.models import build_model
from pipeline.models.densenet import densenet_bc

TORCHVISION_PARAMS = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_count_equals_torchvision(name):
    model = build_model(name)
    assert n_params(model) == TORCHVISION_PARAMS[name]
    assert n_params(getattr(torchvision.models, name)()) == TORCHVISION_PARAMS[name]


def test_densenet264_has_the_papers_block_sizes():
    model = build_model("densenet264")
    blocks = [m for name, m in model.features.named_children() if name.startswith("denseblock")]
    assert [len(b) for b in blocks] == [6, 12, 64, 48]
    assert model.classifier.in_features == 2688


@pytest.mark.parametrize("name", ["densenet121", "densenet161"])
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_logits(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(num_classes=100).eval()
    model = build_model(name, num_classes=100).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5


def test_our_state_dict_loads_into_torchvision():
    model = build_model("densenet121", num_classes=10)
    torchvision.models.densenet121(num_classes=10).load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("depth,growth,params", [(40, 12, 176_122), (100, 12, 769_162)])
def test_cifar_densenet_bc_matches_the_papers_sizes(depth, growth, params):
    # the paper reports 0.8M parameters for DenseNet-BC (L=100, k=12) on CIFAR-10
    model = densenet_bc(depth, growth, num_classes=10)
    assert len(model.features.denseblock1) == (depth - 4) // 6
    assert model.features.conv0.out_channels == 2 * growth
    assert n_params(model) == params


def test_densenet_bc_rejects_a_depth_that_is_not_6n_plus_4():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        densenet_bc(depth=41)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="densenet121"):
        build_model("resnet50")


def test_layers_use_bn_relu_conv_order_with_a_4k_bottleneck():
    layer = build_model("densenet121").features.denseblock2.denselayer3
    assert [name for name, _ in layer.named_children()] == ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]
    assert layer.conv1.out_channels == 4 * 32 and layer.conv2.out_channels == 32
    assert build_model("densenet121").features.transition1.conv.out_channels == (64 + 6 * 32) // 2


def test_convolutions_use_he_initialisation():
    torch.manual_seed(0)
    conv = build_model("densenet121").features.denseblock3.denselayer10.conv1
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)


def test_memory_efficient_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = densenet_bc(40, 12, num_classes=10).train()
    efficient = densenet_bc(40, 12, num_classes=10, memory_efficient=True).train()
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    out_plain, out_efficient = plain(x), efficient(x)
    assert torch.allclose(out_plain, out_efficient, atol=1e-6)
    out_plain.square().sum().backward()
    out_efficient.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), efficient.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def test_memory_efficient_stores_less_for_backward():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    plain = saved_activation_bytes(densenet_bc(40, 12, num_classes=10), x)
    efficient = saved_activation_bytes(densenet_bc(40, 12, num_classes=10, memory_efficient=True), x)
    assert efficient < 0.75 * plain


def test_channels_last_input_stays_channels_last_through_every_block():
    model = build_model("densenet121", num_classes=10).to(memory_format=torch.channels_last).eval()
    formats = {}

    def record(name):
        def hook(module, inputs, output):
            formats[name] = output.is_contiguous(memory_format=torch.channels_last)
        return hook

    for name, module in model.features.named_children():
        module.register_forward_hook(record(name))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
    assert formats and all(formats.values()), formats


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def outputs_and_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The logits, and every parameter's gradient of the cross-entropy loss in one vector (in name order)."""
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    grads = {name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters()}
    return out.detach(), torch.cat([grads[name].flatten().double() for name in sorted(grads)])


@pytest.mark.slow
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_compiled_channels_last_model_matches_the_float64_reference_within_1e_5(memory_efficient):
    # The reference is the eager model in float64, so the test measures each fp32 path's own error.
    torch.manual_seed(0)
    model = densenet_bc(16, 12, num_classes=10, memory_efficient=memory_efficient).train()
    reference = densenet_bc(16, 12, num_classes=10).train().double()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out_ref, grads_ref = outputs_and_gradients(reference, x.double(), y)

    compiled = torch.compile(model.to(memory_format=torch.channels_last))
    out, grads = outputs_and_gradients(compiled, x.contiguous(memory_format=torch.channels_last), y)
    assert relative_error(out, out_ref) < 1e-5
    assert relative_error(grads, grads_ref) < 1e-5

    eager = densenet_bc(16, 12, num_classes=10, memory_efficient=memory_efficient).train()
    eager.load_state_dict(reference.state_dict())  # copied into fp32
    out, grads = outputs_and_gradients(eager, x, y)
    assert relative_error(out, out_ref) < 1e-5 and relative_error(grads, grads_ref) < 1e-5
