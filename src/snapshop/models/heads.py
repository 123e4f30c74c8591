"""Embedding networks: backbone -> global pool -> [LayerNorm -> Linear] -> L2 normalise.

The global pool is the average (``avg``, the default) or generalised mean (``gem``,
Radenović et al., TPAMI 2019): ``(mean x^p)^(1/p)`` per channel with ``p = GEM_P``, which
weighs the strongest activations more; ``p = 1`` is the average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from snapshop.errors import ConfigError
from snapshop.models.efficientnet_lite import EfficientNetLite, create_backbone

POOLINGS = ("avg", "gem")
GEM_P = 3.0  # the usual fixed exponent; the backbone's features are ReLU6 outputs (>= 0)
GEM_EPS = 1e-6  # keeps x^(1/p) differentiable where a whole channel is 0


def global_pool(features: torch.Tensor, pooling: str = "avg") -> torch.Tensor:
    """(N, C, H, W) feature maps -> (N, C) pooled features."""
    if pooling == "avg":
        return features.mean(dim=(2, 3))
    if pooling == "gem":
        return features.clamp(min=GEM_EPS).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
    raise ConfigError(f"pooling must be one of {POOLINGS}, not {pooling!r}")


class EmbeddingHead(nn.Module):
    """LayerNorm without affine parameters, then a bias-free Linear to ``dim`` (NormSoftmax)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.proj = nn.Linear(in_dim, dim, bias=False)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(pooled))


class EmbeddingNet(nn.Module):
    """Image batch (N, 3, S, S), normalised as (x - 127) / 128 -> (N, D) L2-normalised embeddings.

    Without a head, D is the backbone's 1280 pooled features (off-the-shelf ImageNet retrieval).
    """

    def __init__(
        self, backbone: EfficientNetLite, head: EmbeddingHead | None = None, pooling: str = "avg"
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.backbone = backbone
        self.head = head
        self.pooling = pooling

    @property
    def dim(self) -> int:
        return (
            self.head.proj.out_features if self.head is not None else self.backbone.spec.feature_dim
        )

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return global_pool(features, self.pooling)

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        out = self.head(pooled) if self.head is not None else pooled
        return F.normalize(out, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_pooled(self.pool(self.backbone.forward_features(x)))


def create_embedding_net(
    backbone: str = "efficientnet_lite2",
    dim: int | None = None,
    pretrained: bool = True,
    pooling: str = "avg",
) -> EmbeddingNet:
    trunk = create_backbone(backbone, pretrained=pretrained)
    head = EmbeddingHead(trunk.spec.feature_dim, dim) if dim else None
    return EmbeddingNet(trunk, head, pooling)
