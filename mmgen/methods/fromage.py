"""FROMAGe (Koh et al., 2023): a frozen LLM that captions images and retrieves them with [RET].

docs/fromage.md. Trainable: the visual prefix, the two retrieval projections, the
temperature and the [RET] row (5.51M parameters at OPT-6.7B + CLIP ViT-L/14).

    images --CLIP (frozen)--> pooled (b, 1, 1024) --prefix--> (b, k, 4096)
    captioning:  [prefix][BOS caption][RET]        --LLM--> CE_caption ([RET] masked)
    retrieval:   [BOS caption [RET]]               --LLM--> CE_retmode ([RET] a target), h[RET] (b, 4096)
    contrastive: text_proj(h[RET]) vs image_proj(pooled), all-gathered InfoNCE
    L = CE_caption + CE_retmode + (CE_t2i + CE_i2t) / 2
"""

from __future__ import annotations

import torch

from mmgen.components.base import InputProjection, LLMBackbone, NewToken, OutputHead, VisualEncoder
from mmgen.components.retrieval_head import RetrievalHead
from mmgen.components.visual_prefix import LinearVisualPrefix
from mmgen.data.interleave import collate
from mmgen.methods.answering import FROMAGeAnswers
from mmgen.methods.base import MultimodalLM
from mmgen.methods.retrieval_metrics import RetrievalMetrics
from mmgen.methods.optim import Optim
from mmgen.methods.trainability import ParamGroup

RET_TOKEN = "[RET]"
# The official vocabulary: OPT's tokenizer + <|image|> (a frozen row, never used in training)
# + [RET] (a plain added token), ids 50265 and 50266 for OPT; the extra softmax row is part of
# every loss, so leaving <|image|> out would change the losses, not only the ids.
VOCABULARY = [NewToken("<|image|>", trainable=False), NewToken(RET_TOKEN, special=False)]


