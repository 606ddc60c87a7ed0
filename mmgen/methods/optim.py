"""Optimizer and learning-rate schedule settings shared by the methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mmgen.errors import ConfigError

if TYPE_CHECKING:
    from mmgen.methods.trainability import ParamGroup


@dataclass
class Optim:
    """AdamW with warmup, then constant, step-decayed or linearly decayed learning rate."""

    lr: float = 3e-4
    """Base learning rate; a parameter group's ``lr_scale`` multiplies it for that group."""
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

    def __post_init__(self) -> None:
        """Values that would train nothing or diverge are refused when the config is read."""
        def bad(key: str, value, need: str):
            raise ConfigError(f"optim.{key} must be {need}, got {value!r}")

        number = (int, float)
        if not isinstance(self.lr, number) or isinstance(self.lr, bool) or not 0 <= self.lr < float("inf"):
            bad("lr", self.lr, "a finite number >= 0")
        if len(tuple(self.betas)) != 2 or not all(isinstance(b, number) and 0 <= b < 1 for b in self.betas):
            bad("betas", self.betas, "two numbers in [0, 1)")
        if not isinstance(self.eps, number) or not self.eps > 0:
            bad("eps", self.eps, "> 0")
        if not isinstance(self.weight_decay, number) or not self.weight_decay >= 0:
            bad("weight_decay", self.weight_decay, ">= 0")
        for key in ("warmup_steps", "total_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                bad(key, value, "an integer >= 0")
        if self.schedule not in ("constant", "step", "linear"):
            bad("schedule", self.schedule, "'constant', 'step' or 'linear'")


def param_groups(groups: "dict[str, ParamGroup] | nn.Module", optim: Optim) -> list[dict]:
    """AdamW groups from a method's declared parameter groups (``mmgen.methods.trainability``):
    the groups that train, split into decayed matrices and undecayed parameters of fewer than 2
    dimensions (biases, norms, scalars). A plain module: every parameter that requires grad,
    peft's trainable-token rows undecayed."""
    if isinstance(groups, nn.Module):
        from mmgen.methods.trainability import ParamGroup

        named = [(n, p) for n, p in groups.named_parameters() if p.requires_grad]
        groups = {
            "tokens": ParamGroup([p for n, p in named if "trainable_tokens" in n], weight_decay=False),
            "rest": ParamGroup([p for n, p in named if "trainable_tokens" not in n]),
        }
    out = []
    for group in groups.values():
        if not group.train:
            continue
        decayed = [p for p in group.params if group.weight_decay and p.ndim >= 2]
        plain = [p for p in group.params if not (group.weight_decay and p.ndim >= 2)]
        for params, decay in ((decayed, optim.weight_decay), (plain, 0.0)):
            if params:
                out.append({"params": params, "lr": optim.lr * group.lr_scale, "weight_decay": decay})
    return out


def lr_factor(step: int, optim: Optim, total_steps: int) -> float:
    """The schedule's learning-rate multiplier at optimizer step ``step``: what the scheduler of
    :func:`build_optimizer` gives (transformers' for constant and linear, this for step)."""
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


def build_optimizer(groups: "dict[str, ParamGroup] | nn.Module", optim: Optim, total_steps: int):
    """AdamW over :func:`param_groups` with a per-step schedule (Lightning config dict).

    "constant" and "linear" are transformers' ``constant_with_warmup`` and ``linear`` schedules
    (warmup from 0). "step" is a LambdaLR of :func:`lr_factor`: neither library has warmup from 0
    followed by step decay (torch's ``LinearLR`` cannot start at 0, and ``SequentialLR`` restarts
    ``MultiStepLR``'s step count at the switch, shifting every milestone by the warmup)."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(param_groups(groups, optim), betas=tuple(optim.betas), eps=optim.eps)
    total = optim.total_steps or total_steps
    if optim.schedule == "linear":
        lr_factor(optim.warmup_steps, optim, total)  # fails now, not at the end of warm-up
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=total)
    elif optim.schedule == "constant":
        scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=optim.warmup_steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
