"""GILL (Koh et al., 2023): a frozen LLM that captions images, retrieves them and generates them.

docs/gill.md. Trainable: the visual prefix (4 tokens), the two retrieval
projections, the temperature, the GILLMapper and the r=8 [IMG] rows (50.1M parameters at
OPT-6.7B + CLIP ViT-L/14 + SD v1.5).

    images --CLIP (frozen)--> pooled (b, 1, 1024) --prefix--> (b, 4, 4096)
    captioning:  [prefix][BOS caption][IMG0..7]           --LLM--> CE_cap ([IMG] masked)
    text only:   [BOS caption IMG0][IMG1..7]              --LLM--> CE_img (caption + [IMG0] targets),
                                                                   h[IMG0..7] (b, 8, 4096)
    retrieval:   text_proj(h[IMG0]) vs image_proj(pooled), all-gathered InfoNCE
    generation:  mapper(h[IMG0..7] + e[IMG0..7]) (b, 77, 768) vs SD text encoder(caption)
                 L_gen = per-token L2 distance, mean over batch and the 77 positions
    L = CE_cap + 0.5 * CE_ret + 0.5 * CE_gen + (CE_t2i + CE_i2t) / 2 + L_gen

The reference runs the text-only forward twice (once as "retrieval", once as "generation"),
each mode drawing its own packing coin. When both coins agree the inputs are identical and, the
LLM being frozen, so are both forwards: one forward then serves both (CE_ret = CE_gen), which
saves a third of the LLM work in half of the steps and all of them without packing.

The decision stage (after GILL has converged; ``configs/gill_decision_tiny.yaml``) trains the
retrieve-or-generate module alone, on labelled prompts (``mmgen.data.decision_prompts``),
everything else frozen and loaded from the GILL run's checkpoint (``init_from``):

    [BOS prompt][IMG0..7] --LLM--> h[IMG0] (b, 4096) --decision_head--> (b, 2) --> CE(label)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmgen.components.base import ImageGenerator, InputProjection, LLMBackbone, NewToken, OutputHead, VisualEncoder
from mmgen.components.gill_mapper import GILLMapper
from mmgen.components.retrieval_head import RetrievalHead
from mmgen.components.visual_prefix import LinearVisualPrefix
from mmgen.data.interleave import Interleaved, collate
from mmgen.errors import ConfigError, DataError
from mmgen.methods.answering import GILLAnswers
from mmgen.methods.base import MultimodalLM
from mmgen.methods.optim import Optim
from mmgen.methods.trainability import ParamGroup
from mmgen.methods.retrieval_metrics import RetrievalMetrics


def img_tokens(n: int) -> list[str]:
    return [f"[IMG{i}]" for i in range(n)]


def vocabulary(n: int) -> list[NewToken]:
    """The official vocabulary: OPT's tokenizer + <|image|> (a frozen row, never used in
    training) + [IMG0..n-1] (plain added tokens): ids 50265 and 50266.. for OPT. The extra
    softmax row is part of every loss, and the [IMG] rows are where released weights belong."""
    return [NewToken("<|image|>", trainable=False)] + [NewToken(t, special=False) for t in img_tokens(n)]


def per_token_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GILL's generation loss: the L2 distance (not squared) between matching tokens, averaged
    over the batch and every position. pred, target: (b, 77, d)."""
    return (pred - target).pow(2).sum(dim=-1).sqrt().mean()


