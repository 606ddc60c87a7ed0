"""Memory plan: an estimate of the peak training memory per GPU of a built model.

The model is the full-size one of a config, built with random weights on the meta device
(:func:`mmgen.summary.dry_run`): parameter counts and storage dtypes are read from it, never
written down here. Activations are estimated from the architecture (layers, widths, vocabulary)
and from what each method runs in one training step (:data:`WORKLOADS`).

    mmgen params --config configs/gill.yaml --memory
    mmgen params --config configs/gill.yaml --memory --micro-batch 50 --activation-checkpointing

Terms, per GPU (``B`` = micro-batch, ``t`` = tokens per sequence, ``s`` = bytes of an activation):

- frozen weights: every parameter without a gradient, at its storage dtype (``*-true``
  precisions cast every weight to that dtype); FSDP shards them over the devices.
- trainable weights: at their dtype (fp32 under ``*-mixed``: these are the master copies); under
  ``*-mixed`` autocast also keeps a 16-bit working copy of each while the step's graph lives.
- gradients: one per trainable parameter at its dtype; DDP's reducer keeps a second copy in its
  buckets (Lightning's default ``gradient_as_bucket_view=False``). FSDP shards them.
- AdamW: ``exp_avg`` and ``exp_avg_sq`` per trainable parameter at its dtype (2 x fp32 under
  ``*-mixed``). FSDP shards them.
- LLM activations, for every LLM forward of a step (FROMAGe 2, GILL 3 (2 when its two
  packing coins agree), MiniGPT-5 1): the frozen LLM keeps what backward needs to send the
  gradient on to its input (the visual prefix, the new token rows, LoRA), not what it would need
  for its own weights. Per layer and token (:func:`layer_bytes_per_token`, checked against the
  tensors autograd saves in ``tests/test_memory.py``):

      attention (SDPA / flash): q, k, v and the output          (2h + 2 h_kv) s  + 4 n_heads (log-sum-exp, fp32)
      two norms: their input; fp32 for RMSNorm and under autocast  2h x (4 or s)
      MLP: the activation's input/output                        f s  (gated SiLU: 3 f s)
      LoRA with dropout, per adapted module: input, dropped, + mask  (4 or s + 1) h  (fp32 LoRA: 4, autocast: s;
                                                                  a CPU run's mask is not 1 byte but 4)

  OPT-6.7B (h 4096, f 16384) in bf16: 6h s + f s = 80 KiB per token per layer; Vicuna-7B
  (h 4096, f 11008, RMSNorm): 4h s + 2h 4 + 3f s = 128 KiB. Activation checkpointing keeps the
  layer input (h s) per layer and token, plus one layer's activations while it is recomputed.
  The LM head adds per token the fp32 log-softmax output (4V) and the logits (V s, held until
  the losses are summed), and per forward the merged token matrix (V h s) that peft's trainable
  token layer builds and keeps for backward.
- head activations: what the trainable heads (mapper, projections) save, counted by running them
  on the meta device with autograd's saved-tensor hooks (halved under ``*-mixed``: autocast runs
  their matrix products in 16 bits).
- UNet activations (MiniGPT-5): the frozen UNet keeps activations, because the LDM loss's
  gradient flows through it into the mapper: counted the same way, on the meta device.
- working memory at the peak: the peak is at the start of backward, where every activation is
  kept and the gradient of one forward's logits (fp32) and the dense gradient of the merged token
  matrix are made; or while a frozen part without gradient (CLIP, EVA ViT-g, VAE) runs, which
  keeps nothing but needs about two of its widest activations at once (three for the VAE's
  full-resolution stage), counted only beyond the activations kept after it.

Not counted: the CUDA context and cache allocator slack (``torch.cuda.max_memory_allocated``
does not count them either; ``nvidia-smi`` shows about 0.5-1 GiB more), data-loader memory, and
evaluation. Attention is assumed to be a fused kernel (flash / memory-efficient SDPA), which
keeps no (t x t) matrix. These are estimates; ``benchmarks/bench_gpu.py`` measures the peaks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

GiB = 2**30
PRECISIONS = ("32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
STRATEGIES = ("single", "ddp", "fsdp", "fsdp_backbones")


@dataclass
class Setting:
    """What the plan is for."""

    precision: str = "bf16-mixed"
    micro_batch: int = 1
    """Samples per GPU per forward (the data module's ``batch_size``)."""
    strategy: str = "single"
    devices: int = 1
    activation_checkpointing: bool = False
    tokens: int | None = None
    """Tokens per LLM sequence; None: the method's default (:data:`WORKLOADS`)."""
    device: str = "cuda"
    """Where it runs: CUDA's fused dropout keeps a 1-byte mask, the CPU's a mask of the input's
    dtype (the plan is for GPUs; the tests compare against CPU runs)."""

    def __post_init__(self):
        self.precision = {"bf16": "bf16-mixed", "16": "16-mixed"}.get(str(self.precision), str(self.precision))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        if self.devices == 1 and self.strategy == "ddp":
            self.strategy = "single"

    @property
    def mixed(self) -> bool:
        return self.precision.endswith("-mixed")

    @property
    def cast_dtype(self) -> torch.dtype | None:
        """The dtype every weight is cast to (``*-true`` half precisions), else None."""
        return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(self.precision)

    @property
    def low_bytes(self) -> int:
        return 4 if self.precision.startswith("32") else 2


@dataclass
class Item:
    group: str  # weights, gradients, optimizer, activations, working
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    title: str
    setting: Setting
    items: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, group: str, name: str, nbytes: float, note: str = "") -> None:
        self.items.append(Item(group, name, float(nbytes), note))

    @property
    def total(self) -> float:
        return sum(i.bytes for i in self.items)

    def by_group(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for item in self.items:
            out[item.group] = out.get(item.group, 0.0) + item.bytes
        return out

    def format(self) -> str:
        s = self.setting
        lines = [
            f"Memory plan (estimate) for {self.title}",
            f"per GPU: micro-batch {s.micro_batch}, precision {s.precision}, strategy {s.strategy}, "
            f"{s.devices} device(s), activation checkpointing {'on' if s.activation_checkpointing else 'off'}",
            f"{'term':<46} {'GiB':>9}  note",
        ]
        for item in self.items:
            lines.append(f"{item.name:<46} {item.bytes / GiB:>9.2f}  {item.note}")
        lines.append(f"{'estimated peak (allocated)':<46} {self.total / GiB:>9.2f}")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"title": self.title, "setting": vars(self.setting),
                "items": [vars(i) for i in self.items], "total_bytes": self.total,
                "total_gib": self.total / GiB, "notes": self.notes}


