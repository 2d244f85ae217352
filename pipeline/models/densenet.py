"""DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", 2017).

Module names follow the paper and torchvision's layout, so a torchvision state_dict loads
strictly and ``model_final.pt`` can be handed to ``torchvision.models.densenet121`` as is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

BOTTLENECK_WIDTH = 4  # the bottleneck 1x1 conv produces 4k channels
COMPRESSION = 0.5  # a transition layer keeps half of the channels

# ImageNet models: name -> (growth rate k, layers per block, stem channels)
IMAGENET_CONFIGS: dict[str, tuple[int, tuple[int, ...], int]] = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
    "densenet264": (32, (6, 12, 64, 48), 64),
}
MODEL_NAMES = (*IMAGENET_CONFIGS, "densenet_bc")


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv(1x1, 4k) then BN-ReLU-Conv(3x3, k) over the concatenation of all inputs."""

    def __init__(self, in_channels: int, growth_rate: int, drop_rate: float, memory_efficient: bool):
        super().__init__()
        width = BOTTLENECK_WIDTH * growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth_rate, kernel_size=3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient

    def bottleneck(self, *features: Tensor) -> Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))

    @contextmanager
    def _statistics_kept(self) -> Iterator[None]:
        """norm1 runs as in the forward (the same kernel, the same saved tensors) on copies of its running
        statistics and count, which are dropped: the recomputation in backward must not update them again."""
        norm = self.norm1
        kept = {name: getattr(norm, name) for name in ("running_mean", "running_var", "num_batches_tracked")}
        for name, buffer in kept.items():
            setattr(norm, name, buffer.clone())
        try:
            yield
        finally:
            for name, buffer in kept.items():
                setattr(norm, name, buffer)

    def _recompute_contexts(self):
        return nullcontext(), self._statistics_kept()

    def forward(self, features: list[Tensor]) -> Tensor:
        if self.memory_efficient and torch.is_grad_enabled() and any(f.requires_grad for f in features):
            # Recompute the concatenation and BN-ReLU in backward instead of storing them:
            # memory grows linearly with depth. Non-reentrant so it works under DDP. The tensors go
            # in one by one: the block appends to its list, which the recomputation must not see.
            # Eager, the recomputation would update norm1's running statistics a second time each step; a
            # compiled graph updates them once (its buffers are functionalised) and traces no context_fn.
            contexts = {} if torch.compiler.is_compiling() else {"context_fn": self._recompute_contexts}
            out = checkpoint(self.bottleneck, *features, use_reentrant=False, **contexts)
        else:
            out = self.bottleneck(*features)
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each one reads the block input and every earlier layer's output."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, drop_rate: float,
                 memory_efficient: bool):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(in_channels + i * growth_rate, growth_rate, drop_rate, memory_efficient)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN-ReLU-Conv(1x1) with compression, then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """DenseNet-BC: a stem, dense blocks joined by transitions, BN-ReLU, global pooling, a classifier."""

    def __init__(self, growth_rate: int, block_config: tuple[int, ...], stem_channels: int,
                 num_classes: int = 1000, imagenet_stem: bool = True, drop_rate: float = 0.0,
                 memory_efficient: bool = False):
        super().__init__()
        if imagenet_stem:  # 7x7/2 conv then 3x3/2 max pool: 224 px -> 56 px
            stem = [
                ("conv0", nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(stem_channels)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        else:  # CIFAR-style: one 3x3 conv at full resolution
            stem = [("conv0", nn.Conv2d(3, stem_channels, kernel_size=3, padding=1, bias=False))]
        self.features = nn.Sequential(OrderedDict(stem))

        channels = stem_channels
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, channels, growth_rate, drop_rate, memory_efficient)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_channels = int(channels * COMPRESSION)
                self.features.add_module(f"transition{i + 1}", _Transition(channels, out_channels))
                channels = out_channels
        self.features.add_module(f"norm{len(block_config) + 1}", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation for convolutions, as in the paper
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.features(x), inplace=True)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, **kwargs) -> DenseNet:
    """CIFAR-style DenseNet-BC-L-k: three dense blocks of (L - 4) / 6 bottleneck layers each."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"model.depth={depth} is not a DenseNet-BC depth: it must be 6n + 4 with n >= 1 "
            "(e.g. 40, 100, 190)."
        )
    n = (depth - 4) // 6
    return DenseNet(growth_rate, (n, n, n), 2 * growth_rate, num_classes, imagenet_stem=False, **kwargs)


def build_model(name: str, num_classes: int = 1000, memory_efficient: bool = False,
                drop_rate: float = 0.0, depth: int = 100, growth_rate: int = 12) -> DenseNet:
    """Build a DenseNet-BC by name; ``depth`` and ``growth_rate`` apply to ``densenet_bc`` only."""
    if name == "densenet_bc":
        return densenet_bc(depth, growth_rate, num_classes, drop_rate=drop_rate,
                           memory_efficient=memory_efficient)
    if name not in IMAGENET_CONFIGS:
        raise ValueError(f"model.name={name!r} is not a known model; choose one of {', '.join(MODEL_NAMES)}.")
    k, blocks, stem = IMAGENET_CONFIGS[name]
    return DenseNet(k, blocks, stem, num_classes, drop_rate=drop_rate, memory_efficient=memory_efficient)
