"""Any transformers causal LM as a frozen backbone whose new token rows train through peft."""

from __future__ import annotations

import torch
from torch import nn

from mmgen.components.base import LLMBackbone, LMOutput, NewToken, PeftAdapter
from mmgen.components.hub import (
    KNOWN_TOKENIZER_LENGTHS, random_weights_requested, require_local_folder, resolve_config, resolve_name, seeded,
)
from mmgen.errors import ConfigError
from mmgen.quiet import quiet_peft_wrap
from mmgen.precision import storage_dtype


class CausalLM(LLMBackbone):
    """A causal LM (OPT, LLaMA/Vicuna, or any ``AutoModelForCausalLM``), frozen.

    Only the rows of the tokens a method adds train (input rows, and output rows where the LM head
    is not tied to them), through peft's trainable-token layers: the original matrix is never
    touched, so frozen rows stay bit-identical under weight decay and the optimizer keeps state for
    the new rows alone (the reference masks gradients of the whole matrix instead, and AdamW's
    decoupled weight decay still shrinks every frozen row).

    Args:
        name_or_path: Hub id or local folder of a pretrained causal LM.
        config: Config values for a randomly initialised LM (tests, dry runs), with ``model_type``;
            with ``name_or_path`` too, they override that model's config.
        random_weights: Build ``name_or_path``'s architecture with random weights (no download
            when its config is bundled in ``mmgen.components.hub``).
        tokenizer: Hub id or folder of the tokenizer. Default: ``name_or_path``.
        tokenizer_kwargs: Further arguments of ``AutoTokenizer.from_pretrained`` (``legacy``,
            ``add_prefix_space``, ``padding_side``, ...). transformers 5 always builds the fast
            tokenizer; where an official model used the slow one (MiniGPT-5's legacy LLaMA
            tokenizer), the method declares its new tokens with the slow tokenizer's strip
            behaviour (``NewToken.lstrip``), which gives the official ids.
        adapter: A peft adapter (LoRA, prefix tuning) trained with the new token rows. None: only
            the new token rows train.
        dtype: dtype of the frozen weights ("float32", "bfloat16", "float16"); "auto": the
            run's precision decides (mmgen.precision).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        seed: Seed of random builds: the same config always gives the same random weights.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict | None = None,
        random_weights: bool = False,
        tokenizer: str | None = None,
        tokenizer_kwargs: dict | None = None,
        adapter: PeftAdapter | None = None,
        dtype: str = "auto",
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.seed = seed
        self.name_or_path = resolve_name(name_or_path)
        self.config_overrides = config
        self.random_weights = random_weights
        self.tokenizer_name = resolve_name(tokenizer or name_or_path)
        self.tokenizer_kwargs = dict(tokenizer_kwargs or {})
        self.adapter = adapter
        self.dtype_name, self.dtype = dtype, storage_dtype(dtype)
        self.gradient_checkpointing = gradient_checkpointing
        self.model: nn.Module | None = None
        self.new_token_ids: list[int] = []  # rows that train (the method's trainable new tokens)
        self.added_token_ids: list[int] = []  # every token the method added, frozen ones too

    # -- building --------------------------------------------------------------------------------
    def configure(self, new_tokens: list[NewToken | str] = (), new_token_init: str = "random") -> None:
        """Load (or randomly build) the LM and tokenizer, add ``new_tokens`` and wrap in peft.

        ``new_tokens`` are added in order (a plain string is a trainable special token); only
        the trainable ones' rows train. ``new_token_init``: "random" (the resized rows as
        transformers initialises them, as FROMAGe/GILL do) or "mean" (the mean of the existing
        rows, as MiniGPT-5 does).
        """
        if self.model is not None:
            return
        from peft import TrainableTokensConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.tokenizer = self._load_tokenizer()
        if random_weights_requested(self.random_weights) or self.name_or_path is None:
            config = resolve_config(self.name_or_path, self.config_overrides)
            with seeded(self.seed):
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        else:
            require_local_folder(self.name_or_path, "LLM")
            model = AutoModelForCausalLM.from_pretrained(
                self.name_or_path, dtype=self.dtype, **(self.config_overrides or {})
            )
        model.requires_grad_(False)
        tokens = [t if isinstance(t, NewToken) else NewToken(t) for t in new_tokens]
        self.added_token_ids = self._add_tokens(model, tokens, new_token_init)
        self.new_token_ids = [i for i, t in zip(self.added_token_ids, tokens) if t.trainable]
        if self.gradient_checkpointing:
            # transformers recomputes a layer only while it is in training mode, and the frozen LM
            # runs in eval mode (no dropout). So: no dropout at all, then its layers may train.
            _disable_dropout(model)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()

        targets = self._token_targets(model)
        with quiet_peft_wrap():  # peft's notices about cases mmgen does not use (mmgen.quiet)
            if self.adapter is not None:
                model = self.adapter.wrap(model, targets)
            elif self.new_token_ids:
                names = list(targets)
                model = get_peft_model(
                    model, TrainableTokensConfig(target_modules=names, token_indices=self.new_token_ids)
                )
        for param in model.parameters():
            if param.requires_grad:  # new rows / adapter weights train in fp32 whatever the LM's dtype
                param.data = param.data.float()
        self.model = model
        # What peft made trainable, by group: the new token rows and the adapter's own weights.
        self._group_names = {"tokens": [], "adapter": []}
        for name, param in model.named_parameters():
            if param.requires_grad:
                self._group_names["tokens" if "trainable_tokens" in name else "adapter"].append(name)
        self._frozen_row_norm = None
        self.train(self.training)

    def _load_tokenizer(self):
        from mmgen.components.tokenizers import load_tokenizer  # names a missing sentencepiece

        if self.tokenizer_name is None:
            return None
        try:
            return load_tokenizer(self.tokenizer_name, **self.tokenizer_kwargs)
        except (OSError, ValueError):
            if random_weights_requested(self.random_weights):
                return None  # random full-size build without tokenizer files: ids from the table
            raise

    def _add_tokens(self, model: nn.Module, tokens: list[NewToken], init: str) -> list[int]:
        if not tokens:
            return []
        texts = [t.text for t in tokens]
        if self.tokenizer is not None:
            from transformers import AddedToken

            for token in tokens:  # one at a time: ids follow the declared order
                added = AddedToken(token.text, special=token.special, lstrip=token.lstrip,
                                   normalized=not token.special and not token.lstrip)
                if token.special:
                    self.tokenizer.add_special_tokens(
                        {"additional_special_tokens": [added]}, replace_extra_special_tokens=False
                    )
                else:
                    self.tokenizer.add_tokens([added])
            ids = self.tokenizer.convert_tokens_to_ids(texts)
            n_rows = len(self.tokenizer)
        else:
            base = KNOWN_TOKENIZER_LENGTHS.get(self.name_or_path)
            if base is None:
                raise ConfigError(f"no tokenizer for {self.name_or_path!r}: give `tokenizer`")
            ids = list(range(base, base + len(tokens)))
            n_rows = base + len(tokens)
            self._token_ids_without_tokenizer = dict(zip(texts, ids))
        old_rows = model.get_input_embeddings().weight.shape[0]
        # Resize to the tokenizer's length, as the reference does (OPT's 50272-row matrix shrinks
        # to 50267 for FROMAGe and grows to 50274 for GILL). mean_resizing=False: deterministic.
        model.resize_token_embeddings(n_rows, mean_resizing=False)
        if init == "mean":
            with torch.no_grad():
                for matrix in {id(m): m for m in self._token_matrices(model)}.values():
                    matrix[ids] = matrix[: min(old_rows, min(ids))].mean(0, keepdim=True)
        elif init != "random":
            raise ConfigError(f"new_token_init must be 'random' or 'mean', not {init!r}")
        return list(ids)

    @staticmethod
    def _token_matrices(model: nn.Module) -> list[torch.Tensor]:
        matrices = [model.get_input_embeddings().weight]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not matrices[0]:
            matrices.append(output.weight)
        return matrices

    def _token_targets(self, model: nn.Module) -> dict[str, list[int]]:
        """{module name: new row ids} for the input embedding and, if untied, the LM head."""
        if not self.new_token_ids:
            return {}
        by_module = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
        targets = {by_module[id(model.get_input_embeddings())]: self.new_token_ids}
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            targets[by_module[id(output)]] = self.new_token_ids
        return targets

    def _token_layers(self) -> list[nn.Module]:
        """peft's trainable-token layers holding the new rows (a tied LM head shares its rows)."""
        return [
            m for m in self.model.modules()
            if hasattr(m, "trainable_tokens_delta") and getattr(m, "tied_adapter", None) is None
        ]

    @torch.no_grad()
    def rescale_new_rows(self) -> None:
        """Scale each new row to the mean L2 norm of the original rows (FROMAGe and GILL do this
        after every optimizer step, so the new tokens stay at the scale the LM was trained on)."""
        layers = self._token_layers()
        if not layers:
            return
        if self._frozen_row_norm is None:
            weight = layers[0].base_layer.weight
            keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            keep[self.new_token_ids] = False
            self._frozen_row_norm = weight[keep].float().norm(dim=-1).mean()
        for layer in layers:
            for rows in layer.trainable_tokens_delta.values():
                rows.copy_(nn.functional.normalize(rows, dim=-1) * self._frozen_row_norm.to(rows))

    # -- training mode ---------------------------------------------------------------------------
    def train(self, mode: bool = True):
        # The frozen LM runs without dropout, as in the reference (in eval mode, or in training
        # mode with every dropout probability 0 when its activations are recomputed); an
        # adapter's own stochastic parts (LoRA dropout) follow `mode`.
        super().train(mode)
        if self.model is not None:
            self.model.train(mode and self.gradient_checkpointing)  # dropout is off either way
            if self.adapter is not None:
                self.adapter.set_train_mode(self.model, mode)
        return self

    # -- using -----------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def hidden_size(self) -> int:
        """Width of the last hidden state (what the LM head reads)."""
        return self.model.get_output_embeddings().weight.shape[1]

    def token_id(self, token: str) -> int:
        if self.tokenizer is None:
            return self._token_ids_without_tokenizer[token]
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ConfigError(f"token {token!r} is not in the tokenizer of {self.tokenizer_name}")
        return token_id

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)  # (b, t) -> (b, t, d)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """What can train, by group: ``tokens`` (the new token rows) and ``adapter`` (LoRA or
        prefix weights; empty without an adapter). Training stages switch groups on and off."""
        params = dict(self.model.named_parameters())
        return {group: [params[n] for n in names] for group, names in self._group_names.items()}

    def forward_cached(self, inputs_embeds, attention_mask, past_key_values=None):
        """One step of a decoding loop with a KV cache: ``(LMOutput, past_key_values)``.

        Runs the base model (LoRA layers and token rows live inside it); a prefix adapter's
        virtual keys/values start the cache, and ``attention_mask`` (b, past + t) covers the real
        positions only, as in :meth:`forward`. Positions count on from the virtual tokens, as in
        peft's training forward, and skip left padding.
        """
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        b = inputs_embeds.shape[0]
        n_virtual = 0
        if self.adapter is not None:
            prefix = self.adapter.prefix_cache(self.model, b)
            if prefix is not None:
                n_virtual = prefix.get_seq_length()
                past_key_values = prefix if past_key_values is None else past_key_values
        mask = attention_mask
        if n_virtual:
            mask = torch.cat([attention_mask.new_ones(b, n_virtual), attention_mask], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]  # (b, t)
        out = model(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past_key_values,
            use_cache=True,
            output_hidden_states=True,
        )
        return LMOutput(loss=None, logits=out.logits, hidden=out.hidden_states[-1]), out.past_key_values

    def forward(self, inputs_embeds, attention_mask, labels=None) -> LMOutput:
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            labels=labels,
            output_hidden_states=True,
        )
        return LMOutput(loss=out.loss, logits=out.logits, hidden=out.hidden_states[-1])


def _disable_dropout(model: nn.Module) -> None:
    """Every dropout probability of ``model`` to 0: dropout modules and the float attributes
    (``dropout``, ``attention_dropout``, OPT's ``layerdrop``, ...) that transformers layers use
    in training mode."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if ("dropout" in name or "layerdrop" in name) and isinstance(value, float):
                setattr(module, name, 0.0)
