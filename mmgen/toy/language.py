"""The toy world's causal LMs: an OPT-style one (FROMAGe, GILL) and a LLaMA-style one (MiniGPT-5),
trained on the world's captions, stories and dialogues in the methods' own templates."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from mmgen.toy.training import fit

# Small enough to train in about a minute on 2 cores; deep enough to track a story's state.
OPT_CONFIG = dict(model_type="opt", hidden_size=64, word_embed_proj_dim=64, ffn_dim=256, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
                  do_layer_norm_before=True)
LLAMA_CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                    tie_word_embeddings=False)


def build_lm(family: str, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(OPT_CONFIG if family == "opt" else LLAMA_CONFIG)
    model_type = values.pop("model_type")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values, **ids))


def _batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")  # (b, t), "</s>" first
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return {**encoded, "labels": labels}


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 64) -> float:
    """exp(mean next-token loss over all predicted tokens of ``texts``)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = _batch(tokenizer, texts[i:i + batch_size])
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    return math.exp(total / count)


def train_lm(family: str, tokenizer, texts: list[str], out_dir: Path, steps: int = 600, batch_size: int = 32,
             lr: float = 3e-3, seed: int = 0, log=print) -> dict:
    """Train an LM of ``family`` ("opt" or "llama") on ``texts``; save it and the tokenizer to
    ``out_dir``. Returns the loop's numbers."""
    torch.manual_seed(seed)
    model = build_lm(family, tokenizer)
    rng = random.Random(seed)
    # Texts of similar length together: far less padding per batch.
    order = sorted(texts, key=len)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    model.train()
    result = fit(model.parameters(), lambda step: model(**_batch(tokenizer, rng.choice(chunks))).loss,
                 steps=steps, lr=lr, log=log, name=family)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result
