"""A callback for the multi-process shard test: each process writes the sample keys of its
training batches to ``out_dir/rank{r}.json`` (used through ``--trainer.callbacks+=shard_probe.Keys``
in a subprocess whose PYTHONPATH holds this folder)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class Keys(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.keys: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.append(list(batch["keys"]))

    def on_fit_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))
