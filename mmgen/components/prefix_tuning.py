"""Prefix tuning through peft, trained together with the new token rows (MiniGPT-5's alternative
to LoRA in stage 2: 5 virtual tokens, projected).

Two peft limits are worked around here, in one place:

- peft's prefix-tuning config cannot also train chosen token rows (only LoRA's has
  ``trainable_token_indices``), so the rows are injected first as peft trainable-token layers and
  the prefix model is wrapped around them.
- generating through the peft wrapper fails with ``inputs_embeds``, and handing its prefix cache
  to the base model's ``generate`` silently decodes wrong tokens. mmgen does not
  use ``generate`` with a prefix: :meth:`prefix_cache` gives the virtual keys/values and
  ``CausalLM.forward_cached`` decodes through the base model with them at the front of the cache,
  the prefix columns of the attention mask and positions counted as in training. Tests compare it
  with a step-by-step decode through peft's own training forward.
"""

from __future__ import annotations

import warnings

from torch import nn

from mmgen.components.base import PeftAdapter


class PrefixTuning(PeftAdapter):
    """Learned keys/values for ``num_virtual_tokens`` positions in front of every sequence, in
    every layer, produced by an MLP from a small embedding (``prefix_projection``).

    Args:
        num_virtual_tokens: Prefix length (the reference: 5).
        prefix_projection: Reparametrise the prefix through an MLP (the reference: True).
        encoder_hidden_size: Hidden width of that MLP (the reference: 1024).
    """

    def __init__(self, num_virtual_tokens: int = 5, prefix_projection: bool = True, encoder_hidden_size: int = 1024):
        self.num_virtual_tokens = num_virtual_tokens
        self.prefix_projection = prefix_projection
        self.encoder_hidden_size = encoder_hidden_size

    def peft_config(self, token_targets: dict[str, list[int]]):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.prefix_projection,
            encoder_hidden_size=self.encoder_hidden_size,
        )

    def wrap(self, model: nn.Module, token_targets: dict[str, list[int]]) -> nn.Module:
        from peft import TrainableTokensConfig, get_peft_model, inject_adapter_in_model

        if token_targets:
            indices = sorted({i for ids in token_targets.values() for i in ids})
            config = TrainableTokensConfig(target_modules=list(token_targets), token_indices=indices)
            model = inject_adapter_in_model(config, model)
        with warnings.catch_warnings():  # "modify a model with PEFT for a second time": intended
            warnings.filterwarnings("ignore", message=".*PEFT for a second time.*")
            model = get_peft_model(model, self.peft_config(token_targets))
        for name, param in model.named_parameters():  # the prefix wrapper froze the token rows
            if "trainable_tokens_delta" in name:
                param.requires_grad_(True)
        return model

    def prefix_cache(self, model: nn.Module, batch_size: int):
        return model.get_prompt(batch_size)  # DynamicCache of num_virtual_tokens positions
