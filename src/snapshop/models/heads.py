"""Embedding networks: backbone -> global average pool -> [LayerNorm -> Linear] -> L2 normalise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from snapshop.models.efficientnet_lite import EfficientNetLite, create_backbone


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

    def __init__(self, backbone: EfficientNetLite, head: EmbeddingHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def dim(self) -> int:
        return (
            self.head.proj.out_features if self.head is not None else self.backbone.spec.feature_dim
        )

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        out = self.head(pooled) if self.head is not None else pooled
        return F.normalize(out, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_features(x).mean(dim=(2, 3))
        return self.embed_pooled(pooled)


def create_embedding_net(
    backbone: str = "efficientnet_lite2", dim: int | None = None, pretrained: bool = True
) -> EmbeddingNet:
    trunk = create_backbone(backbone, pretrained=pretrained)
    head = EmbeddingHead(trunk.spec.feature_dim, dim) if dim else None
    return EmbeddingNet(trunk, head)
