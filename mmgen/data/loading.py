"""Training data loaders that a checkpoint can stop and restart mid-epoch.

torchdata's ``StatefulDataLoader`` is a drop-in ``DataLoader`` with ``state_dict()`` /
``load_state_dict()``: the shuffle generator, the position in the epoch and the workers' states.
Lightning saves that state in every checkpoint and restores it on resume, so a run killed
mid-epoch continues with the very next batch of the same shuffled order, instead of replaying
the head of the data (and never reaching its tail).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

try:
    from torchdata.stateful_dataloader import StatefulDataLoader
except ImportError:  # pragma: no cover  (torchdata is a dependency; without it resume is approximate)
    StatefulDataLoader = None


def shuffled_loader(dataset, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True,
                    num_workers: int = 0, collate_fn=None) -> DataLoader:
    """A training loader: seeded shuffle (the same seed gives the same order in every run) whose
    position and generator are saved in checkpoints."""
    cls = StatefulDataLoader or DataLoader
    return cls(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
    )
