import copy

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


def batchnorm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var",
                                                                          "num_batches_tracked"))}


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_memory_efficient_updates_batchnorm_statistics_once_per_step_as_the_plain_model(compile):
    """The recomputation in backward runs norm1 again: it must not update its running statistics again."""
    torch.manual_seed(0)
    plain = densenet_bc(16, 12, num_classes=10).train()
    efficient = densenet_bc(16, 12, num_classes=10, memory_efficient=True).train()
    efficient.load_state_dict(plain.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for model in (plain, torch.compile(efficient) if compile else efficient):
        for _ in range(2):
            torch.nn.functional.cross_entropy(model(x), y).backward()
    expected, found = batchnorm_state(plain), batchnorm_state(efficient)
    assert {k: int(v) for k, v in found.items() if k.endswith("num_batches_tracked")} == \
        {k: 2 for k in expected if k.endswith("num_batches_tracked")}
    for key, value in expected.items():
        assert torch.allclose(found[key].float(), value.float(), rtol=1e-6, atol=1e-6), key


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


# ---------------------------------------------------------------- every fast path against the float64 reference
#
# The reference is the plain eager model in float64 on the CPU. Each fast path (channels-last, torch.compile,
# memory-efficient layers, CUDA) must compute the same function, which float64 shows to ~1e-15, and lose no
# more than fp32 rounding in fp32: 1e-5 relative on the logits and on all parameter gradients together, and
# 5e-5 relative on each parameter's own gradient (a BatchNorm bias's gradient is a sum over every pixel of a
# batch whose terms largely cancel: its fp32 rounding reaches 1e-5 relative on the CPU, the worst measured).
#
# One fp32 subtlety: a ReLU input within rounding of 0 can land on the other side of 0 than in float64, and
# then one more or one fewer gradient element passes, which moves the gradients by ~1e-3 relative in any
# layout or precision (8 images of 32 px give 2.2M ReLU inputs; in float64 such flips do not happen). The fp32
# checks therefore record the fp32 run's ReLU decisions (eager or compiled: Dynamo traces the recording hooks)
# and make the reference take the same ones; no more than 1 in 100,000 inputs may need moving, so that a fast
# path that computes another function near 0 cannot hide behind the moves.

FP32_TOLERANCE, FP32_PER_PARAMETER, MAX_MOVED_FRACTION = 1e-5, 5e-5, 1e-5


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.cpu().double() - reference).norm() / reference.norm()).item()


def outputs_and_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits, and each parameter's gradient of the cross-entropy loss, by name (float64, on the CPU)."""
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    return out.detach(), {name.removeprefix("_orig_mod."): p.grad.detach().cpu().double()
                          for name, p in model.named_parameters()}


def all_gradients(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[name].flatten() for name in sorted(grads)])


def assert_close(out, grads, out_ref, grads_ref, tolerance: float, per_parameter: float) -> None:
    """The logits and all gradients within ``tolerance`` relative, and each parameter's gradient within
    ``per_parameter`` relative (the worst one named)."""
    assert grads.keys() == grads_ref.keys()
    assert relative_error(out, out_ref) < tolerance
    assert relative_error(all_gradients(grads), all_gradients(grads_ref)) < tolerance
    worst = max(grads, key=lambda name: relative_error(grads[name], grads_ref[name]))
    error = relative_error(grads[worst], grads_ref[worst])
    assert error < per_parameter, f"the gradient of {worst} is {error:.2e} relative from the reference's"


def model_reference_and_batch(memory_efficient: bool, seed: int = 0, images: int = 8):
    torch.manual_seed(seed)
    model = densenet_bc(16, 12, num_classes=10, memory_efficient=memory_efficient).train()
    reference = densenet_bc(16, 12, num_classes=10).train().double()
    reference.load_state_dict(model.state_dict())
    return model, reference, torch.randn(images, 3, 32, 32), torch.randint(0, 10, (images,))


