"""The component kinds: the interfaces a method assembles. One concrete class per file registers
itself as a subclass of one of these (see ``mmgen.registry``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmgen.registry import Component, Registered


@dataclass
class LMOutput:
    loss: torch.Tensor | None  # token-mean cross-entropy over every supervised label of the batch
    logits: torch.Tensor  # (b, t, vocab)
    hidden: torch.Tensor  # (b, t, d) last layer, after the final norm: hidden_states[-1]


@dataclass(frozen=True)
class NewToken:
    """A token a method adds to the LLM's vocabulary, declared as the official code adds it.

    The order of a method's declarations is the order of the new ids; a frozen token still gets
    its row (and a softmax entry), so the vocabulary, and with it every loss, is the official one.
    """

    text: str
    trainable: bool = True  # its embedding (and untied LM-head) row trains
    special: bool = True  # a special token (skipped by decode(skip_special_tokens=True)); False:
    #   a plain added token, as `tokenizer.add_tokens` makes it (FROMAGe's [RET], GILL's [IMG*])
    lstrip: bool = False  # eat the whitespace before it, as the slow (legacy) LLaMA tokenizer
    #   does for every added special token (MiniGPT-5: "lunch . [IMG0]" has no lone "▁")


class LLMBackbone(Component, kind="llm"):
    """A frozen causal language model whose new special tokens (and adapter, if any) train.

    ``configure(new_tokens=..., new_token_init=...)`` loads the model and tokenizer and adds the
    tokens a method needs (``NewToken`` or plain strings: trainable special tokens). After that:
    ``tokenizer``, ``embed_dim``, ``token_id(token)``, ``embed(ids)``,
    ``forward(inputs_embeds, attention_mask, labels)``.
    """

    tokenizer = None

    def configure(self, new_tokens: list[NewToken | str] = (), new_token_init: str = "random") -> None:
        raise NotImplementedError

    def token_id(self, token: str) -> int:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inputs_embeds, attention_mask, labels=None) -> LMOutput:
        raise NotImplementedError


class VisualEncoder(Component, kind="visual_encoder"):
    """A frozen image encoder. ``forward(images)`` takes RGB in [0, 1], (b, 3, h, w), does its own
    resizing/normalisation, and returns features (b, n_tokens, feature_dim)."""

    feature_dim: int
    n_tokens: int


class InputProjection(Component, kind="input_projection"):
    """Maps visual features (b, n, feature_dim) into the LLM's input embedding space (b, k, d)."""


class OutputHead(Component, kind="output_head"):
    """Maps LLM hidden states to something outside the LLM: retrieval embeddings, generator inputs."""


class PeftAdapter(Registered, kind="adapter"):
    """A peft method applied to the LLM. ``peft_config(token_targets)`` returns the peft config
    that also trains exactly the new token rows ``token_targets`` ({module name: row indices})."""

    def peft_config(self, token_targets: dict[str, list[int]]):
        raise NotImplementedError

    def wrap(self, model: nn.Module, token_targets: dict[str, list[int]]) -> nn.Module:
        """``model`` wrapped in peft with this adapter and the trainable token rows. Default:
        ``get_peft_model(model, peft_config(token_targets))``; adapters whose peft config cannot
        also train token rows (prefix tuning) override this."""
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(token_targets))

    def prefix_cache(self, model: nn.Module, batch_size: int):
        """The key/value cache an adapter puts in front of every sequence (prefix tuning), for
        decoding through the base model; None for adapters that add no positions."""
        return None

    def set_train_mode(self, model: nn.Module, mode: bool) -> None:
        """The LLM stays in eval mode (its own dropout off); an adapter's stochastic parts follow
        ``mode``. Default: nothing of the adapter is stochastic."""


class ImageGenerator(Component, kind="image_generator"):
    """A frozen text-to-image diffusion model conditioned on text-encoder-shaped embeddings.

    After ``configure()``: ``text_embed_dim`` (768 for SD 1.5, 1024 for SD 2.x), ``max_length``
    (77), ``encode_captions(captions, use_attention_mask)`` -> (b, 77, text_embed_dim),
    ``ldm_loss(images, cond, snr_gamma)`` (MiniGPT-5's training signal through the frozen UNet)
    and ``generate(prompt_embeds, negative_prompt_embeds, ...)`` -> images in [0, 1].
    """

    text_embed_dim: int
    max_length: int = 77
