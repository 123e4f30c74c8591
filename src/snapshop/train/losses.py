"""NormSoftmax (Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning", 2018).

Each class has a proxy vector; embeddings and proxies are L2-normalised, the logits are their
cosine similarities divided by a temperature, and the loss is the cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from snapshop.errors import ConfigError

DEFAULT_TEMPERATURE = 0.05


def normsoftmax_logits(
    embeddings: torch.Tensor, proxies: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> torch.Tensor:
    """(N, D) embeddings, (C, D) proxies -> (N, C) cosine / temperature."""
    return F.normalize(embeddings, dim=1) @ F.normalize(proxies, dim=1).T / temperature


def normsoftmax_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Mean cross-entropy of the temperature-scaled cosine logits."""
    if embeddings.ndim != 2 or proxies.ndim != 2 or embeddings.shape[1] != proxies.shape[1]:
        raise ConfigError(
            f"embeddings {tuple(embeddings.shape)} and proxies {tuple(proxies.shape)} mismatch"
        )
    if labels.shape != (embeddings.shape[0],):
        raise ConfigError(f"labels {tuple(labels.shape)} do not match {embeddings.shape[0]} rows")
    return F.cross_entropy(normsoftmax_logits(embeddings, proxies, temperature), labels)


class NormSoftmaxLoss(nn.Module):
    """The loss with its learnable (C, D) proxies."""

    def __init__(self, dim: int, n_classes: int, temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if n_classes < 2:
            raise ConfigError(f"NormSoftmax needs at least 2 classes, got {n_classes}")
        self.temperature = temperature
        self.proxies = nn.Parameter(torch.randn(n_classes, dim) / math.sqrt(dim))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return normsoftmax_loss(embeddings, labels, self.proxies, self.temperature)
