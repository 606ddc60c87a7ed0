"""Shared fixtures: tiny random components (width 32-64, two layers), offline and seeded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any hub lookup fails at once instead of retrying

import pytest
import torch

import mmgen  # noqa: F401
from transformers import LogitsProcessor  # noqa: E402

TOY_TOKENIZER = "mmgen:toy_tokenizer"

TINY_OPT = dict(
    model_type="opt", vocab_size=64, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=1,
)
TINY_LLAMA = dict(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False,
)
TINY_CLIP_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    image_size=32, patch_size=8,
)


def tiny_llm(family: str = "opt", **kwargs):
    from mmgen.components.causal_lm import CausalLM

    config = TINY_OPT if family == "opt" else TINY_LLAMA
    return CausalLM(config=dict(config), tokenizer=TOY_TOKENIZER, **kwargs)


def tiny_clip(**kwargs):
    from mmgen.components.clip_vision import CLIPVisionEncoder

    return CLIPVisionEncoder(config=dict(TINY_CLIP_VISION), **kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine
    two spinning threads per process slow each step down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def captions():
    return [
        "a red circle on a blue background",
        "a green square on a red background",
        "a blue cross on a yellow background",
        "a yellow triangle on a green background",
    ]


class Script(LogitsProcessor):
    """A logits processor for decoding tests: forces token ``script[n]`` at step n (None: leave
    the model's choice, or a forced group token)."""

    def __init__(self, script):
        self.script = script

    def __call__(self, input_ids, scores):
        n = input_ids.shape[1]
        if n < len(self.script) and self.script[n] is not None:
            scores = torch.full_like(scores, -1e4)
            scores[:, self.script[n]] = 0.0
        return scores
