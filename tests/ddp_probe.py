"""A callback for the multi-process tests: each process writes what it saw to ``out_dir``.

Used through ``mmgen fit --trainer.callbacks+=ddp_probe.Probe`` in a subprocess whose
PYTHONPATH holds this folder (Lightning's DDP re-launches the command once per process).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def _full(tensor):
    """A sharded DTensor gathered (every process calls this), else the tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class Probe(Callback):
    """Saves, per process: the gradients of the first backward, the method's first random draw,
    and the metrics logged at the end of validation."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.record: dict = {}

    def on_train_start(self, trainer, pl_module):
        if hasattr(pl_module, "training_rng"):
            self.record["rng_state"] = pl_module.training_rng.get_state().clone()

    def on_after_backward(self, trainer, pl_module):
        if "grads" not in self.record:
            self.record["grads"] = {n: _full(p.grad).detach().clone() for n, p in pl_module.named_parameters()
                                    if p.grad is not None}
            # which parameters are sharded, and the size of this process's shard
            self.record["shards"] = {n: (p.to_local().numel(), p.numel()) for n, p in pl_module.named_parameters()
                                     if hasattr(p, "to_local")}
            self.record["loss_terms"] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_validation_end(self, trainer, pl_module):
        self.record["val_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.record["world_size"] = trainer.world_size
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")
