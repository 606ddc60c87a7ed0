"""MiniGPT-5 (Zheng et al., 2023): a frozen LLM that writes "generative vokens" which a mapper turns
into Stable Diffusion conditioning.

docs/minigpt5.md:

    input images --EVA ViT-g + Q-Former + llama_proj (frozen)--> (n_in, 32, 4096) at <ImageHere>
    ###Human: ... ###Assistant: {text} [IMG0]..[IMG7] ###   --LLM (frozen + LoRA/prefix)--> L_text
    h = the 8 hidden states PREDICTING [IMG0..7]             (n_out, 8, 4096)
    CFG: h := 0 with p = 0.1 per output image (training)
    mapper(h) (n_out, 77, 1024) --SD UNet (frozen)--> L_LDM (Min-SNR, gamma 5)
                                 vs SD text encoder(caption, masked) --> L_cap (stage 1)
    L = 0.01 * L_text + L_LDM (+ 0.1 * L_cap)

Batches come from ``mmgen.data.minigpt5_samples`` (``sources``, ``targets``, ``captions``,
images with per-sample counts). What trains is chosen by the stage (``mmgen.methods.stages``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from mmgen.components.base import ImageGenerator, LLMBackbone, NewToken, VisualEncoder
from mmgen.components.hub import random_weights_requested
from mmgen.components.voken_mapper import VokenMapper
from mmgen.data.interleave import collate
from mmgen.data.minigpt5_samples import IMAGE_PLACEHOLDER, N_VOKENS, VOKENS
from mmgen.methods.answering import MiniGPT5Answers
from mmgen.methods.base import MultimodalLM
from mmgen.methods.optim import Optim
from mmgen.methods.trainability import ParamGroup


# The official vocabulary: the 8 vokens then <ImageHere>, all 9 rows trainable, added as the
# official slow (legacy) LLaMA tokenizer treats added special tokens: they eat the space before
# them, so "lunch . [IMG0]" has no lone "▁" before [IMG0] (right-stripping would be wrong: the
# "▁###" after [IMG7] keeps its "▁").
VOCABULARY = [NewToken(t, lstrip=True) for t in VOKENS + [IMAGE_PLACEHOLDER]]


class MiniGPT5(MiniGPT5Answers, MultimodalLM):
    """MiniGPT-5 as a LightningModule.

    Args:
        llm: Frozen causal LM (Vicuna-7B); gains ``[IMG0..7]`` and ``<ImageHere>``, initialised to
            the mean of the existing rows. Give it the stage-2 adapter (LoRA or prefix) in both
            stages: stage 1 keeps it frozen (an untrained LoRA is the identity).
        generator: Frozen image generator (SD 2.1-base); fixes the mapper's output width.
        visual_encoder: Frozen encoder of input images into LLM tokens (``QFormerEncoder``).
            None: inputs have no images (stage 1 never runs it).
        mapper: Voken hidden states -> generator conditioning. Default: ``VokenMapper()``.
        text_loss_weight: Weight of the LM loss (the reference: 0.01).
        ldm_loss_weight: Weight of the latent diffusion loss (1.0).
        caption_loss_weight: Weight of the caption MSE where the stage has it on (0.1).
        snr_gamma: Min-SNR gamma of the diffusion loss (5.0).
        init_from: Trained tensors to start from (stage 2: the stage-1 checkpoint): a checkpoint,
            pretrained folder or ``.safetensors`` file (``MultimodalLM.load_initial_weights``).
            Ignored in dry runs.
        init_reset: Groups that keep their fresh initialisation (stage 2: the adapter).
        optim: AdamW and schedule (reference: lr 2e-5, eps 1e-8, weight decay 0.01, linear
            schedule, 1000 warmup steps; no gradient clipping).
        seed: Seed of the classifier-free-guidance dropout.
    """

    def __init__(
        self,
        llm: LLMBackbone,
        generator: ImageGenerator,
        visual_encoder: VisualEncoder | None = None,
        mapper: VokenMapper | None = None,
        text_loss_weight: float = 0.01,
        ldm_loss_weight: float = 1.0,
        caption_loss_weight: float = 0.1,
        snr_gamma: float = 5.0,
        init_from: str | None = None,
        init_reset: list[str] = ("adapter",),
        optim: Optim | None = None,
        seed: int = 0,
    ):
        super().__init__(optim or Optim(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                                        warmup_steps=1000, schedule="linear"), init_from, init_reset)
        self.llm = llm
        self.generator = generator
        self.visual_encoder = visual_encoder
        self.mapper = mapper or VokenMapper()
        self.text_loss_weight = text_loss_weight
        self.ldm_loss_weight = ldm_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.snr_gamma = snr_gamma
        self.init_training_rng(seed)

    def configure_model(self) -> None:
        if getattr(self, "voken_ids", None) is not None:
            return
        self.llm.configure(new_tokens=VOCABULARY, new_token_init="mean")
        self.generator.configure()
        if self.visual_encoder is not None:
            self.visual_encoder.configure(embed_dim=self.llm.embed_dim)
        self.mapper.configure(self.llm.hidden_size, self.generator.text_embed_dim)
        self.voken_ids = [self.llm.token_id(t) for t in VOKENS]
        self.finish_configure()
        if self.stage is not None:
            frozen = sorted({"fc", "queries"} - set(self.stage.train))
            if frozen and not self.init_from and not random_weights_requested(False):  # not in dry runs
                warnings.warn(f"MiniGPT-5 stage {self.stage.name!r} keeps {frozen} frozen, and without "
                              "model.init_args.init_from (the previous stage's checkpoint) they stay at their "
                              "random initialisation")

    # -- what trains -----------------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, ParamGroup]:
        """``vokens`` (the 9 new rows, no weight decay) and ``adapter`` (LoRA or prefix) from the
        LLM, and the mapper's ``fc``, ``transformer``, ``queries``. The stage decides which
        train and at what learning rate (no stage: all, at the base rate)."""
        llm = self.llm.parameter_groups()
        groups = {"vokens": ParamGroup(llm["tokens"], weight_decay=False), "adapter": ParamGroup(llm["adapter"])}
        groups.update({name: ParamGroup(list(m.parameters())) for name, m in self.mapper.groups().items()})
        return self.staged(groups)

    @property
    def caption_loss_on(self) -> bool:
        return self.stage.caption_loss if self.stage is not None else self.caption_loss_weight > 0

    # -- inputs ----------------------------------------------------------------------------------
    @property
    def n_image_tokens(self) -> int:
        return self.visual_encoder.n_tokens if self.visual_encoder is not None else 0

    def source_segments(self, source: str) -> list:
        """BOS + prompt, ``<ImageHere>`` replaced by image slots; nothing supervised
        (``mmgen.methods.formats.MiniGPT5Format``)."""
        return self.sequence_format().source_segments(source)

    def target_segments(self, target: str) -> list:
        """The target, supervised except [IMG1..6] (the reference supervises [IMG0], [IMG7] and
        the closing ###; no EOS)."""
        return self.sequence_format().target_segments(target)

    def _pad_id(self) -> int:
        tokenizer = self.llm.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _image_embeds(self, images: torch.Tensor) -> torch.Tensor | None:
        if images is None or images.shape[0] == 0:
            return None
        return self.visual_encoder(images)  # (n_in, 32, d)

    def voken_features(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(n, 8, d): for each [IMG0..7] group (row-major), the hidden states that predict its 8
        tokens: the position before [IMG0] and the positions of [IMG0..6]."""
        rows, cols = (input_ids == self.voken_ids[0]).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return hidden.new_zeros(0, N_VOKENS, hidden.shape[-1])
        offsets = torch.arange(N_VOKENS, device=hidden.device)
        positions = cols[:, None] + offsets - 1  # (n, 8)
        expected = torch.tensor(self.voken_ids, device=input_ids.device)
        if (cols + N_VOKENS > input_ids.shape[1]).any() or (cols == 0).any() or \
                not bool((input_ids[rows[:, None], cols[:, None] + offsets] == expected).all()):
            raise ValueError("every [IMG0] must follow some text and be followed by [IMG1]..[IMG7]")
        return hidden[rows[:, None], positions]  # (n, 8, d)

    def cached_latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The output images' VAE latent distribution (mean, std), each (n_out, c, h, w), from a
        latent cache, after checking that this model's VAE made it; None without a cache."""
        if "output_latent_mean" not in batch:
            return None
        from mmgen.data.feature_cache import check_made_by, vae_fingerprint

        check_made_by(batch, "vae", self, lambda: vae_fingerprint(self.generator), "VAE")
        return batch["output_latent_mean"], batch["output_latent_std"]

    # -- the objective ---------------------------------------------------------------------------
    def compute_losses(self, batch: dict, train: bool = True) -> dict[str, torch.Tensor]:
        device = self.device
        sequences = [self.source_segments(s) + self.target_segments(t)
                     for s, t in zip(batch["sources"], batch["targets"])]
        seq = collate(sequences, self._pad_id(), device)
        image_embeds = self._image_embeds(batch["input_images"])
        blank_term = 0.0
        if image_embeds is None and self.backbones_sharded and self.visual_encoder is not None:
            # No input image on this process: its sharded encoder blocks must still run (before
            # the LLM, as where there are images) in the same order as on the other processes.
            size = self.visual_encoder.image_size
            blank_term = 0.0 * self.visual_encoder(torch.zeros(1, 3, size, size, device=device)).float().sum()
        embeds = seq.embed(self.llm.embed, image_embeds)
        out = self.llm(embeds, seq.attention_mask, seq.labels)
        losses = {"text": out.loss}
        loss = self.text_loss_weight * out.loss + blank_term

        features = self.voken_features(seq.input_ids, out.hidden)  # (n_out, 8, d)
        images, latent_dist = batch.get("output_images"), self.cached_latents(batch)
        n_images = (images if latent_dist is None else latent_dist[0]).shape[0]
        if features.shape[0] != n_images:
            raise ValueError(f"{features.shape[0]} voken groups but {n_images} output images")
        if features.shape[0] > 0:
            n = features.shape[0]
            drop = self.mapper.sample_drop(n, self.training_rng).to(device) if train else torch.zeros(n, dtype=torch.bool, device=device)
            features = torch.where(drop[:, None, None], torch.zeros_like(features), features)
            mapped = self.mapper(features)  # (n_out, 77, text_embed_dim)
            losses["ldm"] = self.generator.ldm_loss(images, mapped, snr_gamma=self.snr_gamma, latent_dist=latent_dist)
            loss = loss + self.ldm_loss_weight * losses["ldm"]
            captions = [c for c, k in zip(batch["captions"], batch["n_output_images"]) for _ in range(k)]
            if self.caption_loss_on and captions and all(c is not None for c in captions):
                captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
                target = self.generator.encode_captions(captions, use_attention_mask=True)
                losses["caption"] = F.mse_loss(mapped, target.to(mapped.dtype))
                loss = loss + self.caption_loss_weight * losses["caption"]
        elif train:
            # No output image in this batch (MMDialog turns, VIST "understand" samples): the mapper
            # is unused, but DDP expects a gradient for every trainable parameter in every step.
            # A zero-weighted term gives it one (all zeros) without changing the loss.
            loss = loss + 0.0 * sum(p.sum() for p in self.mapper.parameters() if p.requires_grad)
        losses["loss"] = loss
        return losses

    def training_step(self, batch, batch_idx):
        losses = self.compute_losses(batch, train=True)
        self.log_losses(losses, "train", len(batch["sources"]))
        return losses["loss"]

    def validation_step(self, batch, batch_idx):
        self.log_losses(self.compute_losses(batch, train=False), "val", len(batch["sources"]))

    def test_step(self, batch, batch_idx):
        self.log_losses(self.compute_losses(batch, train=False), "test", len(batch["sources"]))
