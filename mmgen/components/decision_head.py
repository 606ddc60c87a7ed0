"""GILL's decision module: retrieve an image or generate one, from the [IMG0] hidden state."""

from __future__ import annotations

import torch
from torch import nn

from mmgen.components.base import OutputHead

DECISIONS = ("generate", "retrieve")  # class index -> decision, as the reference: {0: gen, 1: ret}


class DecisionHead(OutputHead):
    """``Dropout(0.5) + Linear(hidden, 2)`` on the raw last-layer hidden state at ``[IMG0]``;
    logits of (generate, retrieve). ``head`` is an ``nn.Sequential`` so the released
    ``decision_model.pth.tar`` keys (``1.weight`` (2, 4096), ``1.bias`` (2,)) load into
    ``head`` unchanged.

    Args:
        dropout: Dropout before the linear layer (0.5 in the reference).
    """

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.dropout = dropout
        self.head: nn.Sequential | None = None

    def configure(self, hidden_dim: int) -> None:
        if self.head is None:
            self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(hidden_dim, len(DECISIONS)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (b, hidden_dim) at [IMG0] -> (b, 2) logits of (generate, retrieve)
        return self.head(self.own_dtype(hidden))

    @torch.no_grad()
    def decide(self, hidden: torch.Tensor) -> list[str]:
        """"generate" or "retrieve" per row (argmax; dropout off in eval mode)."""
        return [DECISIONS[i] for i in self(hidden).argmax(-1).tolist()]