# -- counting what autograd keeps --------------------------------------------------------------
class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA while counting: keeps what a fused (flash / memory-efficient) kernel
    keeps for backward (q, k, v, output, fp32 log-sum-exp) and, on the meta device, costs
    nothing. The PyTorch math fallback would keep the (t x t) probabilities instead."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover (counting only)
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_sdpa(query, key, value, *args, **kwargs):
    if key.shape[-3] != query.shape[-3]:  # grouped-query attention: enable_gqa
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def fused_attention_stand_in():
    """Within this block ``F.scaled_dot_product_attention`` is :class:`_FusedAttention`."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


class SavedTensors:
    """Bytes of the distinct storages autograd saves for backward within the block, parameters
    (counted as weights) excluded; works on real and meta tensors.

        with SavedTensors(model.parameters()) as saved:
            loss = model(x)
        saved.bytes
    """

    def __init__(self, exclude=()):
        self._exclude = {p.untyped_storage()._cdata for p in exclude}
        self.storages: dict[int, tuple[int, tuple, torch.dtype]] = {}
        self._hooks = None

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._exclude:
            self.storages[key] = (storage.nbytes(), tuple(tensor.shape), tensor.dtype)
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(n for n, _, _ in self.storages.values())

    def bytes_of(self, dtype: torch.dtype) -> int:
        return sum(n for n, _, d in self.storages.values() if d == dtype)


def traced_activation_bytes(fn: Callable, exclude, mixed: bool = False) -> float:
    """Run ``fn`` (on the meta device) and count what autograd keeps, with fused attention.
    ``mixed``: fp32 tensors count half (autocast would have made them 16-bit)."""
    with fused_attention_stand_in(), SavedTensors(exclude) as saved:
        fn()
    if not mixed:
        return float(saved.bytes)
    fp32 = saved.bytes_of(torch.float32)
    return float(saved.bytes - fp32 / 2)


# -- the LLM -----------------------------------------------------------------------------------
@dataclass
class LLMShape:
    """What the activation estimate needs to know of a causal LM, read from the built model."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    gated_mlp: bool  # SiLU-gated MLP (LLaMA): gate, act(gate) and up kept
    fp32_norm: bool  # the norm computes in fp32 and keeps its fp32 input (LLaMA's RMSNorm)
    lora_modules_per_layer: int = 0
    lora_dropout: bool = False
    lora_dtype: torch.dtype = torch.float32
    trainable_token_heads: int = 0  # LM heads with trainable rows: a merged (V, h) copy kept
    weight_dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, llm) -> "LLMShape":
        """From an mmgen ``CausalLM`` (built, on any device)."""
        model = llm.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        cfg = getattr(cfg, "text_config", None) or cfg
        ffn = getattr(cfg, "ffn_dim", None) or getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        names = [n for n, _ in base.named_modules()]
        norm_types = {type(m).__name__ for m in base.modules()}
        lora_a = [m for n, m in base.named_modules() if n.endswith("lora_A")]
        lora_trains = any(p.requires_grad for m in lora_a for p in m.parameters())
        lora_dtype = next((p.dtype for m in lora_a for p in m.parameters()), torch.float32)
        dropout = False
        for n, m in base.named_modules():
            if n.endswith("lora_dropout"):
                dropout = any(isinstance(d, nn.Dropout) and d.p > 0 for d in m.modules())
                break
        heads_with_tokens = 0
        output = base.get_output_embeddings()
        if output is not None and any(p.requires_grad for n, p in base.named_parameters() if "trainable_tokens" in n):
            heads_with_tokens = 1
        frozen = [p for p in base.parameters() if not p.requires_grad and p.is_floating_point()]
        return cls(
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            ffn=ffn,
            heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            vocab=base.get_input_embeddings().weight.shape[0] if hasattr(base.get_input_embeddings(), "weight")
            else base.get_input_embeddings().base_layer.weight.shape[0],
            gated_mlp=any(n.endswith("gate_proj") for n in names),
            fp32_norm=any("RMSNorm" in t for t in norm_types),
            lora_modules_per_layer=(len(lora_a) // cfg.num_hidden_layers) if lora_trains else 0,
            lora_dropout=dropout,
            lora_dtype=lora_dtype,
            trainable_token_heads=heads_with_tokens,
            weight_dtype=frozen[0].dtype if frozen else torch.float32,
        )


def layer_bytes_per_token(shape: LLMShape, s: int, autocast: bool, device: str = "cuda") -> float:
    """Bytes one frozen decoder layer keeps for backward per token (module docstring)."""
    h, kv = shape.hidden, shape.hidden * shape.kv_heads // shape.heads
    attention = (2 * h + 2 * kv) * s + 4 * shape.heads
    norm_bytes = 4 if (shape.fp32_norm or autocast) else s
    norms = 2 * h * norm_bytes + 2 * 8  # their inputs, plus the per-token statistics
    mlp = (3 if shape.gated_mlp else 1) * shape.ffn * s
    # LoRA: peft casts the input to the LoRA weights' dtype (fp32), drops it out and feeds A, which
    # keeps it (autocast: its 16-bit cast); dropout keeps a 1-byte mask. Without dropout and
    # without a cast, the normed input is one tensor kept once for every A.
    lora = 0
    if shape.lora_modules_per_layer:
        kept = s if autocast else shape.lora_dtype.itemsize
        if shape.lora_dropout:
            mask = 1 if device.startswith("cuda") else shape.lora_dtype.itemsize
            lora = shape.lora_modules_per_layer * (kept + mask) * h
        elif kept == s:
            lora = h * s
        else:
            lora = shape.lora_modules_per_layer * kept * h
    return attention + norms + mlp + lora


@dataclass
class LLMPass:
    """One LLM forward of a training step."""

    name: str
    sequences: int
    tokens: int


def llm_pass_bytes(shape: LLMShape, p: LLMPass, setting: Setting) -> dict[str, float]:
    """{"layers", "head", "logits", "s"} bytes one forward keeps until backward (``s``: bytes
    of an activation: 16-bit under mixed or half precision, else the frozen weights' dtype)."""
    s = 2 if (setting.mixed or setting.cast_dtype is not None) else shape.weight_dtype.itemsize
    n = p.sequences * p.tokens
    h = shape.hidden
    if setting.activation_checkpointing:  # layer inputs, plus one layer recomputed in backward
        layers = shape.layers * n * h * s + n * layer_bytes_per_token(shape, s, setting.mixed, setting.device)
    else:
        layers = shape.layers * n * layer_bytes_per_token(shape, s, setting.mixed, setting.device)
    layers += 2 * n * h * s  # the input embeddings and the final norm's input
    head = n * shape.vocab * 4 + shape.trainable_token_heads * shape.vocab * h * s
    logits = n * shape.vocab * s
    return {"layers": layers, "head": head, "logits": logits, "s": s}


# -- the methods' training steps ---------------------------------------------------------------
@dataclass
class Workload:
    """What one training step of a method runs, at micro-batch B."""

    passes: list[LLMPass]
    heads: list[tuple[str, Callable[[], object]]] = field(default_factory=list)
    """(name, fn running a trainable head on meta inputs that require grad)."""
    unet: Callable[[], object] | None = None
    frozen_transient: list[tuple[str, float, str]] = field(default_factory=list)
    """(name, bytes, when): the working memory of a frozen part run without gradient, and when
    it runs: "first" (before any activation is kept) or "before unet" (while everything but the
    UNet's activations is kept)."""
    notes: list[str] = field(default_factory=list)


def _meta(*shape, dtype=torch.float32, grad=True):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def _vit_transient(encoder_module, n_images: int, s: int) -> float:
    """A frozen ViT under no_grad: about its widest activation (tokens x MLP width) twice."""
    cfg = getattr(encoder_module, "config", None)
    vision = getattr(cfg, "vision_config", None) or cfg
    if vision is None or not hasattr(vision, "hidden_size"):
        return 0.0
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return 2.0 * n_images * tokens * getattr(vision, "intermediate_size", 4 * vision.hidden_size) * s


def _first_module_with_config(module):
    """The first submodule with a vision transformer config (image_size, patch_size)."""
    for m in module.modules():
        cfg = getattr(m, "config", None)
        vision = getattr(cfg, "vision_config", None) or cfg
        if hasattr(vision, "image_size") and hasattr(vision, "patch_size") and hasattr(vision, "hidden_size"):
            return m
    return None


def fromage_workload(model, B: int, tokens: int | None, s: int) -> Workload:
    k = model.visual_prefix.n_tokens
    t = tokens or model.max_text_length
    f = model.visual_encoder.feature_dim
    h = model.llm.hidden_size
    return Workload(
        passes=[LLMPass("captioning", B, k + t), LLMPass("retrieval (text only)", B, t)],
        heads=[("visual prefix", lambda: model.visual_prefix(_meta(B, 1, f))),
               ("retrieval projections", lambda: (model.retrieval_head.embed_text(_meta(B, h)),
                                                  model.retrieval_head.embed_image(_meta(B, 1, f))))],
        frozen_transient=[("CLIP image encoder (no grad)",
                           _vit_transient(_first_module_with_config(model.visual_encoder), B, s), "first")],
        notes=[f"sequences: captioning {k} visual + {t} text tokens, retrieval {t} (max_text_length, "
               "padded to the longest caption: the worst case)"],
    )


def gill_workload(model, B: int, tokens: int | None, s: int) -> Workload:
    k = model.visual_prefix.n_tokens
    t = tokens or model.max_text_length
    r = model.n_img_tokens
    f = model.visual_encoder.feature_dim
    h = model.llm.hidden_size
    d = model.llm.embed_dim
    return Workload(
        passes=[LLMPass("captioning", B, k + t), LLMPass("retrieval (text only)", B, t),
                LLMPass("generation (text only)", B, t)],
        heads=[("visual prefix", lambda: model.visual_prefix(_meta(B, 1, f))),
               ("retrieval projections", lambda: (model.retrieval_head.embed_text(_meta(B, h)),
                                                  model.retrieval_head.embed_image(_meta(B, 1, f)))),
               ("GILL mapper", lambda: model.gen_mapper(_meta(B, r, h), _meta(B, r, d)))],
        frozen_transient=[("CLIP image encoder (no grad)",
                           _vit_transient(_first_module_with_config(model.visual_encoder), B, s), "first")],
        notes=[f"sequences: captioning {k} visual + {t} text tokens, text-only {t} (max_text_length); "
               "3 LLM forwards when the retrieval and generation packing coins differ (half the "
               "steps), 2 when they agree: the plan counts the worst case"],
    )


# Tokens per MiniGPT-5 sequence when the config does not say: stage 1 (CC3M captions, no input
# image) about 64; stage 2 (VIST: up to 4 history images of 32 tokens, their captions, the
# prompt and the target) about 320. Both are assumptions: give --tokens for your data.
MINIGPT5_TOKENS = {"uas": 64, "mls": 320}


def minigpt5_workload(model, B: int, tokens: int | None, s: int) -> Workload:
    from mmgen.data.minigpt5_samples import N_VOKENS

    stage = getattr(getattr(model, "stage", None), "name", None)
    adapter_trains = any(p.requires_grad for p in model.llm.parameter_groups().get("adapter", []))
    default = MINIGPT5_TOKENS["mls" if adapter_trains or stage == "mls" else "uas"]
    t = tokens or default
    h = model.llm.hidden_size
    gen = model.generator
    latent = gen.image_size // (2 ** (len(gen.vae.config.block_out_channels) - 1))
    channels = gen.unet.config.in_channels
    n_text = gen.text_embed_dim
    dtype = next(gen.unet.parameters()).dtype
    n_in = 4 * B if t > 128 and model.visual_encoder is not None else 0

    def unet():
        cond = _meta(B, 77, n_text, dtype=dtype)
        timesteps = torch.zeros(B, dtype=torch.long, device="meta")
        return gen.unet(_meta(B, channels, latent, latent, dtype=dtype, grad=False), timesteps,
                        encoder_hidden_states=cond).sample

    vae_c = gen.vae.config.block_out_channels[0]
    transient = [("VAE encoder (no grad)", 3.0 * B * vae_c * gen.image_size ** 2 * s, "before unet")]
    if n_in:
        transient.append(("EVA ViT-g + Q-Former (no grad)",
                          _vit_transient(_first_module_with_config(model.visual_encoder), n_in, s), "first"))
    return Workload(
        passes=[LLMPass("interleaved text + vokens", B, t)],
        heads=[("voken mapper", lambda: model.mapper(_meta(B, N_VOKENS, h)))],
        unet=unet,
        frozen_transient=transient,
        notes=[f"sequence: {t} tokens (an assumption for {'stage 2 VIST stories' if t > 128 else 'stage 1 captions'}; "
               f"--tokens to change), one output image per sample at {gen.image_size} px "
               f"({latent}x{latent} latents)" + (f", {n_in // B} input images per sample" if n_in else "")],
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "FROMAGe": fromage_workload,
    "GILL": gill_workload,
    "MiniGPT5": minigpt5_workload,
}


def register_workload(method_class_name: str, fn: Callable[..., Workload]) -> None:
    """Teach the memory plan another method's training step (research code)."""
    WORKLOADS[method_class_name] = fn


def workload_of(model, B: int, tokens: int | None, s: int) -> Workload:
    for cls in type(model).__mro__:
        if cls.__name__ in WORKLOADS:
            return WORKLOADS[cls.__name__](model, B, tokens, s)
    raise ValueError(f"no memory workload for {type(model).__name__}; see mmgen.memory.register_workload")


# -- the plan ----------------------------------------------------------------------------------
def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def memory_plan(model, setting: Setting, title: str | None = None) -> MemoryPlan:
    """The plan of ``model``, a built MultimodalLM (:func:`mmgen.summary.dry_run` builds one on
    the meta device)."""
    plan = MemoryPlan(title or type(model).__name__, setting)
    W = setting.devices
    fsdp = setting.strategy == "fsdp" and W > 1
    # fsdp_backbones (mmgen.sharding): only the transformer blocks of the LLM and the visual
    # encoder are sharded; the rest is replicated under DDP
    in_blocks: set[int] = set()
    if setting.strategy == "fsdp_backbones" and W > 1:
        from mmgen.sharding import DEFAULT_COMPONENTS, transformer_blocks

        for name in DEFAULT_COMPONENTS:
            if getattr(model, name, None) is not None:
                for block in transformer_blocks(getattr(model, name)):
                    in_blocks.update(id(p) for p in block.parameters())

    def share(p) -> int:
        """1/how many devices hold ``p``."""
        return W if fsdp or id(p) in in_blocks else 1

    def stored(p) -> torch.dtype:
        return setting.cast_dtype if setting.cast_dtype is not None and p.is_floating_point() else p.dtype

    frozen: dict[torch.dtype, int] = {}
    trainable: dict[torch.dtype, int] = {}
    frozen_bytes = trainable_bytes = replicated_trainable_bytes = 0.0
    for p in model.parameters():
        table = trainable if p.requires_grad else frozen
        table[stored(p)] = table.get(stored(p), 0) + p.numel()
        size = p.numel() * stored(p).itemsize / share(p)
        if p.requires_grad:
            trainable_bytes += size
            replicated_trainable_bytes += size if share(p) == 1 else 0
        else:
            frozen_bytes += size

    def describe(table):
        parts = sorted(table.items(), key=str)
        return ", ".join(f"{_fmt_count(n)} {str(d).removeprefix('torch.')}" for d, n in parts)

    sharded_note = f", sharded over {W}" if fsdp else (f", transformer blocks sharded over {W}" if in_blocks else "")
    plan.add("weights", "frozen weights", frozen_bytes, describe(frozen) + sharded_note)
    n_train = sum(trainable.values())
    plan.add("weights", "trainable weights", trainable_bytes,
             describe(trainable) + (" (the fp32 master copies)" if setting.mixed else "")
             + (f", sharded over {W}" if fsdp else ""))
    if setting.mixed:
        plan.add("weights", "16-bit working copies (autocast)", n_train * 2, "of the trainable weights, during the step")
    plan.add("gradients", "gradients", trainable_bytes, "one per trainable parameter")
    if setting.strategy in ("ddp", "fsdp_backbones") and W > 1:
        plan.add("gradients", "DDP gradient buckets", replicated_trainable_bytes,
                 "a second copy of the replicated ones (gradient_as_bucket_view=False)")
    plan.add("optimizer", "AdamW state", 2 * trainable_bytes, "exp_avg + exp_avg_sq at the parameters' dtype")
    if fsdp or in_blocks:
        layer = _largest_layer_bytes(model, setting)
        plan.add("weights", "FSDP gathered layers", 2 * layer, "one decoder layer gathered, one prefetched")

    # activations
    s = setting.low_bytes
    B = setting.micro_batch
    work = workload_of(model, B, setting.tokens, s)
    shape = LLMShape.of(model.llm)
    layers = head = logits = 0.0
    last = None
    for p in work.passes:
        part = llm_pass_bytes(shape, p, setting)
        layers += part["layers"]
        head += part["head"]
        logits += part["logits"]
        last = part
    names = ", ".join(f"{p.name} {p.sequences}x{p.tokens}" for p in work.passes)
    per_layer = layer_bytes_per_token(shape, last["s"], setting.mixed, setting.device)
    forwards = f"{len(work.passes)} forward{'s' if len(work.passes) > 1 else ''}"
    plan.add("activations", f"LLM layers ({forwards})", layers,
             f"{names} (sequences x tokens); {shape.layers} layers x {per_layer / 1024:.0f} KiB/token"
             + (" (checkpointed: the layer inputs)" if setting.activation_checkpointing else ""))
    plan.add("activations", "LM head and loss", head,
             f"fp32 log-softmax over {shape.vocab} words"
             + (", merged token matrix per forward" if shape.trainable_token_heads else ""))
    plan.add("working", "logits", logits, "held until the step's losses are summed")
    params = list(model.parameters())
    heads = 0.0
    for _, fn in work.heads:
        heads += traced_activation_bytes(fn, params, mixed=setting.mixed or setting.cast_dtype is not None)
    plan.add("activations", "trainable heads", heads, ", ".join(n for n, _ in work.heads) + " (traced on meta)")
    if work.unet is not None:
        unet = traced_activation_bytes(work.unet, params)
        if setting.activation_checkpointing:
            plan.notes.append("activation checkpointing applies to the LLM only; the UNet keeps its activations")
        plan.add("activations", "UNet (LDM loss, gradient to the mapper)", unet, "traced on meta, fused attention")
    backward = (work.passes[-1].sequences * work.passes[-1].tokens * shape.vocab * 4
                + shape.trainable_token_heads * shape.vocab * shape.hidden * last["s"])
    # The peak is either at the start of backward (every activation kept + the backward working
    # memory) or while a frozen part runs without gradient (what is kept by then + its working
    # memory): the larger excess over "every activation kept" is the working term.
    unet_acts = _item_bytes(plan, "UNet (LDM loss, gradient to the mapper)")
    all_acts = sum(i.bytes for i in plan.items if i.group == "activations")
    working, note = backward, "logits' gradient (fp32) + dense token-matrix gradient, at the start of backward"
    for name, nbytes, when in work.frozen_transient:
        later = all_acts if when == "first" else unet_acts
        if nbytes - later > working:
            working = nbytes - later
            note = f"{name}: {nbytes / GiB:.2f} GiB transient, beyond the activations kept after it"
        else:
            before = "any activation is kept" if when == "first" else "the UNet keeps its activations"
            plan.notes.append(f"{name}: about {nbytes / GiB:.2f} GiB transient, before {before}: below the peak")
    plan.add("working", "working memory at the peak", working, note)
    plan.notes += work.notes
    plan.notes.append("not counted: CUDA context and allocator slack (about 0.5-1 GiB more in nvidia-smi)")
    return plan


def _item_bytes(plan: MemoryPlan, name: str) -> float:
    return sum(i.bytes for i in plan.items if i.name == name)


def _largest_layer_bytes(model, setting: Setting) -> float:
    """Bytes of the largest decoder layer of the LLM (what FSDP gathers at once)."""
    base = model.llm.model
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    best = 0
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            for layer in module:
                n = sum(p.numel() * (setting.cast_dtype or p.dtype).itemsize for p in layer.parameters())
                best = max(best, n)
            break
    return float(best)



def setting_from_config(config, datamodule=None, **given) -> Setting:
    """A Setting from a LightningCLI config (``trainer.precision``, ``devices``, ``strategy``; the
    data module's ``batch_size``), with ``given`` values (not None) taking precedence."""
    trainer = config["trainer"] if config is not None else {}
    values = {
        "precision": trainer.get("precision") or "32",
        "devices": trainer.get("devices") if isinstance(trainer.get("devices"), int) else 1,
        "micro_batch": _batch_size(datamodule) or 1,
    }
    strategy = str(trainer.get("strategy") or "auto").lower()
    values["strategy"] = ("fsdp_backbones" if "fsdp_backbones" in strategy or "shardedbackbones" in strategy
                          else "fsdp" if ("fsdp" in strategy or "deepspeed" in strategy) else "ddp")
    values.update({k: v for k, v in given.items() if v is not None})
    if values["devices"] == 1 and values["strategy"] == "ddp":
        values["strategy"] = "single"
    return Setting(**values)


def _batch_size(datamodule) -> int | None:
    """The data module's ``batch_size``, or that of the module it wraps (``data``)."""
    while datamodule is not None:
        if isinstance(getattr(datamodule, "batch_size", None), int):
            return datamodule.batch_size
        datamodule = getattr(datamodule, "data", None)
    return None
