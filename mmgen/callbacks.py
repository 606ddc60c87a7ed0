"""Small Lightning callbacks that mmgen's configs use."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


class PrintMetrics(pl.Callback):
    """Print the validation metrics after each validation epoch and the checkpoint at the end,
    for runs without a progress bar (the CPU demo, CI logs).

    Args:
        prefix: Only metrics whose name starts with this are printed.
    """

    def __init__(self, prefix: str = "val/"):
        self.prefix = prefix

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module):
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
