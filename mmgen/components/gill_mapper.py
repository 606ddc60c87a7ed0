"""GILLMapper: the [IMG] tokens' hidden states -> an image generator's text-encoder space."""

from __future__ import annotations

import torch
from torch import nn

from mmgen.components.base import OutputHead


class GILLMapper(OutputHead):
    """GILL's generation head, about 31.96M parameters at full size.

        h[IMG0..r-1] (b, r, 4096) + e[IMG0..r-1] (b, r, 4096)     residual add of the input embeddings
        --fc--> (b, r, 512)                                        encoder source
        77 learned queries (1, 77, 512), randn init                decoder target
        --tfm: nn.Transformer(512, 4 heads, 4+4 layers, ffn 2048, dropout 0, pre-norm)-->
        (b, 77, 512) --model--> (b, 77, out_dim)                   768 for SD v1.5, 1024 for SD 2.x

    Attribute names (``fc``, ``tfm``, ``model``, ``query_embs``) are the reference's, so released
    ``gen_text_hidden_fcs.0.*`` weights map one to one. No masks: the queries attend to each other
    both ways and to all r tokens.

    Args:
        n_queries: Output tokens (77: the SD text encoder's length).
        d_model: Width of the transformer.
        nhead: Attention heads.
        num_encoder_layers: Encoder layers over the r [IMG] tokens.
        num_decoder_layers: Decoder layers over the queries.
        dim_feedforward: Feed-forward width (4 x d_model in the reference).
        dropout: Transformer dropout (0 in the reference).
        out_dim: Output width. Default: the generator's ``text_embed_dim`` given to ``configure``.
        residual_input_embeddings: Add the [IMG] input embeddings to the hidden states (reference).
    """

    def __init__(
        self,
        n_queries: int = 77,
        d_model: int = 512,
        nhead: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        out_dim: int | None = None,
        residual_input_embeddings: bool = True,
    ):
        super().__init__()
        self.n_queries = n_queries
        self.d_model = d_model
        self.nhead = nhead
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.dim_feedforward = dim_feedforward
        self.dropout = dropout
        self.out_dim = out_dim
        self.residual_input_embeddings = residual_input_embeddings
        self.fc: nn.Linear | None = None
        self.tfm: nn.Transformer | None = None
        self.model: nn.Linear | None = None
        self.query_embs: nn.Parameter | None = None

    def configure(self, hidden_dim: int, out_dim: int | None = None) -> None:
        """``hidden_dim``: the LLM's hidden size; ``out_dim``: the generator's text-embedding width
        (the ``out_dim`` argument, when given, must agree)."""
        if self.fc is not None:
            return
        if self.out_dim is not None and out_dim is not None and self.out_dim != out_dim:
            from mmgen.errors import ConfigError

            raise ConfigError(f"GILLMapper out_dim={self.out_dim} but the generator needs {out_dim}")
        self.out_dim = self.out_dim or out_dim
        if self.out_dim is None:
            from mmgen.errors import ConfigError

            raise ConfigError("GILLMapper needs `out_dim` or an image generator to take it from")
        self.fc = nn.Linear(hidden_dim, self.d_model)
        from mmgen.quiet import quiet_transformer_build

        with quiet_transformer_build():  # pre-norm: torch notes it has no nested-tensor fast path
            self.tfm = nn.Transformer(
                d_model=self.d_model, nhead=self.nhead, num_encoder_layers=self.num_encoder_layers,
                num_decoder_layers=self.num_decoder_layers, dim_feedforward=self.dim_feedforward,
                dropout=self.dropout, norm_first=True, batch_first=True,
            )
        self.model = nn.Linear(self.d_model, self.out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, self.n_queries, self.d_model))

    def forward(self, hidden: torch.Tensor, input_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # hidden, input_embeds: (b, r, hidden_dim) at [IMG0..r-1]
        hidden, input_embeds = self.own_dtype(hidden, input_embeds)
        x = hidden + input_embeds if self.residual_input_embeddings else hidden
        x = self.fc(x)  # (b, r, d_model)
        queries = self.query_embs.expand(x.shape[0], -1, -1)  # (b, 77, d_model)
        x = self.tfm(x, queries)  # (b, 77, d_model)
        return self.model(x)  # (b, 77, out_dim)
