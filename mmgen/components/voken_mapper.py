"""MiniGPT-5's feature mapper: voken hidden states -> the generator's text-conditioning sequence.

MiniGPT-5's mapper (about 122.9M parameters with Vicuna-7B and SD 2.1):

    h (n, 8, 4096) --fc: Linear -> GELU -> Linear--> (n, 8, d)        d = generator text width
    nn.Transformer(src = those 8, tgt = 77 learned queries)  --> (n, 77, d)

``d`` is derived from the generator (1024 for SD 2.1, 768 for SD 1.5), the feed-forward is 4 d,
8 heads, 4 + 4 layers, no dropout, pre-norm, no masks, PyTorch's ReLU and final LayerNorms: as
the reference. Classifier-free guidance: ``zero_features`` is what a dropped instance (training,
p = ``cfg_drop_prob`` per image) and the negative branch (inference) feed in.
"""

from __future__ import annotations

import torch
from torch import nn

from mmgen.components.base import OutputHead


class LearnedQueries(nn.Module):
    """The decoder's target sequence, (1, n, d), randn-initialised as in the reference."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, n, d))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.expand(batch_size, -1, -1)  # (b, n, d)


class VokenMapper(OutputHead):
    """Maps the hidden states that predict the vokens to generator conditioning.

    Its parameter groups, which training stages switch on and off, are ``fc``, ``transformer``
    and ``queries`` (see :meth:`groups`).

    Args:
        n_queries: Length of the output sequence (77: the CLIP text encoder's).
        num_heads: Attention heads of the transformer.
        num_encoder_layers: Encoder layers (over the voken features).
        num_decoder_layers: Decoder layers (over the queries).
        ff_mult: Feed-forward width as a multiple of the model width.
        cfg_drop_prob: Chance per output image, in training, that its features are replaced by
            zeros (classifier-free guidance).
    """

    group_names = ("fc", "transformer", "queries")

    def __init__(
        self,
        n_queries: int = 77,
        num_heads: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        ff_mult: int = 4,
        cfg_drop_prob: float = 0.1,
    ):
        super().__init__()
        self.n_queries = n_queries
        self.num_heads = num_heads
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.ff_mult = ff_mult
        self.cfg_drop_prob = cfg_drop_prob
        self.fc: nn.Sequential | None = None
        self.transformer: nn.Transformer | None = None
        self.queries: LearnedQueries | None = None

    def configure(self, in_dim: int, out_dim: int) -> None:
        """``in_dim``: the LLM hidden size (4096); ``out_dim``: the generator's text width."""
        if self.fc is not None:
            return
        self.in_dim = in_dim
        self.fc = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        from mmgen.quiet import quiet_transformer_build

        with quiet_transformer_build():  # pre-norm: torch notes it has no nested-tensor fast path
            self.transformer = nn.Transformer(
                d_model=out_dim,
                nhead=self.num_heads,
                num_encoder_layers=self.num_encoder_layers,
                num_decoder_layers=self.num_decoder_layers,
                dim_feedforward=out_dim * self.ff_mult,
                dropout=0.0,
                norm_first=True,
                batch_first=True,
            )
        self.queries = LearnedQueries(self.n_queries, out_dim)

    def groups(self) -> dict[str, nn.Module]:
        return {"fc": self.fc, "transformer": self.transformer, "queries": self.queries}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features: (n, k, in_dim), the hidden states that predict the k vokens of n images
        src = self.fc(self.own_dtype(features))  # (n, k, d)
        return self.transformer(src=src, tgt=self.queries(features.shape[0]))  # (n, 77, d)

    def zero_features(self, n: int, k: int) -> torch.Tensor:
        """The CFG "no condition" input: (n, k, in_dim) zeros."""
        weight = self.fc[0].weight
        return torch.zeros(n, k, self.in_dim, dtype=weight.dtype, device=weight.device)

    def sample_drop(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) bool: which of n output images have their features dropped (training only)."""
        if self.cfg_drop_prob <= 0:
            return torch.zeros(n, dtype=torch.bool)
        return torch.rand(n, generator=generator) < self.cfg_drop_prob

    def negative_embedding(self, n: int, k: int) -> torch.Tensor:
        """(n, 77, d): the mapper's output for all-zero features, the negative prompt at inference."""
        return self(self.zero_features(n, k))
