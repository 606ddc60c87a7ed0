"""LoRA through peft, trained together with the new token rows."""

from __future__ import annotations

from torch import nn

from mmgen.components.base import PeftAdapter


class LoRA(PeftAdapter):
    """Low-rank adapters on the LLM's attention projections (MiniGPT-5 stage 2: r=8, alpha=16,
    dropout 0.05 on q_proj and v_proj).

    Args:
        r: Rank of each update.
        alpha: Scale numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter input; the only stochastic part of the training forward.
        target_modules: Names of the linear layers to adapt.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.05,
        target_modules: list[str] = ("q_proj", "v_proj"),
    ):
        self.r = r
        self.alpha = alpha
        self.dropout = dropout
        self.target_modules = list(target_modules)

    def peft_config(self, token_targets: dict[str, list[int]]):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            trainable_token_indices=token_targets or None,
        )

    def set_train_mode(self, model: nn.Module, mode: bool) -> None:
        for name, module in model.named_modules():
            if name.endswith("lora_dropout"):
                module.train(mode)
