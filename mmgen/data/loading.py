"""Training data loaders that a checkpoint can stop and restart mid-epoch.

The shuffle order of epoch ``e`` is the permutation ``DistributedSampler`` draws from a generator
seeded with ``seed + e`` alone (then this process's share of it), so it never depends on generator
state carried from earlier epochs; the sampler's state is just how many indices of the epoch it
has served. torchdata's ``StatefulDataLoader`` saves that state (``state_dict()``), Lightning puts
it in every checkpoint, restores it on resume and sets the epoch: a run killed mid-epoch continues
with the very next batch of the same order, instead of replaying the head of the data (and never
reaching its tail), and later epochs shuffle as in the uninterrupted run. Under DDP the sampler
is already a ``DistributedSampler``, so Lightning keeps it.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

# torchdata 0.11 calls a deprecated torch function on every loader it makes: noise, not advice.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

try:
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
except ImportError:  # pragma: no cover  (torchdata is a dependency; without it resume restarts the epoch)
    StatefulDataLoader = StatefulDistributedSampler = None


if StatefulDistributedSampler is not None:

    class ResumableSampler(StatefulDistributedSampler):
        """This process's share of the epoch's permutation, resumable mid-epoch. The epoch
        advances when Lightning sets it, or after a complete pass (plain loops)."""

        def __iter__(self):
            yield from super().__iter__()
            self.set_epoch(self.epoch + 1)

else:  # pragma: no cover
    ResumableSampler = None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shuffled_loader(dataset, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True,
                    num_workers: int = 0, collate_fn=None) -> DataLoader:
    """A training loader: seeded shuffle (the same seed gives the same order in every run) whose
    position is saved in checkpoints."""
    from mmgen.errors import ConfigError

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"data batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"data num_workers must be an integer >= 0, got {num_workers!r}")
    common = dict(batch_size=batch_size, drop_last=drop_last, num_workers=num_workers,
                  persistent_workers=num_workers > 0, collate_fn=collate_fn,
                  # worker seeds only: starting an epoch draws nothing from torch's global generator
                  generator=torch.Generator().manual_seed(seed))
    if StatefulDataLoader is None:  # pragma: no cover
        return DataLoader(dataset, shuffle=shuffle, **common)
    world, rank = _world()
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    return StatefulDataLoader(dataset, sampler=sampler, **common)
