"""Full-size dry runs: build any model with random weights on the meta device and count."""

from __future__ import annotations

import torch

from mmgen.components.hub import random_weights_only


def dry_run(model, trainer=None) -> list[tuple[str, int, int]]:
    """Configure ``model`` (a MultimodalLM) with random weights on the meta device: tensors have
    shapes and dtypes but no storage, so OPT-6.7B or Vicuna-7B cost nothing. Returns its
    parameter table.

    With the run's ``trainer``, mmgen's own callbacks prepare the model first as they do in
    ``fit`` (a training stage decides what trains), so the table counts what that run trains."""
    if trainer is not None:
        prepare_as_in_fit(model, trainer)
        model.follow_run_precision(trainer.precision)
    with random_weights_only(), torch.device("meta"):
        model.configure_model()
    return model.parameter_table()


def prepare_as_in_fit(model, trainer) -> None:
    """Run the ``setup`` hook of the trainer's mmgen callbacks (those that choose what trains
    before ``configure_model``); other callbacks are left alone."""
    for callback in getattr(trainer, "callbacks", []):
        if type(callback).__module__.startswith("mmgen.") and hasattr(callback, "setup"):
            callback.setup(trainer, model, "fit")


def format_table(rows: list[tuple[str, int, int]], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'component':<20} {'parameters':>16} {'trainable':>14}")
    for name, total, trainable in rows:
        lines.append(f"{name:<20} {total:>16,} {trainable:>14,}")
    total = sum(r[1] for r in rows)
    trainable = sum(r[2] for r in rows)
    lines.append(f"{'total':<20} {total:>16,} {trainable:>14,}  ({trainable / 1e6:.2f}M trainable)")
    return "\n".join(lines)