def run_path(model: torch.nn.Module, device: str, memory_format: torch.memory_format, compile: bool,
             x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = model.to(device, memory_format=memory_format)
    net = torch.compile(model) if compile else model
    return outputs_and_gradients(net, x.to(device, model.classifier.weight.dtype).contiguous(
        memory_format=memory_format), y.to(device))


def record_relu_decisions(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fill a dict, as ``model`` runs, with which inputs of each ReLU are positive (the first call of each:
    memory-efficient layers run theirs again in backward); ``features`` is the input of the final ReLU."""
    decisions: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:  # a hook that returns nothing changes nothing
        if name not in decisions:
            decisions[name] = (x > 0).cpu()

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ReLU):
            module.register_forward_pre_hook(lambda module, inputs, name=name: record(name, inputs[0]))
    model.features.register_forward_hook(lambda module, inputs, out: record("features", out))
    return decisions


def take_relu_decisions(reference: torch.nn.Module, decisions: dict[str, torch.Tensor]) -> list[int]:
    """Move each reference ReLU input that lies on the other side of 0 than ``decisions`` says just across it.

    A moved input becomes the smallest normal number of its sign and keeps its gradient (as through the
    identity), so the reference's ReLU passes or stops it as the fp32 run did. Returns a list that counts the
    moved inputs as the reference runs."""
    moved = [0]

    def follow(x: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        wrong = positive != (x > 0)
        moved[0] += int(wrong.sum())
        across = (2 * positive.to(x.dtype) - 1) * torch.finfo(x.dtype).tiny  # +-2.2e-308 in float64
        return torch.where(wrong, x - x.detach() + across, x)  # exactly ``across``, with x's gradient

    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.ReLU):
            module.register_forward_pre_hook(lambda module, inputs, name=name: (follow(inputs[0], decisions[name]),))
    reference.features.register_forward_hook(lambda module, inputs, out: follow(out, decisions["features"]))
    return moved


def assert_same_function_in_float64(device: str, memory_format: torch.memory_format, compile: bool,
                                    memory_efficient: bool) -> None:
    model, reference, x, y = model_reference_and_batch(memory_efficient)
    out_ref, grads_ref = outputs_and_gradients(reference, x.double(), y)
    out, grads = run_path(model.double(), device, memory_format, compile, x, y)
    assert_close(out, grads, out_ref, grads_ref, 1e-12, 1e-10)


def assert_fp32_within_1e_5(device: str, memory_format: torch.memory_format, memory_efficient: bool,
                            compile: bool = False) -> None:
    model, reference, x, y = model_reference_and_batch(memory_efficient)
    decisions = record_relu_decisions(model)
    out, grads = run_path(model, device, memory_format, compile, x, y)
    moved = take_relu_decisions(reference, decisions)
    out_ref, grads_ref = outputs_and_gradients(reference, x.double(), y)
    inputs = sum(d.numel() for d in decisions.values())
    print(f"{moved[0]} of {inputs} ReLU inputs moved to the fp32 run's side of 0")
    assert len(decisions) == sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) + 1  # every ReLU seen
    assert moved[0] <= MAX_MOVED_FRACTION * inputs, f"{moved[0]} of {inputs} ReLU inputs on the other side of 0"
    assert_close(out, grads, out_ref, grads_ref, FP32_TOLERANCE, FP32_PER_PARAMETER)


LAYOUTS = pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format],
                                  ids=["channels-last", "nchw"])
MEMORY_EFFICIENT = pytest.mark.parametrize("memory_efficient", [False, True], ids=["stored", "memory-efficient"])


@LAYOUTS
@MEMORY_EFFICIENT
def test_eager_fp32_matches_the_float64_reference_within_1e_5(memory_format, memory_efficient):
    assert_fp32_within_1e_5("cpu", memory_format, memory_efficient)


def test_relu_decisions_explain_the_fp32_gradient_error_they_cause():
    # find a batch in which some fp32 ReLU inputs round across 0 (about every other batch of 16 images) ...
    for seed in range(20):
        model, following, x, y = model_reference_and_batch(False, seed, images=16)
        decisions = record_relu_decisions(model)
        _, grads = outputs_and_gradients(model, x, y)
        plain = copy.deepcopy(following)
        moved = take_relu_decisions(following, decisions)
        _, grads_following = outputs_and_gradients(following, x.double(), y)
        if moved[0]:
            break
    assert moved[0], "no fp32 ReLU input rounded across 0 in 20 batches"
    inputs = sum(d.numel() for d in decisions.values())
    assert moved[0] <= MAX_MOVED_FRACTION * inputs  # a handful: rounding, not another function
    # ... there the plain reference's gradients differ by more than the fp32 tolerance ...
    _, grads_plain = outputs_and_gradients(plain, x.double(), y)
    assert relative_error(all_gradients(grads), all_gradients(grads_plain)) > FP32_TOLERANCE
    # ... and the reference that takes the fp32 run's decisions agrees within it
    assert relative_error(all_gradients(grads), all_gradients(grads_following)) < FP32_TOLERANCE


@pytest.mark.slow
@MEMORY_EFFICIENT
@pytest.mark.parametrize(("memory_format", "compile"), [(torch.channels_last, False), (torch.channels_last, True),
                                                        (torch.contiguous_format, True)],
                         ids=["eager-channels-last", "compiled-channels-last", "compiled-nchw"])
def test_fast_paths_compute_the_references_function_in_float64(memory_format, compile, memory_efficient):
    assert_same_function_in_float64("cpu", memory_format, compile, memory_efficient)


@pytest.mark.slow
@MEMORY_EFFICIENT
def test_compiled_fp32_channels_last_matches_the_float64_reference_within_1e_5(memory_efficient):
    assert_fp32_within_1e_5("cpu", torch.channels_last, memory_efficient, compile=True)


@pytest.fixture
def ieee_fp32():
    """True fp32 convolutions and matrix products: by default PyTorch lets cuDNN use TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@MEMORY_EFFICIENT
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_fp32_channels_last_on_cuda_matches_the_float64_reference_within_1e_5(memory_efficient, compile, ieee_fp32):
    assert_fp32_within_1e_5("cuda", torch.channels_last, memory_efficient, compile)


@pytest.mark.gpu
@MEMORY_EFFICIENT
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_channels_last_on_cuda_computes_the_references_function_in_float64(compile, memory_efficient):
    assert_same_function_in_float64("cuda", torch.channels_last, compile, memory_efficient)