class FROMAGe(FROMAGeAnswers, RetrievalMetrics, MultimodalLM):
    """FROMAGe as a LightningModule; batches are ``{"images": (b, 3, h, w), "captions": [str]}``.

    Args:
        llm: Frozen causal LM; gains the ``[RET]`` token.
        visual_encoder: Frozen image encoder giving pooled features (CLIP ViT-L/14).
        visual_prefix: Features -> LLM input embeddings. Default: LinearVisualPrefix(n_tokens=1).
        retrieval_head: Text/image projections and temperature. Default: RetrievalHead(256).
        max_text_length: Tokens per caption including BOS and [RET]; a longer caption is cut and
            its last token is [RET].
        pack_probability: Chance that a training batch's captioning sequences are packed in pairs
            (the reference: 0.5).
        rescale_new_rows: After each optimizer step, scale the [RET] row to the mean norm of the
            frozen rows, as the reference does.
        scale_contrastive_by_world: Under DDP, multiply the all-gathered contrastive term by
            the number of processes so that its gradients equal one device's on the global
            batch (DDP averages gradients; the official code did not scale, so with W GPUs its
            contrastive gradient was 1/W of that: False reproduces it).
        optim: AdamW and schedule (reference: lr 3e-4, betas (0.9, 0.95), no weight decay, 100
            warmup steps; gradient clipping 1.0 is the trainer's ``gradient_clip_val``).
        seed: Seed of the packing decisions (process r draws from seed + r).
        init_from: Trained tensors to start from: a checkpoint of an mmgen run, a pretrained
            folder or a ``.safetensors`` file (``MultimodalLM.load_initial_weights``). Ignored
            in dry runs.
        init_reset: Groups that keep their fresh initialisation instead.
    """

    def __init__(
        self,
        llm: LLMBackbone,
        visual_encoder: VisualEncoder,
        visual_prefix: InputProjection | None = None,
        retrieval_head: OutputHead | None = None,
        max_text_length: int = 24,
        pack_probability: float = 0.5,
        rescale_new_rows: bool = True,
        scale_contrastive_by_world: bool = True,
        optim: Optim | None = None,
        seed: int = 0,
        init_from: str | None = None,
        init_reset: list[str] = (),
    ):
        super().__init__(optim or Optim(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=100),
                         init_from, init_reset)
        self.llm = llm
        self.visual_encoder = visual_encoder
        self.visual_prefix = visual_prefix or LinearVisualPrefix(n_tokens=1)
        self.retrieval_head = retrieval_head or RetrievalHead(embed_dim=256)
        self.max_text_length = max_text_length
        self.pack_probability = pack_probability
        self.rescale_new_rows = rescale_new_rows
        self.scale_contrastive_by_world = scale_contrastive_by_world
        self.init_training_rng(seed)

    def configure_model(self) -> None:
        self.llm.configure(new_tokens=VOCABULARY, new_token_init="random")
        self.visual_encoder.configure()
        self.visual_prefix.configure(self.visual_encoder.feature_dim, self.llm.embed_dim)
        self.retrieval_head.configure(self.llm.hidden_size, self.visual_encoder.feature_dim)
        self.ret_id = self.llm.token_id(RET_TOKEN)
        self.check_sequence_length(2 * (self.visual_prefix.n_tokens + self.max_text_length),
                                   f"packed training sequences (2 x ({self.visual_prefix.n_tokens} visual + "
                                   f"max_text_length={self.max_text_length}))")
        self.finish_configure()

    def parameter_groups(self) -> dict[str, ParamGroup]:
        """The [RET] row (no weight decay: one embedding), the visual prefix and the retrieval
        projections with the temperature: 5.51M parameters at full size."""
        return self.staged({
            "tokens": ParamGroup(self.llm.parameter_groups()["tokens"], weight_decay=False),
            "visual_prefix": ParamGroup(list(self.visual_prefix.parameters())),
            "retrieval_head": ParamGroup(list(self.retrieval_head.parameters())),
        })

    # -- the objective ---------------------------------------------------------------------------
    def caption_ids(self, caption: str) -> list[int]:
        """BOS + caption tokens, cut so that with [RET] appended there are max_text_length."""
        return self.sequence_format().caption_ids(caption)

    def compute_losses(self, images: torch.Tensor | None, captions: list[str], pack: bool = False,
                       features: torch.Tensor | None = None):
        """Every loss term of a step and its retrieval embeddings: (losses, text embeddings
        (b, e), image embeddings (b, e)). ``losses``: caption, retmode, t2i, i2t, contrastive
        (= (t2i + i2t) / 2) and loss (their weighted sum). ``features``: the encoder's pooled
        features (b, 1, f) from a feature cache, in place of ``images``."""
        tokenizer, b = self.llm.tokenizer, len(captions)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        features = self.visual_encoder(images) if features is None else features.to(self.device)  # (b, 1, f)
        prefix = self.visual_prefix(features)  # (b, k, d)
        device = prefix.device
        ids = [self.caption_ids(c) for c in captions]

        # Captioning: [prefix][BOS caption][RET]; BOS is a target (predicted from the last
        # visual token) and everything from [RET] on is masked, as in the reference.
        # Packed: [img1][BOS cap1][img2][BOS cap2][RET][RET].
        fmt = self.sequence_format()  # mmgen.methods.formats.FROMAGeFormat
        cap = collate(fmt.caption_sequences(ids, pack), pad_id, device)
        cap_out = self.llm(cap.embed(self.llm.embed, prefix), cap.attention_mask, cap.labels)

        # Retrieval mode: text only, [RET] a target; its hidden state is the text embedding.
        ret = collate(fmt.retrieval_sequences(ids), pad_id, device)
        ret_out = self.llm(ret.embed(self.llm.embed), ret.attention_mask, ret.labels)
        h_ret = ret_out.hidden[torch.arange(b, device=device), ret.last_position_of(self.ret_id)]

        text_emb = self.retrieval_head.embed_text(h_ret)  # (b, e)
        image_emb = self.retrieval_head.embed_image(features)  # (b, e)
        t2i, i2t = self.global_infonce(text_emb, image_emb, self.retrieval_head.logit_scale)
        losses = {"caption": cap_out.loss, "retmode": ret_out.loss, "t2i": t2i, "i2t": i2t,
                  "contrastive": (t2i + i2t) / 2}
        losses["loss"] = losses["caption"] + losses["retmode"] + self.contrastive_scale * losses["contrastive"]
        return losses, text_emb, image_emb

    # -- Lightning hooks -------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        pack = self.coin(self.pack_probability)
        losses, _, _ = self.compute_losses(batch.get("images"), batch["captions"], pack=pack,
                                           features=self.cached_image_features(batch))
        self.log_losses(losses, "train", len(batch["captions"]))
        return losses["loss"]

    def evaluation_outputs(self, batch):
        return self.compute_losses(batch.get("images"), batch["captions"],  # unpacked
                                   features=self.cached_image_features(batch))

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_new_tokens: int = 16) -> list[str]:
        """Greedy captions of images (b, 3, h, w) in [0, 1], decoded from the visual prefix
        alone as the official code does (the caption's BOS is the model's first prediction, as
        in training), up to EOS or [RET]. Interleaved answers: ``answer`` (FROMAGeAnswers)."""
        from mmgen.inference import engine

        prefix = self.encode_input_images(images)  # (b, k, d)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        options = engine.DecodingOptions(max_new_tokens=max_new_tokens, stop_token_ids=(self.ret_id,))
        decoded = engine.decode(self.llm, prefix, mask, options=options)
        tokenizer = self.llm.tokenizer
        return [tokenizer.decode([t for t in row if t != self.ret_id], skip_special_tokens=True).strip()
                for row in decoded.tokens]
