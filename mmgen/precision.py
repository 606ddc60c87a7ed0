"""A run's precision, declared once: the trainer's ``precision``.

Lightning's precision plugin decides how a step computes (autocast under ``*-mixed``, everything
cast under ``*-true``). The frozen backbones' storage follows the same setting: a component whose
``dtype`` argument is "auto" (the default) stores its frozen weights in bf16 when the run's
precision is ``bf16-mixed`` or ``bf16-true``, in fp16 under ``16-*``, and in fp32 otherwise, while
the trainable parameters keep fp32 master weights under the mixed precisions. An explicit
``dtype`` still overrides it for one component (GILL's official Stable Diffusion ran in fp16).
"""

from __future__ import annotations

import torch

from mmgen.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def storage_dtype(name: str) -> torch.dtype:
    """A component's ``dtype`` argument as a torch dtype ("auto": fp32 until the run's precision
    is known, see :func:`run_storage_dtype`)."""
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {list(DTYPES)}, not {name!r}")
    return torch.float32 if name == "auto" else getattr(torch, name)


def run_storage_dtype(precision) -> torch.dtype:
    """The frozen weights' dtype under a Lightning precision ("32", "bf16-mixed", "16-true", ...)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32
