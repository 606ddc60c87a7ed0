"""What every method shares: lazy building, optimizer, trainable-only checkpoints, summaries."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch

from mmgen.errors import ConfigError
from mmgen.methods.losses import gather_keeping_local_grad
from mmgen.methods.optim import Optim, build_optimizer
from mmgen.registry import Registered


class MultimodalLM(Registered, pl.LightningModule, kind="method"):
    """Base of the method LightningModules (FROMAGe, GILL, MiniGPT-5).

    Subclasses receive their components in ``__init__`` (cheap: nothing loads there) and build
    them in ``configure_model``, which Lightning calls once the strategy is set up (and
    ``load_from_checkpoint`` calls before loading weights). Checkpoints hold trainable
    parameters only; frozen backbones come from their own configs.
    """

    def __init__(self, optim: Optim | None = None):
        super().__init__()
        # Records every subclass's init arguments; under LightningCLI they are stored as the
        # config that built them, so load_from_checkpoint can rebuild the components.
        with warnings.catch_warnings():  # components given as objects (not from a config) are
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")  # dropped
            self.save_hyperparameters()  # from checkpoints in on_save_checkpoint
        self.optim = optim or Optim()
        # Checkpoints omit frozen weights, so loading is non-strict; on_load_checkpoint checks
        # that exactly the trainable parameters are present instead.
        self.strict_loading = False

    #: Scale the new token rows to the frozen rows' mean norm after each optimizer step
    #: (FROMAGe and GILL do; subclasses set it from their init arguments).
    rescale_new_rows: bool = False

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.rescale_new_rows:
            self.llm.rescale_new_rows()

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        return build_optimizer(self, self.optim, int(total) if total != float("inf") else 0)

    def trainable_state_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # A model built in Python (not from a config) records its components themselves as
        # hyper-parameters; pickling them would put every frozen weight back in the file.
        hparams = checkpoint.get("hyper_parameters", {})
        checkpoint["hyper_parameters"] = {k: v for k, v in hparams.items() if not isinstance(v, torch.nn.Module)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected, found = self.trainable_state_keys(), set(checkpoint["state_dict"])
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise ConfigError(
                "checkpoint does not match this model's trainable parameters: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )

    def save_pretrained(self, directory) -> None:
        """Write this model as a pretrained folder (config, trained tensors, card): mmgen.pretrained."""
        from mmgen.pretrained import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory) -> "MultimodalLM":
        """Build the model of a pretrained folder (offline, backbones from their sources)."""
        from mmgen.pretrained import load_pretrained

        model = load_pretrained(directory)
        if not isinstance(model, cls):
            raise ConfigError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def parameter_table(self) -> list[tuple[str, int, int]]:
        """[(top-level component, parameters, trainable parameters)], built model only."""
        rows = []
        for name, child in self.named_children():
            params = list(child.parameters())
            rows.append((name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
        own = [p for n, p in self.named_parameters(recurse=False)]
        if own:
            rows.append(("(module)", sum(p.numel() for p in own), sum(p.numel() for p in own if p.requires_grad)))
        return rows

    def gather_global_batch(self, local: torch.Tensor, keep_grad: bool = True) -> torch.Tensor:
        """This rank's (b, ...) rows joined with every other rank's: (world * b, ...). The local
        shard keeps its gradient when ``keep_grad``. Outside a multi-process run: ``local``."""
        if self._trainer is None or self.trainer.world_size == 1:
            return local
        gathered = self.all_gather(local)  # (world, b, ...)
        if keep_grad:
            return gather_keeping_local_grad(local, gathered, self.global_rank)
        return gathered.flatten(0, 1)

    def log_losses(self, losses: dict[str, torch.Tensor], stage: str, batch_size: int) -> None:
        for name, value in losses.items():
            self.log(f"{stage}/{name}", value.detach(), prog_bar=name == "loss", batch_size=batch_size,
                     sync_dist=stage != "train")
