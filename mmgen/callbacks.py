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


class InitFrom(pl.Callback):
    """Start training from trained tensors: a pretrained folder (``save_pretrained``,
    ``mmgen convert``, ``mmgen export``), a ``.safetensors`` file or a Lightning checkpoint.

    The tensors are copied in when fitting starts (after the model is built, before the first
    step), checked key by key; resuming with ``--ckpt_path`` takes precedence and skips this.

        mmgen fit --config configs/fromage.yaml \\
            --trainer.callbacks+=mmgen.callbacks.InitFrom --trainer.callbacks.path=out/fromage

    Args:
        path: Pretrained folder, ``.safetensors`` file or ``.ckpt`` file.
        allow_missing: Keep the model's own initialisation for tensors the source lacks (e.g. a
            LoRA adapter the source model did not have) instead of refusing.
    """

    def __init__(self, path: str, allow_missing: bool = False):
        self.path = path
        self.allow_missing = allow_missing

    def on_fit_start(self, trainer, pl_module):
        from lightning.pytorch.utilities import rank_zero_info

        from mmgen.pretrained import load_weights_into, read_weights

        if trainer.ckpt_path:
            rank_zero_info(f"InitFrom: resuming from {trainer.ckpt_path}, not initialising from {self.path}")
            return
        missing = load_weights_into(pl_module, read_weights(self.path), str(self.path), self.allow_missing)
        rank_zero_info(f"InitFrom: trained tensors from {self.path}" + (f" ({len(missing)} kept fresh)" if missing else ""))
