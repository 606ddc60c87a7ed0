"""GILL's decision stage: after GILL has converged, train its retrieve-or-generate module.

docs/gill.md. Everything of GILL stays frozen (loaded from the GILL run's checkpoint);
only ``Dropout(0.5) + Linear(hidden, 2)`` trains, on labelled prompts
(``mmgen.data.decision_prompts``), with AdamW lr 1e-3 and no weight decay.

    prompt --[BOS prompt IMG0..7] through the frozen LLM--> h[IMG0] (b, 4096)
           --DecisionHead--> logits (b, 2) of (generate, retrieve)  --> cross-entropy

As a stage config (``configs/gill_decision_tiny.yaml``): ``mmgen fit`` with this module, the
same GILL model config as the GILL run, ``gill_checkpoint`` pointing at that run's checkpoint,
and a ``DecisionPromptDataModule``. Its checkpoints hold the decision module only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmgen.components.base import OutputHead
from mmgen.components.decision_head import DecisionHead
from mmgen.errors import ConfigError
from mmgen.methods.base import MultimodalLM
from mmgen.methods.gill import GILL
from mmgen.methods.optim import Optim
from mmgen.methods.trainability import ParamGroup


class GILLDecisionStage(MultimodalLM):
    """Trains a decision module on the frozen ``[IMG0]`` hidden state of a trained GILL; batches
    are ``{"prompts": [str], "labels": (b,) long}`` (0: generate, 1: retrieve).

    Args:
        gill: The GILL model, configured as in the GILL run.
        gill_checkpoint: That run's checkpoint (trainable parameters only, as mmgen saves them).
            None: the GILL tensors must come from elsewhere (a pretrained folder of this stage,
            ``mmgen.callbacks.InitFrom``), or ``fit`` refuses to start.
        allow_untrained_gill: Train on GILL as initialised, without its trained tensors (tests).
        decision_head: Default: DecisionHead(dropout=0.5).
        optim: Default: AdamW lr 1e-3, weight decay 0, no warmup (the reference).
    """

    def __init__(
        self,
        gill: GILL,
        gill_checkpoint: str | None = None,
        decision_head: OutputHead | None = None,
        optim: Optim | None = None,
        allow_untrained_gill: bool = False,
    ):
        super().__init__(optim or Optim(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=0))
        self.gill = gill
        self.gill_checkpoint = gill_checkpoint
        self.allow_untrained_gill = allow_untrained_gill
        self.decision_head = decision_head or DecisionHead(dropout=0.5)
        # The decision stage never computes the generation loss: no generator weights needed.
        self.gill.precomputed_captions = True

    def configure_model(self) -> None:
        if self.decision_head.is_configured:
            return
        self.gill.configure_model()
        if self.gill_checkpoint is not None:
            self._load_gill(self.gill_checkpoint)
        self.gill.eval()
        self.decision_head.configure(self.gill.llm.hidden_size)
        self.apply_trainability()

    def on_fit_start(self) -> None:
        """Refuse to train on a GILL that nothing loaded trained tensors into (after callbacks
        such as InitFrom, which run first): its [IMG0] states would be noise."""
        loaded = getattr(self, "_loaded_weights_from", None)  # set by mmgen.pretrained.load_weights_into
        if self.gill_checkpoint is None and loaded is None and not self.allow_untrained_gill:
            raise ConfigError(
                "GILLDecisionStage: no trained GILL to train a decision module on: set "
                "model.init_args.gill_checkpoint to the GILL run's checkpoint (printed at the end of that run), "
                "or model.init_args.allow_untrained_gill=true to train on an untrained GILL deliberately"
            )

    def parameter_groups(self) -> dict[str, ParamGroup]:
        """The decision module alone; the GILL model is frozen."""
        return {"decision_head": ParamGroup(list(self.decision_head.parameters()))}

    def _load_gill(self, path: str) -> None:
        from mmgen.checkpoints import read_tensors

        state = read_tensors(path, "GILL checkpoint")  # weights-only; names the file on any fault
        own = self.gill.state_dict()
        for name, tensor in state.items():
            if name in own and tuple(tensor.shape) != tuple(own[name].shape):
                raise ConfigError(f"{path}: {name} has shape {tuple(tensor.shape)}, this GILL model's is "
                                  f"{tuple(own[name].shape)}")
        missing = sorted(self.gill.trainable_state_keys() - set(state))
        unknown = sorted(set(state) - set(self.gill.state_dict()))
        if missing or unknown:
            raise ConfigError(
                f"{path} is not a checkpoint of this GILL model: missing {missing[:6]}, "
                f"unexpected {unknown[:6]}"
            )
        self.gill.load_state_dict(state, strict=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.gill.eval()  # frozen: the decision module's dropout is the only stochastic part
        return self

    def logits(self, prompts: list[str]) -> torch.Tensor:
        h_img, _ = self.gill.prompt_img_states(prompts)  # (b, r, hidden), no grad
        return self.decision_head(h_img[:, 0])  # (b, 2) from the raw [IMG0] state

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _step(self, batch, stage):
        logits = self.logits(batch["prompts"])
        loss = F.cross_entropy(logits, batch["labels"])
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log_losses({"loss": loss, "accuracy": accuracy}, stage, len(batch["prompts"]))
        return loss

    # -- inference -------------------------------------------------------------------------------
    @property
    def visual_encoder(self):
        """GILL's: what a retrieval index is made and checked with (mmgen.inference.index)."""
        return self.gill.visual_encoder

    @property
    def retrieval_head(self):
        return self.gill.retrieval_head

    def answer(self, conversations, index=None, mode: str = "auto", **options):
        """GILL's answers (``GILL.answer``) with this decision module choosing, in mode "auto",
        whether each [IMG] group retrieves or generates."""
        return self.gill.answer(conversations, index=index, mode=mode, decision_head=self.decision_head, **options)

    def predict_step(self, batch, batch_idx=0):
        """As GILL's ``predict_step``, deciding with this module."""
        return self.gill.predict_step({**batch, "options": {**(batch.get("options") or {}),
                                                           "decision_head": self.decision_head}}, batch_idx)

    @torch.no_grad()
    def decide(self, prompts: list[str]) -> list[str]:
        """"retrieve" or "generate" for each prompt."""
        h_img, _ = self.gill.prompt_img_states(prompts)
        return self.decision_head.decide(h_img[:, 0])
