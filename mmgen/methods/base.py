"""What every method shares: lazy building, optimizer, trainable-only checkpoints, summaries."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from mmgen import sharding  # registers the "fsdp_backbones" strategy with Lightning
from mmgen.errors import ConfigError
from mmgen.methods.losses import gather_keeping_local_grad, infonce_terms, scale_gradient
from mmgen.methods.optim import Optim, build_optimizer
from mmgen.methods.stages import Stage
from mmgen.methods.trainability import ParamGroup
from mmgen.registry import Component, Registered


class MultimodalLM(Registered, pl.LightningModule, kind="method"):
    """Base of the method LightningModules (FROMAGe, GILL, MiniGPT-5).

    Subclasses receive their components in ``__init__`` (cheap: nothing loads there) and build
    them in ``configure_model``, which Lightning calls once the strategy is set up (and
    ``load_from_checkpoint`` calls before loading weights), ending it with
    :meth:`finish_configure`. Checkpoints hold trainable parameters only; frozen backbones come
    from their own configs.

    Every method starts from trained weights the same way, ``init_from`` (with ``init_reset``),
    and trains the parameter groups its run's stage names (``self.stage``, set by the
    ``mmgen.methods.stages.TrainingStages`` callback; None: the method's default groups).
    """

    def __init__(self, optim: Optim | None = None, init_from: str | None = None, init_reset: Sequence[str] = ()):
        super().__init__()
        # Records every subclass's init arguments; under LightningCLI they are stored as the
        # config that built them, so load_from_checkpoint can rebuild the components.
        with warnings.catch_warnings():  # components given as objects (not from a config) are
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")  # dropped
            self.save_hyperparameters()  # from checkpoints in on_save_checkpoint
        self.optim = optim or Optim()
        self.init_from = init_from
        self.init_reset = list(init_reset)
        self.stage: Stage | None = None  # set by the TrainingStages callback before configure_model
        self._applied_stage: Stage | None = None
        # Checkpoints omit frozen weights, so loading is non-strict; on_load_checkpoint checks
        # that exactly the trainable parameters are present instead.
        self.strict_loading = False

    # -- the method's own random draws (packing coins, CFG dropout) -----------------------------
    def init_training_rng(self, seed: int) -> None:
        """A generator for the method's training-time draws, seeded per process in ``setup``
        (each rank draws its own) and saved in checkpoints (a resumed run continues the draws)."""
        self.seed = seed
        self.training_rng = torch.Generator().manual_seed(seed)

    def setup(self, stage: str) -> None:
        self.follow_run_precision(self.trainer.precision)
        if hasattr(self, "training_rng"):
            self.training_rng.manual_seed(self.seed + self.global_rank)

    def follow_run_precision(self, precision) -> None:
        """Components with ``dtype: auto`` store their frozen weights as the run's precision says
        (mmgen.precision): called before the model is built (``setup``; ``mmgen params``)."""
        from mmgen.precision import run_storage_dtype

        dtype = run_storage_dtype(precision)
        for module in self.modules():
            if isinstance(module, Component):
                module.follow_run_precision(dtype)

    def coin(self, probability: float) -> bool:
        """True with ``probability``, from the method's own generator."""
        return probability > 0 and float(torch.rand((), generator=self.training_rng)) < probability

    # -- precomputed inputs (mmgen.data.feature_cache) ---------------------------------------------
    def cached_image_features(self, batch: dict) -> torch.Tensor | None:
        """The batch's ``image_features`` (b, 1, f) from a feature cache, after checking that this
        model's visual encoder made them (class, config, weights); None without a cache."""
        if "image_features" not in batch:
            return None
        from mmgen.data.feature_cache import check_made_by, encoder_fingerprint

        check_made_by(batch, "clip", self, lambda: encoder_fingerprint(self.visual_encoder), "visual encoder")
        return batch["image_features"]

    def _save_rng_states(self, checkpoint: dict) -> None:
        state = self.training_rng.get_state()  # uint8 (n,)
        gathered = self.all_gather(state) if self._trainer is not None and self.trainer.world_size > 1 else state[None]
        checkpoint["mmgen_rng_states"] = [s.cpu().clone() for s in gathered.reshape(-1, state.numel())]

    def _load_rng_states(self, checkpoint: dict) -> None:
        states = checkpoint.get("mmgen_rng_states")
        if not states or self._trainer is None or self.trainer.state.fn != "fit":
            return  # only a resumed fit continues the draws (not inference or evaluation)
        world = self.trainer.world_size
        if len(states) != world:
            warnings.warn(f"the checkpoint's random draws are for {len(states)} processes, this run has "
                          f"{world}: packing and CFG decisions restart from the seed")
            return
        # a copy: a stored row can be a view into the gathered (world, n) storage, and set_state
        # reads the storage from its start (a segfault or another rank's state otherwise)
        self.training_rng.set_state(states[self.global_rank].to(torch.uint8).clone())

    #: Scale the new token rows to the frozen rows' mean norm after each optimizer step
    #: (FROMAGe and GILL do; subclasses set it from their init arguments).
    rescale_new_rows: bool = False

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: a checkpoint callback saves at the batch end before
        # the module's own hook runs, and a resumed run must see the rescaled rows.
        if self.rescale_new_rows:
            self.llm.rescale_new_rows()

    @property
    def backbones_sharded(self) -> bool:
        """True under the ``fsdp_backbones`` strategy (mmgen.sharding): every process must then
        run the same sharded blocks in the same order in every step, so methods do not skip a
        backbone call on one process that another makes."""
        return isinstance(getattr(self._trainer, "strategy", None), sharding.ShardedBackbonesDDP)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Under the fsdp_backbones strategy some gradients are sharded DTensors (LoRA inside a
        # sharded block) and the rest plain tensors, a mix Lightning's clipping refuses.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_val and any(p.grad is not None and sharding.is_sharded(p.grad) for p in params):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ConfigError("with sharded backbones only gradient_clip_algorithm='norm' is supported")
            sharding.clip_grad_norm(params, float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- what trains: declared once (mmgen.methods.trainability) ---------------------------------
    def parameter_groups(self) -> dict[str, ParamGroup]:
        """Every parameter training may change, by named group (built model only). Methods
        return their groups through :meth:`staged`, so the run's stage decides which train."""
        raise NotImplementedError

    def staged(self, groups: dict[str, ParamGroup]) -> dict[str, ParamGroup]:
        """``groups`` as the run's stage trains them: its groups train, at its learning-rate
        multipliers, and the others are frozen. Without a stage: as the method declared them."""
        if self.stage is not None:
            unknown = (set(self.stage.train) | set(self.stage.lr_scale)) - set(groups)
            if unknown:
                raise ConfigError(f"training stage {self.stage.name!r} names groups {sorted(unknown)} that "
                                  f"{type(self).__name__} does not have; its groups are {sorted(groups)}")
            for name, group in groups.items():
                group.train = name in self.stage.train
                group.lr_scale = self.stage.lr_scale.get(name, 1.0)
        return groups

    def apply_trainability(self) -> None:
        """``requires_grad`` from :meth:`parameter_groups`: the grouped parameters of training
        groups, nothing else."""
        self.requires_grad_(False)
        for group in self.parameter_groups().values():
            for param in group.params:
                param.requires_grad_(group.train)
        self._applied_stage = self.stage

    def apply_stage(self, stage: Stage | None) -> None:
        """Train as ``stage`` says (None: the method's default groups), on a built model, before
        any strategy wraps it. ``TrainingStages`` sets the stage before the model is built."""
        previous, self.stage = self.stage, stage
        try:
            self.apply_trainability()
        except ConfigError:  # a stage naming groups this method lacks: the model keeps its stage
            self.stage = previous
            raise

    #: Set for a run given ``--ckpt_path`` (mmgen's CLI): the checkpoint restores every grouped
    #: tensor, so ``init_from`` is not read.
    restores_checkpoint: bool = False

    def finish_configure(self) -> None:
        """The last step of every method's ``configure_model``, once its components are built:
        the trained tensors of ``init_from``, then ``requires_grad`` from the groups and the
        run's stage. Both happen before any strategy wraps the model, so DDP sees the final
        trainable set."""
        from mmgen.components.hub import random_weights_requested

        # dry runs build random weights; a restored checkpoint brings every trained tensor
        if self.init_from and not random_weights_requested(False) and not self.restores_checkpoint:
            self.load_initial_weights(self.init_from, self.init_reset)
        self.apply_trainability()

    def load_initial_weights(self, path: str, reset: Sequence[str] = ()) -> None:
        """Copy the trained tensors of ``path`` into this model: a Lightning checkpoint of an
        mmgen run, a pretrained folder (``save_pretrained``, ``mmgen export``/``convert``) or a
        ``.safetensors`` file. Every tensor of every group not in ``reset`` must be there with
        its shape; the ``reset`` groups keep their fresh initialisation; a tensor with no place
        in this model is refused. Nothing is copied until everything is checked.

        Names are matched through peft's wrappers, which differ by adapter kind (a stage-1
        MiniGPT-5 with LoRA, a stage 2 with prefix tuning). With ``"adapter"`` in ``reset``,
        the source's adapter tensors of another kind are dropped, not merged."""
        from mmgen.pretrained import read_weights

        state = read_weights(path)  # weights-only; names the file on any fault
        params = dict(self.named_parameters())
        names = {id(p): n for n, p in params.items()}
        groups = {g: {names[id(p)] for p in group.params} for g, group in self.parameter_groups().items()}
        unknown = sorted(set(reset) - set(groups))
        if unknown:
            raise ConfigError(f"init_reset names groups {unknown} that {type(self).__name__} does not have; "
                              f"its groups are {sorted(groups)}")
        own = {_unwrapped_name(n): n for n in set().union(*groups.values())}
        state = {(k if k in params else own.get(_unwrapped_name(k), k)): v for k, v in state.items()}
        if "adapter" in reset:
            state = {k: v for k, v in state.items() if k in params or not k.startswith("llm.")}
        keep = set().union(*(groups[g] for g in groups if g not in reset))
        unexpected = sorted(set(state) - set().union(*groups.values()))
        missing = sorted(keep - set(state))
        if unexpected or missing:
            absent = sorted(g for g in groups if g not in reset and groups[g] & set(missing))
            raise ConfigError(
                f"{path} does not fit this {type(self).__name__} (init_from): unexpected {unexpected[:6]}, "
                f"missing {missing[:6]}" + (f" (groups {absent}: list a group in init_reset to start it fresh)"
                                            if absent else ""))
        for name in sorted(keep):
            if tuple(state[name].shape) != tuple(params[name].shape):
                raise ConfigError(f"{path}: {name} has shape {tuple(state[name].shape)}, this model's is "
                                  f"{tuple(params[name].shape)} (a checkpoint of another model config?)")
        with torch.no_grad():
            for name in sorted(keep):
                params[name].copy_(state[name])

    def check_sequence_length(self, length: int, what: str) -> None:
        """ConfigError when sequences of ``length`` tokens cannot fit the LLM's position table
        (found when the model is built, not as an IndexError at the first training step)."""
        config = getattr(getattr(getattr(self, "llm", None), "model", None), "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and length > limit:
            raise ConfigError(
                f"{type(self).__name__}: {what} are up to {length} tokens, but the LLM's position table holds "
                f"max_position_embeddings={limit}: raise the llm config's max_position_embeddings or lower "
                "max_text_length"
            )

    def configure_optimizers(self):
        if self.stage is not self._applied_stage:  # a stage switch within one run (TrainingStages)
            if self._trainer is not None and self.trainer.world_size > 1:
                raise ConfigError(
                    f"switching to stage {self.stage.name!r} within a multi-process run: DDP fixed the "
                    "trainable parameters when it wrapped the model. Run each stage with its own config "
                    "(the next stage's `init_from` names the previous checkpoint)"
                )
            self.apply_trainability()
        return build_optimizer(self.parameter_groups(), self.optim, self._run_length())

    def _run_length(self) -> int:
        """Optimizer steps of the run, for a linear schedule without ``total_steps`` only.

        Lightning's ``estimated_stepping_batches`` creates the training data iterator before a
        resumed run's loader state is restored, which restarts the epoch from its first batch:
        it is asked only when nothing else gives the length (``trainer.max_steps``)."""
        if self._trainer is None or self.optim.schedule != "linear" or self.optim.total_steps:
            return 0
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        total = self.trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else 0

    def trainable_state_keys(self) -> set[str]:
        """Names of the parameters checkpoints and pretrained folders store: every grouped one,
        trained in this run or not."""
        ids = {id(p) for group in self.parameter_groups().values() for p in group.params}
        return {name for name, p in self.named_parameters() if id(p) in ids}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # A model built in Python (not from a config) records its components themselves as
        # hyper-parameters; pickling them would put every frozen weight back in the file.
        hparams = checkpoint.get("hyper_parameters", {})
        checkpoint["hyper_parameters"] = {k: v for k, v in hparams.items() if not isinstance(v, torch.nn.Module)}
        if hasattr(self, "training_rng"):
            self._save_rng_states(checkpoint)
        self._save_global_rng_states(checkpoint)

    # torch's global generators (dropout, DataLoader base seeds), per process, so that a
    # resumed run draws what the uninterrupted one would have drawn.
    def _save_global_rng_states(self, checkpoint: dict) -> None:
        states = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state()
        world = self.trainer.world_size if self._trainer is not None else 1
        for key, state in list(states.items()):
            if world > 1:
                gathered = self.all_gather(state.to(self.device))  # (world, n)
                states[key] = [s.cpu().clone() for s in gathered.reshape(world, -1)]
            else:
                states[key] = [state.cpu()]
        checkpoint["mmgen_torch_rng_states"] = states

    def _load_global_rng_states(self, checkpoint: dict) -> None:
        states = checkpoint.get("mmgen_torch_rng_states")
        if not states or self._trainer is None or self.trainer.state.fn != "fit":
            return  # only a resumed fit continues the draws (not inference or evaluation)
        rank, world = self.global_rank, self.trainer.world_size
        if len(states.get("cpu", [])) != world:
            return  # _load_rng_states has warned about a changed world size
        torch.set_rng_state(states["cpu"][rank].to(torch.uint8).clone())
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"][rank].to(torch.uint8).clone())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected, found = self.trainable_state_keys(), set(checkpoint["state_dict"])
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        source = (self._trainer.ckpt_path if self._trainer is not None else None) or "checkpoint"
        params = dict(self.named_parameters())
        for name in sorted(expected & found):
            stored = checkpoint["state_dict"][name]
            if tuple(stored.shape) != tuple(params[name].shape):
                raise ConfigError(f"{source}: {name} has shape {tuple(stored.shape)}, this model's is "
                                  f"{tuple(params[name].shape)} (a checkpoint of another model config?)")
        if missing or unexpected:
            raise ConfigError(
                f"{source} does not match this model's trainable parameters: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
        if hasattr(self, "training_rng"):
            self._load_rng_states(checkpoint)
        self._load_global_rng_states(checkpoint)
        self._apply_changed_lr(checkpoint)

    def _apply_changed_lr(self, checkpoint: dict) -> None:
        """A resume whose config changes ``optim.lr``: scale the restored optimizer and scheduler
        states (which would otherwise bring the old rate back) by new / old."""
        stored = (checkpoint.get("hyper_parameters") or {}).get("optim")
        old = stored.get("lr") if isinstance(stored, dict) else getattr(stored, "lr", None)
        if old is None or not self.optim.lr or float(old) == float(self.optim.lr) or float(old) == 0:
            return
        ratio = float(self.optim.lr) / float(old)
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                for key in ("lr", "initial_lr"):
                    if key in group:
                        group[key] = group[key] * ratio
        for state in checkpoint.get("lr_schedulers", []):
            for key in ("base_lrs", "_last_lr"):
                if isinstance(state.get(key), list):
                    state[key] = [v * ratio for v in state[key]]
        warnings.warn(f"resuming with optim.lr={self.optim.lr} instead of the checkpoint's {old}: "
                      "the restored optimizer and schedule are scaled to it")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Rebuild the model from the config stored in ``checkpoint_path`` and load its trained
        tensors. The file is read weights-only (never unpickling objects), and an empty,
        truncated, foreign or non-checkpoint file raises ConfigError naming it."""
        from mmgen.checkpoints import check_stored_config, load_checkpoint

        if isinstance(checkpoint_path, (str, bytes)) or hasattr(checkpoint_path, "__fspath__"):
            if "://" not in str(checkpoint_path):
                # the checks, with the file's name in every error; the stored config may name
                # registered mmgen classes only (Lightning imports what it names)
                check_stored_config(load_checkpoint(checkpoint_path), checkpoint_path, cls)
        kwargs["weights_only"] = True
        with warnings.catch_warnings():
            # Lightning lists every frozen weight as missing: checkpoints omit them on purpose, and
            # on_load_checkpoint has checked that every trained tensor is there.
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location,
                                                hparams_file=hparams_file, strict=strict, **kwargs)

    def save_pretrained(self, directory) -> None:
        """Write this model as a pretrained folder (config, trained tensors, card): mmgen.pretrained."""
        from mmgen.pretrained import save_pretrained

        save_pretrained(self, directory)

    def push_to_hub(self, repo_id: str, **options) -> str:
        """Upload this model as a pretrained folder to a hub repository: mmgen.pretrained.push_to_hub."""
        from mmgen.pretrained import push_to_hub

        return push_to_hub(self, repo_id, **options)

    @classmethod
    def from_pretrained(cls, directory, allow_modules: tuple[str, ...] = (), revision: str | None = None) -> "MultimodalLM":
        """Build the model of a pretrained folder, local or a hub id (backbones from their
        sources). Its config may name registered mmgen components only, or classes in
        ``allow_modules``; a folder of another method is refused before anything is built."""
        from mmgen.pretrained import load_pretrained

        model = load_pretrained(directory, allow_modules=allow_modules, expected=cls, revision=revision)
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

    #: Multiply all-gathered contrastive terms by the number of processes in the objective
    #: (FROMAGe and GILL set it from their init arguments); see :meth:`contrastive_scale`.
    scale_contrastive_by_world: bool = True

    @property
    def contrastive_scale(self) -> float:
        """The factor of an all-gathered contrastive term in the objective. Each process
        computes the same loss over the global batch, but its gradient reaches only the local
        shard (the other shards are gathered copies), and DDP then AVERAGES gradients over the
        processes: the contrastive gradient would be 1/world of one device's on the same global
        batch, and the balance between the losses would depend on the GPU count. Scaling the
        term by the world size restores one device's gradients; without it (False) mmgen
        reproduces the official code's multi-GPU runs."""
        if not self.scale_contrastive_by_world or self._trainer is None:
            return 1.0
        return float(self.trainer.world_size)

    def global_infonce(self, text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor):
        """(CE_t2i, CE_i2t) over the global batch: this process's (b, e) embeddings joined with
        every other's. The temperature is shared, not sharded: every process already gets its
        whole gradient, so it is divided by :attr:`contrastive_scale` to undo the scaling."""
        return infonce_terms(
            self.gather_global_batch(text_emb),
            self.gather_global_batch(image_emb),
            scale_gradient(logit_scale, 1 / self.contrastive_scale),
        )

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


def _unwrapped_name(name: str) -> str:
    """A parameter's name without peft's wrappers, which differ by adapter kind
    (``llm.model.base_model.model.model.embed_tokens.token_adapter.x`` under LoRA,
    ``llm.model.base_model.model.embed_tokens.x`` under prefix tuning) -> ``embed_tokens.x``."""
    parts = [p for p in name.split(".") if p not in ("llm", "model", "base_model", "token_adapter")]
    return ".".join(parts)
