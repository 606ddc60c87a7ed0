"""Callbacks for the kill-and-resume test (used by a subprocess whose PYTHONPATH holds this folder).

``StepLosses`` appends ``step,loss`` of every training step to a file as it happens, so the lines
of a run that is killed stay on disk. ``KillAt`` sends the process a real SIGKILL right after the
optimizer step ``step`` (and after the checkpoint callbacks of that batch ran), like a node lost
mid-epoch.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class StepLosses(Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step},{float(loss):.10g}\n")
            f.flush()


class KillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