class GILL(GILLAnswers, RetrievalMetrics, MultimodalLM):
    """GILL as a LightningModule; batches are ``{"images": (b, 3, h, w), "captions": [str]}``,
    plus ``"caption_embeddings": (b, 77, d)`` when they come from a caption-embedding cache
    (``mmgen cache-captions``; ``mmgen.data.caption_cache``).

    Args:
        llm: Frozen causal LM; gains the ``[IMG0..r-1]`` tokens.
        visual_encoder: Frozen image encoder giving pooled features (CLIP ViT-L/14).
        image_generator: Frozen text-to-image model (SD v1.5): its text encoder gives the
            generation targets when batches carry none; it generates images at inference.
        visual_prefix: Features -> LLM input embeddings. Default: LinearVisualPrefix(n_tokens=4).
        retrieval_head: Text ([IMG0] hidden state) and image projections and temperature.
            Default: RetrievalHead(256).
        gen_mapper: [IMG] hidden states -> generator conditioning. Default: GILLMapper().
        n_img_tokens: r, the number of [IMG] tokens (8 in the reference).
        max_text_length: Tokens per caption including BOS and the r [IMG] tokens; a longer
            caption is cut so that the last r tokens are [IMG0..r-1].
        pack_probability: Chance, per mode (captioning, retrieval, generation: three draws,
            as the reference), that a training batch's sequences are packed in pairs (0.5).
        precomputed_captions: Batches carry ``caption_embeddings`` from a cache; the generator's
            text encoder is then never loaded (only its config is read). False: it is loaded and
            used for batches without them.
        rescale_new_rows: After each optimizer step, scale the [IMG] rows to the mean norm of
            the frozen rows, as the reference does.
        scale_contrastive_by_world: Under DDP, multiply the all-gathered contrastive term by
            the number of processes so that its gradients equal one device's on the global
            batch (DDP averages gradients; the official code did not scale, so with W GPUs its
            contrastive gradient was 1/W of that: False reproduces it).
        optim: AdamW and schedule (reference: lr 1e-3, betas (0.9, 0.95), eps 1e-8, 2000 warmup
            steps, x0.1 at 10K steps; gradient clipping 1.0 is the trainer's ``gradient_clip_val``).
            Weight decay 0: the reference sets 0.01 on pure bf16 weights, where a step's decay
            (lr x 0.01 x w) is below bf16's precision and never changes a weight.
        seed: Seed of the packing decisions (process r draws from seed + r).
        decision_head: The retrieve-or-generate module (``DecisionHead``: Dropout(0.5) +
            Linear(hidden, 2)), trained by the ``decision`` stage and frozen otherwise; answers
            in mode "auto" ask it. None: no decision module.
        init_from: Trained tensors to start from: a checkpoint of an mmgen run, a pretrained
            folder or a ``.safetensors`` file (the decision stage: the GILL run's checkpoint).
            Ignored in dry runs.
        init_reset: Groups that keep their fresh initialisation (the decision stage:
            ``decision_head``, which the GILL run did not have).
    """

    def __init__(
        self,
        llm: LLMBackbone,
        visual_encoder: VisualEncoder,
        image_generator: ImageGenerator | None = None,
        visual_prefix: InputProjection | None = None,
        retrieval_head: OutputHead | None = None,
        gen_mapper: OutputHead | None = None,
        n_img_tokens: int = 8,
        max_text_length: int = 32,
        pack_probability: float = 0.5,
        precomputed_captions: bool = False,
        rescale_new_rows: bool = True,
        scale_contrastive_by_world: bool = True,
        optim: Optim | None = None,
        seed: int = 0,
        decision_head: OutputHead | None = None,
        init_from: str | None = None,
        init_reset: list[str] = (),
    ):
        super().__init__(optim or Optim(
            lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, warmup_steps=2000,
            schedule="step", decay_steps=(10_000,), decay_factor=0.1,
        ), init_from, init_reset)
        if max_text_length <= n_img_tokens + 1:
            raise ConfigError(f"max_text_length={max_text_length} leaves no room for text and {n_img_tokens} [IMG] tokens")
        self.llm = llm
        self.visual_encoder = visual_encoder
        self.image_generator = image_generator
        self.visual_prefix = visual_prefix or LinearVisualPrefix(n_tokens=4)
        self.retrieval_head = retrieval_head or RetrievalHead(embed_dim=256)
        self.gen_mapper = gen_mapper or GILLMapper()
        self.n_img_tokens = n_img_tokens
        self.max_text_length = max_text_length
        self.pack_probability = pack_probability
        self.precomputed_captions = precomputed_captions
        self.rescale_new_rows = rescale_new_rows
        self.scale_contrastive_by_world = scale_contrastive_by_world
        self.decision_head = decision_head
        self.init_training_rng(seed)

    def configure_model(self) -> None:
        self.llm.configure(new_tokens=vocabulary(self.n_img_tokens), new_token_init="random")
        self.visual_encoder.configure()
        self.visual_prefix.configure(self.visual_encoder.feature_dim, self.llm.embed_dim)
        self.retrieval_head.configure(self.llm.hidden_size, self.visual_encoder.feature_dim)
        out_dim = None
        if self.image_generator is not None:
            # Training needs at most the text encoder (the targets; not the decision stage); UNet
            # and VAE load when images are generated.
            needs_targets = not (self.precomputed_captions or self.deciding)
            self.image_generator.configure(parts=("text_encoder",) if needs_targets else ())
            out_dim = self.image_generator.text_embed_dim
        self.gen_mapper.configure(self.llm.hidden_size, out_dim)
        self.img_ids = [self.llm.token_id(t) for t in img_tokens(self.n_img_tokens)]
        self.check_sequence_length(2 * (self.visual_prefix.n_tokens + self.max_text_length),
                                   f"packed training sequences (2 x ({self.visual_prefix.n_tokens} visual + "
                                   f"max_text_length={self.max_text_length}))")
        if self.decision_head is not None:
            self.decision_head.configure(self.llm.hidden_size)
        self.finish_configure()
        if self.deciding:
            self._check_decision_stage()

    def parameter_groups(self) -> dict[str, ParamGroup]:
        """The [IMG] rows (no weight decay: one embedding each), the visual prefix, the
        retrieval projections with the temperature, and the GILLMapper: 50.1M at full size;
        the decision module, if any, trains only in the decision stage (8,194 more)."""
        groups = {
            "tokens": ParamGroup(self.llm.parameter_groups()["tokens"], weight_decay=False),
            "visual_prefix": ParamGroup(list(self.visual_prefix.parameters())),
            "retrieval_head": ParamGroup(list(self.retrieval_head.parameters())),
            "gen_mapper": ParamGroup(list(self.gen_mapper.parameters())),
        }
        if self.decision_head is not None:
            groups["decision_head"] = ParamGroup(list(self.decision_head.parameters()), train=False)
        return self.staged(groups)

    # -- the decision stage ----------------------------------------------------------------------
    @property
    def deciding(self) -> bool:
        """True in the decision stage: the decision module trains on labelled prompts."""
        return self.stage is not None and "decision_head" in self.stage.train

    def _check_decision_stage(self) -> None:
        from mmgen.components.hub import random_weights_requested

        if set(self.stage.train) != {"decision_head"}:
            raise ConfigError(f"training stage {self.stage.name!r}: the decision module trains alone (on "
                              f"labelled prompts), not with {sorted(set(self.stage.train) - {'decision_head'})}")
        if not self.init_from and not random_weights_requested(False) and not self.restores_checkpoint:
            raise ConfigError("GILL's decision stage trains on the [IMG0] states of a trained GILL: set "
                              "model.init_args.init_from to the GILL run's checkpoint (printed at the end of "
                              "that run) or pretrained folder")

    def decision_logits(self, prompts: list[str]) -> torch.Tensor:
        """(b, 2) logits of (generate, retrieve) from each prompt's raw [IMG0] state."""
        h_img, _ = self.prompt_img_states(prompts)  # (b, r, hidden), no grad: GILL is frozen here
        return self.decision_head(h_img[:, 0])

    def decision_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Cross-entropy and accuracy of a batch ``{"prompts": [str], "labels": (b,) long}``
        (0: generate, 1: retrieve)."""
        logits = self.decision_logits(batch["prompts"])
        labels = batch["labels"].to(logits.device)
        return {"loss": F.cross_entropy(logits, labels), "accuracy": (logits.argmax(-1) == labels).float().mean()}

    @torch.no_grad()
    def decide(self, prompts: list[str]) -> list[str]:
        """"retrieve" or "generate" for each prompt, by the decision module."""
        if self.decision_head is None:
            raise ConfigError("this GILL has no decision module (model.init_args.decision_head)")
        h_img, _ = self.prompt_img_states(prompts)
        return self.decision_head.decide(h_img[:, 0])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.deciding and mode:  # frozen GILL: the decision module's dropout is the only noise
            for name, child in self.named_children():
                if name != "decision_head":
                    child.eval()
        return self

    # -- inputs ----------------------------------------------------------------------------------
    @property
    def _pad_id(self) -> int:
        tokenizer = self.llm.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def caption_ids(self, caption: str) -> list[int]:
        """BOS + caption tokens, cut so that with the r [IMG] tokens there are max_text_length."""
        return self.sequence_format().caption_ids(caption)

    def caption_sequences(self, ids: list[list[int]], pack: bool) -> list[list]:
        """[prefix][BOS caption][IMG0..r-1] (``mmgen.methods.formats.GILLFormat``)."""
        return self.sequence_format().caption_sequences(ids, pack)

    def text_sequences(self, ids: list[list[int]], pack: bool) -> list[list]:
        """[BOS caption IMG0][IMG1..r-1] (``mmgen.methods.formats.GILLFormat``)."""
        return self.sequence_format().text_sequences(ids, pack)

    def img_states(self, seq: Interleaved, hidden: torch.Tensor, embeds: torch.Tensor):
        """Hidden states and input embeddings at every [IMG0..r-1] group, in order of appearance
        (row-major: example order, packed or not): (n, r, hidden), (n, r, d)."""
        rows, cols = (seq.input_ids == self.img_ids[0]).nonzero(as_tuple=True)  # (n,), (n,)
        positions = cols[:, None] + torch.arange(self.n_img_tokens, device=cols.device)  # (n, r)
        return hidden[rows[:, None], positions], embeds[rows[:, None], positions]

    # -- the objective ---------------------------------------------------------------------------
    def compute_losses(
        self,
        images: torch.Tensor | None,
        captions: list[str],
        caption_embeddings: torch.Tensor | None = None,
        pack_caption: bool = False,
        pack_ret: bool = False,
        pack_gen: bool = False,
        cache_name: str | None = None,
        share_text_forward: bool = True,
        features: torch.Tensor | None = None,
    ):
        """Every loss term of a step and its retrieval embeddings: (losses, text embeddings
        (b, e), image embeddings (b, e)). ``losses``: caption, ret_lm, gen_lm, t2i, i2t,
        contrastive (= (t2i + i2t) / 2), gen and loss (their weighted sum).

        ``pack_*``: the packing coin of each mode. ``share_text_forward=False`` runs the
        retrieval and generation forwards separately even when their inputs are the same (the
        reference's way; for parity checks and benchmarks). ``features``: the encoder's pooled
        features (b, 1, f) from a feature cache, in place of ``images``."""
        features = self.visual_encoder(images) if features is None else features.to(self.device)  # (b, 1, f)
        prefix = self.visual_prefix(features)  # (b, k, d)
        device = prefix.device
        ids = [self.caption_ids(c) for c in captions]

        cap = collate(self.caption_sequences(ids, pack_caption), self._pad_id, device)
        cap_out = self.llm(cap.embed(self.llm.embed, prefix), cap.attention_mask, cap.labels)

        ret_lm, h_ret, e_ret = self.text_forward(ids, pack_ret)  # (b, r, h), (b, r, d)
        if pack_gen == pack_ret and share_text_forward:
            gen_lm, h_gen, e_gen = ret_lm, h_ret, e_ret
        else:
            gen_lm, h_gen, e_gen = self.text_forward(ids, pack_gen)  # (b, r, h), (b, r, d)

        text_emb = self.retrieval_head.embed_text(h_ret[:, 0])  # (b, e), from [IMG0]
        image_emb = self.retrieval_head.embed_image(features)  # (b, e)
        t2i, i2t = self.global_infonce(text_emb, image_emb, self.retrieval_head.logit_scale)

        mapped = self.gen_mapper(h_gen, e_gen)  # (b, 77, out_dim)
        target = self.caption_targets(captions, caption_embeddings, mapped.shape, cache_name)
        gen = per_token_l2(mapped, target.to(device=device, dtype=mapped.dtype))

        losses = {"caption": cap_out.loss, "ret_lm": ret_lm, "gen_lm": gen_lm, "t2i": t2i, "i2t": i2t,
                  "contrastive": (t2i + i2t) / 2, "gen": gen}
        losses["loss"] = (
            losses["caption"] + 0.5 * ret_lm + 0.5 * gen_lm + self.contrastive_scale * losses["contrastive"] + gen
        )
        return losses, text_emb, image_emb

    def cached_caption_embeddings(self, batch: dict) -> torch.Tensor | None:
        """The batch's ``caption_embeddings``; from a shard feature cache, after checking that this
        model's image generator made them."""
        if "captions" in (batch.get("feature_caches") or {}) and self.image_generator is not None:
            from mmgen.data.feature_cache import caption_fingerprint, check_made_by

            check_made_by(batch, "captions", self, lambda: caption_fingerprint(self.image_generator), "image generator")
        return batch.get("caption_embeddings")

    def text_forward(self, ids: list[list[int]], pack: bool):
        """The text-only mode ``[BOS caption IMG0..r-1]``: (CE, hidden states (b, r, hidden) and
        input embeddings (b, r, d) at every [IMG] group, in example order)."""
        txt = collate(self.text_sequences(ids, pack), self._pad_id, self.device)
        embeds = txt.embed(self.llm.embed)  # (b', t, d)
        out = self.llm(embeds, txt.attention_mask, txt.labels)
        h_img, e_img = self.img_states(txt, out.hidden, embeds)
        return out.loss, h_img, e_img

    def caption_targets(self, captions, caption_embeddings, shape, cache_name=None) -> torch.Tensor:
        """The frozen text encoder's caption embeddings (b, 77, d): from the batch (a cache) or,
        without them, computed now."""
        if caption_embeddings is not None:
            if tuple(caption_embeddings.shape) != tuple(shape):
                raise DataError(
                    f"caption embeddings of shape {tuple(caption_embeddings.shape)} from "
                    f"{cache_name or 'the batch'} do not fit the mapper output {tuple(shape)}: "
                    "the cache was made with another image generator"
                )
            return caption_embeddings
        if self.precomputed_captions:
            raise ConfigError(
                "precomputed_captions=True but the batch has no `caption_embeddings`: use "
                "mmgen.data.caption_cache.CachedCaptionDataModule (mmgen cache-captions)"
            )
        if self.image_generator is None:
            raise ConfigError("GILL needs an image_generator or cached caption embeddings")
        return self.image_generator.encode_captions(captions)  # (b, 77, d), no grad

    # -- Lightning hooks -------------------------------------------------------------------------
    def _pack(self) -> bool:
        return self.coin(self.pack_probability)

    def training_step(self, batch, batch_idx):
        if self.deciding:
            losses = self.decision_losses(batch)
            self.log_losses(losses, "train", len(batch["prompts"]))
            return losses["loss"]
        losses, _, _ = self.compute_losses(  # one coin per mode, drawn in the reference's order
            batch.get("images"), batch["captions"], self.cached_caption_embeddings(batch),
            pack_caption=self._pack(), pack_ret=self._pack(), pack_gen=self._pack(),
            cache_name=batch.get("caption_cache"), features=self.cached_image_features(batch),
            # sharded blocks: two text forwards on every process, whatever its own coins say
            share_text_forward=not self.backbones_sharded,
        )
        self.log_losses(losses, "train", len(batch["captions"]))
        return losses["loss"]

    def validation_step(self, batch, batch_idx):
        if self.deciding:
            self.log_losses(self.decision_losses(batch), "val", len(batch["prompts"]))
        else:
            super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        if self.deciding:
            self.log_losses(self.decision_losses(batch), "test", len(batch["prompts"]))
        else:
            super().test_step(batch, batch_idx)

    def evaluation_outputs(self, batch):
        return self.compute_losses(  # unpacked
            batch.get("images"), batch["captions"], self.cached_caption_embeddings(batch),
            cache_name=batch.get("caption_cache"), features=self.cached_image_features(batch),
        )

    # -- using the [IMG] tokens ------------------------------------------------------------------
    @torch.no_grad()
    def prompt_img_states(self, prompts: list[str]):
        """``BOS prompt [IMG0..r-1]`` through the LLM (the [IMG] tokens forced, as at inference
        once [IMG0] is produced): hidden states and input embeddings at the [IMG] tokens,
        (b, r, hidden), (b, r, d)."""
        device = self.retrieval_head.logit_scale.device
        txt = collate(self.text_sequences([self.caption_ids(p) for p in prompts], False), self._pad_id, device)
        embeds = txt.embed(self.llm.embed)
        out = self.llm(embeds, txt.attention_mask)
        return self.img_states(txt, out.hidden, embeds)

    @torch.no_grad()
    def generate_images(self, prompts: list[str], **generate_kwargs) -> torch.Tensor:
        """Images (b, 3, h, w) in [0, 1] for text prompts: the mapper's output as SD's
        ``prompt_embeds``; SD's own empty-prompt embedding as the unconditional branch."""
        h_img, e_img = self.prompt_img_states(prompts)
        prompt_embeds = self.gen_mapper(h_img, e_img)  # (b, 77, d)
        return self.image_generator.generate(prompt_embeds, **generate_kwargs)

