"""Training stages as a callback: MiniGPT-5's two (docs/minigpt5.md) and GILL's decision stage
(docs/gill.md).

A :class:`Stage` names the parameter groups that train, their learning-rate multipliers and
whether the caption loss is on. The groups are declared by the method's ``parameter_groups()``
(MiniGPT-5: ``vokens`` and ``adapter`` by the LLM, ``fc``, ``transformer`` and ``queries`` by the
voken mapper; GILL: ``tokens``, ``visual_prefix``, ``retrieval_head``, ``gen_mapper``,
``decision_head``); a stage only selects them (``MultimodalLM.staged``). MiniGPT-5's adapter
(LoRA or prefix) is always built, so parameter names are the same in both stages: an untrained
LoRA is the identity (its B is zero), which is how stage 2 "starts fresh LoRA on top of stage 1".

    uas (MiniGPT-5 stage 1): vokens, fc, transformer, queries; fc/transformer/queries at 10x lr; caption loss
    mls (MiniGPT-5 stage 2): adapter, vokens, transformer; all at the base lr; no caption loss
    decision (GILL, after GILL): decision_head alone, on labelled prompts

:class:`TrainingStages` sets the stage before the model is built and, with ``switch_steps``,
switches within one run on one process (rebuilding the optimizer and its schedule, as a
separate run would start). Across runs, the next stage's config names the previous checkpoint
in the method's ``init_from``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from mmgen.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    train: tuple[str, ...]  # parameter groups that train
    lr_scale: dict[str, float] = field(default_factory=dict)  # group -> multiplier of the base lr
    caption_loss: bool = False


STAGES: dict[str, Stage] = {
    "uas": Stage("uas", ("vokens", "fc", "transformer", "queries"),
                 {"fc": 10.0, "transformer": 10.0, "queries": 10.0}, caption_loss=True),
    "mls": Stage("mls", ("adapter", "vokens", "transformer"), {}, caption_loss=False),
    "decision": Stage("decision", ("decision_head",)),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown training stage {name!r}; stages are {sorted(STAGES)}")
    return STAGES[name]


def register_stage(stage: Stage) -> None:
    """Make another stage available to configs by name (research code)."""
    STAGES[stage.name] = stage


class TrainingStages(Callback):
    """Which stage trains when.

    Args:
        stages: Stage names in order, e.g. ``["uas"]``, ``["mls"]`` or ``["uas", "mls"]``.
        switch_steps: Optimizer step at which each following stage starts (one per stage after
            the first), e.g. ``[1000]``.
    """

    def __init__(self, stages: list[str] = ("uas",), switch_steps: list[int] = ()):
        self.stages = [get_stage(s) for s in stages]
        self.switch_steps = list(switch_steps)
        if not self.stages:
            raise ConfigError("TrainingStages needs at least one stage")
        if len(self.switch_steps) != len(self.stages) - 1 or self.switch_steps != sorted(self.switch_steps):
            raise ConfigError(
                f"TrainingStages: {len(self.stages)} stages need {len(self.stages) - 1} increasing "
                f"switch_steps, got {self.switch_steps}"
            )
        self.index = 0
        self._module = None

    def stage_at(self, step: int) -> int:
        return sum(step >= s for s in self.switch_steps)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Runs before configure_model, which applies the stage (requires_grad, lr scales) before
        # any strategy wraps the model.
        if len(self.stages) > 1 and trainer.world_size > 1:
            raise ConfigError(
                "TrainingStages: a stage switch within one run works on one process only (DDP fixes "
                "the trainable parameters when it wraps the model); run each stage with its own "
                "config, the next stage's `init_from` naming the previous checkpoint"
            )
        self._module = pl_module
        pl_module.stage = self.stages[self.index]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state_dict: dict) -> None:
        # Resuming: restored before the optimizer is built, so it is built for this stage.
        self.index = int(state_dict["index"])
        if self._module is not None:
            self._module.stage = self.stages[self.index]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        index = self.stage_at(trainer.global_step)
        if index != self.index:
            self.index = index
            pl_module.stage = self.stages[index]
            trainer.strategy.setup_optimizers(trainer)  # configure_optimizers applies the stage
            rank_zero_info(f"step {trainer.global_step}: training stage {self.stages[index].name}")
