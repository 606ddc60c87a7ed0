"""Optimizer and learning-rate schedule settings shared by the methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmgen.errors import ConfigError


@dataclass
class Optim:
    """AdamW with warmup, then constant, step-decayed or linearly decayed learning rate."""

    lr: float = 3e-4
    """Base learning rate; a component's ``lr_scale`` multiplies it for that component."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    """Decoupled weight decay of weight matrices. Never applied to new token rows (they are one
    embedding each), biases, norms or scalars (the temperature): parameters with fewer than 2
    dimensions."""
    warmup_steps: int = 100
    """Linear warmup from 0 over this many optimizer steps (step 0 has lr 0, as in MiniGPT-5)."""
    schedule: str = "constant"
    """After warmup: "constant", "step" (x ``decay_factor`` at each of ``decay_steps``) or
    "linear" (to 0 at ``total_steps``, or at the trainer's estimated total when 0)."""
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1
    total_steps: int = 0


def _lr_scale_of(name: str, scales: dict[str, float]) -> float:
    """The lr_scale of the deepest module prefix of parameter ``name`` that declares one."""
    best, best_len = 1.0, -1
    for prefix, scale in scales.items():
        if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) > best_len:
            best, best_len = scale, len(prefix)
    return best


def param_groups(module: nn.Module, optim: Optim) -> list[dict]:
    """Trainable parameters grouped by (lr scale, weight decay). New token rows (peft's
    trainable-token deltas) get no weight decay; modules may declare ``lr_scale`` (float)."""
    scales = {name: float(m.lr_scale) for name, m in module.named_modules() if hasattr(m, "lr_scale")}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decay = optim.weight_decay > 0 and "trainable_tokens" not in name and param.ndim >= 2
        groups.setdefault((_lr_scale_of(name, scales), decay), []).append(param)
    return [
        {"params": params, "lr": optim.lr * scale, "weight_decay": optim.weight_decay if decay else 0.0}
        for (scale, decay), params in groups.items()
    ]


def lr_factor(step: int, optim: Optim, total_steps: int) -> float:
    if step < optim.warmup_steps:
        return step / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "step":
        return optim.decay_factor ** sum(step >= s for s in optim.decay_steps)
    if optim.schedule == "linear":
        if total_steps <= 0:  # would be lr 0 right after warm-up
            raise ConfigError(
                "Optim.schedule='linear' needs the run length: set optim.total_steps, or "
                "trainer.max_steps when the data has no length (an iterable dataset)"
            )
        remaining = max(total_steps - optim.warmup_steps, 1)
        return max(0.0, (total_steps - step) / remaining)
    raise ValueError(f"Optim.schedule must be constant, step or linear, not {optim.schedule!r}")


def build_optimizer(module: nn.Module, optim: Optim, total_steps: int):
    """AdamW over ``param_groups`` with a per-step LambdaLR (Lightning config dict)."""
    optimizer = torch.optim.AdamW(param_groups(module, optim), betas=tuple(optim.betas), eps=optim.eps)
    total = optim.total_steps or total_steps
    if optim.schedule == "linear":
        lr_factor(optim.warmup_steps, optim, total)  # fails now, not at the end of warm-up
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
