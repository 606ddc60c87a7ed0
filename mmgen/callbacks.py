"""Small Lightning callbacks that mmgen's configs use."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


class PrintMetrics(pl.Callback):
    """Print the validation metrics after each validation epoch and the checkpoint at the end,
    for runs without a progress bar (the CPU demo, CI logs); with ``every_n_steps``, the training
    losses too, so a run shows progress before its first validation.

    Args:
        prefix: Only metrics whose name starts with this are printed.
        every_n_steps: Also print the ``train/`` metrics every this many optimizer steps (0: never).
    """

    def __init__(self, prefix: str = "val/", every_n_steps: int = 0):
        self.prefix = prefix
        self.every_n_steps = every_n_steps

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or step == getattr(self, "_printed_step", None):
            return
        self._printed_step = step  # once per optimizer step under gradient accumulation
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        shown = "  ".join(f"{k.removeprefix('train/')}={v:.3f}" for k, v in sorted(metrics.items()))
        print(f"epoch {trainer.current_epoch} step {step}: train {shown}", flush=True)

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):  # after the module's epoch-end metrics
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)}
        shown = "  ".join(f"{k.removeprefix(self.prefix)}={v:.3f}" for k, v in sorted(metrics.items()))
        print(f"epoch {trainer.current_epoch} step {trainer.global_step}: {shown}", flush=True)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        callback = trainer.checkpoint_callback
        if callback is not None and callback.best_model_path:
            print(f"checkpoint: {callback.best_model_path}", flush=True)
