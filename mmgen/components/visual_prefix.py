"""The trainable map from visual features to LLM input embeddings (the "visual prefix")."""

from __future__ import annotations

import torch
from torch import nn

from mmgen.components.base import InputProjection


class LinearVisualPrefix(InputProjection):
    """One ``Linear(feature_dim, embed_dim * n_tokens)`` reshaped to ``n_tokens`` pseudo-tokens
    placed before the text, with no delimiter (FROMAGe: 1 token; GILL: 4).

    Args:
        n_tokens: Visual tokens per image.
    """

    def __init__(self, n_tokens: int = 1):
        super().__init__()
        self.n_tokens = n_tokens
        self.proj: nn.Linear | None = None

    def configure(self, feature_dim: int, embed_dim: int) -> None:
        if self.proj is None:
            self.proj = nn.Linear(feature_dim, embed_dim * self.n_tokens)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features: (b, 1, feature_dim), a pooled vector per image
        b = features.shape[0]
        return self.proj(self.own_dtype(features).reshape(b, -1)).view(b, self.n_tokens, -1)  # (b, k, embed_dim)
