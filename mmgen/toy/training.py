"""The one training loop the toy backbones share.

A plain loop rather than Lightning or transformers' Trainer: each backbone trains for a minute or
two in one process with a fixed seed, and needs none of their logging, checkpointing or device
machinery; this keeps every pretraining run byte-for-byte reproducible and fast to start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch


def fit(params, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float, warmup: int = 20,
        weight_decay: float = 0.01, log: Callable[[str], None] = print, name: str = "") -> dict:
    """AdamW with linear warmup then cosine decay; ``loss_fn(step)`` draws its own batch and
    returns the loss. Returns {"steps", "seconds", "first_loss", "last_loss"} (losses averaged over
    the first and last tenth of the run)."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    losses, start = [], time.perf_counter()
    for step in range(steps):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  {name} step {step + 1}/{steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    tenth = max(1, steps // 10)
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1),
            "first_loss": round(sum(losses[:tenth]) / tenth, 4), "last_loss": round(sum(losses[-tenth:]) / tenth, 4)}


def distinct_caption_batch(rng, captions: list[str], batch_size: int) -> list[int]:
    """Indices of up to ``batch_size`` examples with distinct captions, in random order: two
    copies of one caption in a contrastive batch would be each other's negatives."""
    chosen, seen = [], set()
    for i in rng.sample(range(len(captions)), len(captions)):
        if captions[i] not in seen:
            chosen.append(i)
            seen.add(captions[i])
        if len(chosen) == batch_size:
            break
    return chosen


def save_trained(model, tokenizer, out_dir, result: dict) -> dict:
    """Put ``model`` in eval mode and write it with its tokenizer to ``out_dir``; ``result`` (the
    loop's numbers) gains the parameter count and is returned."""
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    return result
