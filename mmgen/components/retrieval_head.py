"""The retrieval head: text and image projections into one space, with a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmgen.components.base import OutputHead


class RetrievalHead(OutputHead):
    """Projects the LLM hidden state at the retrieval token (``[RET]`` for FROMAGe, ``[IMG0]`` for
    GILL) and the pooled image features into a shared space; ``logit_scale`` starts at
    log(1/0.07) and is not clamped, as in the reference.

    Args:
        embed_dim: Width of the shared retrieval space.
        dropout: Dropout after the text projection (the reference's Sequential(Linear, Dropout)).
    """

    def __init__(self, embed_dim: int = 256, dropout: float = 0.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.dropout = dropout
        self.text_proj: nn.Linear | None = None
        self.image_proj: nn.Linear | None = None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def configure(self, text_dim: int, image_dim: int) -> None:
        if self.text_proj is None:
            self.text_proj = nn.Linear(text_dim, self.embed_dim)
            self.image_proj = nn.Linear(image_dim, self.embed_dim)

    def embed_text(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (b, text_dim) at the retrieval token -> (b, embed_dim), L2-normalised
        x = F.dropout(self.text_proj(self.own_dtype(hidden)), self.dropout, self.training)
        return F.normalize(x, dim=-1)

    def embed_image(self, features: torch.Tensor) -> torch.Tensor:
        # features: (b, 1, image_dim) pooled -> (b, embed_dim), L2-normalised
        return F.normalize(self.image_proj(self.own_dtype(features).flatten(1)), dim=-1)
