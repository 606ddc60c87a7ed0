"""MiniGPT-4's visual path as LAVIS saves it, mapped onto transformers' BLIP-2 modules.

MiniGPT-4 (which MiniGPT-5 reuses) builds EVA ViT-g, ``ln_vision``, the Q-Former and
``llama_proj`` with LAVIS code and fills them from three files, each loaded over the last with
``load_state_dict(strict=False)``:

1. ``eva_vit_g.pth``: EVA ViT-g/14, fp16, keys without a prefix (``blocks.0.attn.qkv.weight``).
   It has 40 blocks; LAVIS builds 39 (``depth=39``), so the last block is never used.
2. ``blip2_pretrained_flant5xxl.pth`` = ``{'model': ...}``: BLIP-2's Q-Former (``Qformer.bert.*``),
   ``query_tokens`` and ``ln_vision.*``, plus BLIP-2's text side and stage-1 heads, which MiniGPT-4
   deletes or never calls.
3. MiniGPT-4's checkpoint, e.g. ``prerained_minigpt4_7b.pth`` (sic) = ``{'model': ...}``:
   ``llama_proj.*`` (a full MiniGPT-4 checkpoint may hold more; the LLM's own weights are not ours).

:class:`LavisLoad` replays that: every key of every file is placed into one tensor of
``QFormerEncoder`` (shape checked) or reported with the reason it is not used; a later file's
value replaces an earlier one's (reported as superseded). Unknown keys, wrong shapes and
parameters left without a value raise ConfigError naming file and key before anything is copied.

Key mapping (``i``: ViT block, ``j``: Q-Former layer; docs/weights.md has the table):

    LAVIS                                         QFormerEncoder
    visual_encoder.cls_token (1, 1, w)            vision_model.embeddings.class_embedding
    visual_encoder.pos_embed (1, 1 + n, w)        vision_model.embeddings.position_embedding (absolute)
    visual_encoder.patch_embed.proj.*             vision_model.embeddings.patch_embedding.*   (Conv2d)
    visual_encoder.blocks.i.norm1.* / norm2.*     vision_model.encoder.layers.i.layer_norm1.* / layer_norm2.*
    visual_encoder.blocks.i.attn.qkv.weight       vision_model.encoder.layers.i.self_attn.qkv.weight (3w, w)
    visual_encoder.blocks.i.attn.q_bias / v_bias  vision_model.encoder.layers.i.self_attn.qkv.bias
                                                    = [q_bias, 0, v_bias]: EVA has no key bias
    visual_encoder.blocks.i.attn.proj.*           vision_model.encoder.layers.i.self_attn.projection.*
    visual_encoder.blocks.i.mlp.fc1.* / fc2.*     vision_model.encoder.layers.i.mlp.fc1.* / fc2.*
    ln_vision.*                                   vision_model.post_layernorm.*  (eps 1e-5, see below)
    Qformer.bert.embeddings.LayerNorm.*           qformer.layernorm.*
    Qformer.bert.encoder.layer.j.attention.self.{query,key,value}.*
                                                  qformer.encoder.layer.j.attention.attention.{query,key,value}.*
    Qformer.bert.encoder.layer.j.attention.output.{dense,LayerNorm}.*
                                                  qformer.encoder.layer.j.attention.output.{dense,LayerNorm}.*
    Qformer.bert.encoder.layer.j.crossattention.{self,output}.*  (every other layer)
                                                  qformer.encoder.layer.j.crossattention.{attention,output}.*
    Qformer.bert.encoder.layer.j.{intermediate_query,output_query}.*
                                                  qformer.encoder.layer.j.{intermediate_query,output_query}.*
    query_tokens (1, 32, 768)                     query_tokens
    llama_proj.* (4096, 768)                      llama_proj.*

What the transformers modules express exactly, and what they do not:
- The EVA blocks are pre-norm ViT blocks (LayerNorm eps 1e-6, exact GELU MLP, no layer scale, no
  relative position bias, a fused qkv projection whose key bias is a constant zero):
  ``Blip2EncoderLayer`` computes the same. Its qkv bias is one (3w,) parameter whose key third
  is set to zero here.
- ``Blip2VisionModel.post_layernorm`` is LAVIS's ``ln_vision``, but transformers builds it with the
  blocks' eps (1e-6); LAVIS uses ``nn.LayerNorm``'s default 1e-5. ``QFormerEncoder`` sets it.
  LAVIS also computes ``ln_vision`` in float32 whatever the input dtype; with a half-precision
  ``dtype`` mmgen computes it in that dtype.
- The official run casts the ViT's Linear/Conv weights to fp16 and runs the path under CUDA
  autocast(fp16), keeping LayerNorm weights, position embeddings and the Q-Former in fp32.
  mmgen casts every weight to one ``dtype``: float32 holds the fp16 files exactly.
- Keys LAVIS itself ignores (``strict=False``) are reported, not used: the 40th block, and any
  layer-scale (``gamma_1``/``gamma_2``) or relative-position tensors, since LAVIS builds EVA
  ViT-g without either. Relative-key position embeddings in the Q-Former (``distance_embedding``)
  would change its output and transformers' Q-Former has none: they are an error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from mmgen.errors import ConfigError

log = logging.getLogger(__name__)

#: bias part of a fused (3w,) qkv bias: 0 = query, 2 = value (the key part is a constant zero)
QUERY, VALUE = 0, 2
_PART_NAMES = {QUERY: "query", VALUE: "value"}

#: Known LAVIS / MiniGPT-4 keys that are deliberately not used, with the reason (first match wins).
NOT_USED: list[tuple[str, str]] = [
    (r"visual_encoder\.blocks\.\d+\.gamma_[12]$",
     "layer scale: LAVIS builds EVA ViT-g without it (init_values=None) and ignores it too"),
    (r"visual_encoder\.(blocks\.\d+\.attn\.)?(rel_pos_bias\.)?relative_position_(bias_table|index)$",
     "relative position bias: LAVIS builds EVA ViT-g with absolute positions only and ignores it too"),
    (r"visual_encoder\.(norm|fc_norm|head|lm_head)\.",
     "EVA's own final norm / classifier / pre-training head: LAVIS's ViT-g has none (ln_vision follows it instead)"),
    (r"visual_encoder\.mask_token$", "EVA's masked-image pre-training token: LAVIS's ViT-g has none"),
    (r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.|Qformer\.bert\.embeddings\.position_ids$",
     "the Q-Former's text embeddings: MiniGPT-4 deletes them (it feeds query tokens only)"),
    (r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
     "the Q-Former's text feed-forward: MiniGPT-4 deletes it (query tokens use intermediate_query/output_query)"),
    (r"Qformer\.cls\.", "the Q-Former's text LM head: MiniGPT-4 deletes it (Qformer.cls = None)"),
    (r"Qformer\.bert\.pooler\.", "BERT pooler: LAVIS's Q-Former has none"),
    (r"(vision_proj|text_proj|itm_head)\.|temp$",
     "BLIP-2 stage-1 contrastive / matching heads: MiniGPT-4 never calls them"),
    (r"(llama_model|t5_model|opt_model)\.", "a language model: mmgen's LLM component loads its own weights"),
    (r"(t5_proj|opt_proj)\.", "BLIP-2's projection into another language model (MiniGPT-4 uses llama_proj)"),
]
#: Keys that would change the output and that transformers' modules cannot express.
UNSUPPORTED: list[tuple[str, str]] = [
    (r"Qformer\.bert\.encoder\.layer\.\d+\.(attention|crossattention)\.self\.distance_embedding\.",
     "relative-key position embeddings in the Q-Former: not BLIP-2's (absolute), and "
     "transformers' Blip2QFormerModel has none"),
]
#: EVA's own key names, as ``eva_vit_g.pth`` stores them (no ``visual_encoder.`` prefix).
BARE_EVA = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "rel_pos_bias.", "norm.", "fc_norm.", "head.",
            "lm_head.", "mask_token")


def lavis_key_map(vision_model: nn.Module, qformer: nn.Module) -> dict[str, tuple[str, int | None]]:
    """LAVIS key -> (QFormerEncoder tensor name, part of a fused qkv bias or None), built from
    the configured modules: their layer count and which Q-Former layers cross-attend."""
    keys: dict[str, tuple[str, int | None]] = {
        "visual_encoder.cls_token": ("vision_model.embeddings.class_embedding", None),
        "visual_encoder.pos_embed": ("vision_model.embeddings.position_embedding", None),
        "ln_vision.weight": ("vision_model.post_layernorm.weight", None),
        "ln_vision.bias": ("vision_model.post_layernorm.bias", None),
        "Qformer.bert.embeddings.LayerNorm.weight": ("qformer.layernorm.weight", None),
        "Qformer.bert.embeddings.LayerNorm.bias": ("qformer.layernorm.bias", None),
        "query_tokens": ("query_tokens", None),
    }
    wb = ("weight", "bias")
    for p in wb:
        keys[f"visual_encoder.patch_embed.proj.{p}"] = (f"vision_model.embeddings.patch_embedding.{p}", None)
        keys[f"llama_proj.{p}"] = (f"llama_proj.{p}", None)
    for i in range(len(vision_model.encoder.layers)):
        src, dst = f"visual_encoder.blocks.{i}.", f"vision_model.encoder.layers.{i}."
        keys[src + "attn.qkv.weight"] = (dst + "self_attn.qkv.weight", None)
        keys[src + "attn.q_bias"] = (dst + "self_attn.qkv.bias", QUERY)
        keys[src + "attn.v_bias"] = (dst + "self_attn.qkv.bias", VALUE)
        for lavis, hf in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.proj", "self_attn.projection"),
                          ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in wb:
                keys[f"{src}{lavis}.{p}"] = (f"{dst}{hf}.{p}", None)
    for j, layer in enumerate(qformer.encoder.layer):
        src, dst = f"Qformer.bert.encoder.layer.{j}.", f"qformer.encoder.layer.{j}."
        blocks = ["attention"] + (["crossattention"] if layer.has_cross_attention else [])
        names = [(f"{b}.self.{m}", f"{b}.attention.{m}") for b in blocks for m in ("query", "key", "value")]
        names += [(f"{b}.output.{m}", f"{b}.output.{m}") for b in blocks for m in ("dense", "LayerNorm")]
        names += [("intermediate_query.dense", "intermediate_query.dense"), ("output_query.dense", "output_query.dense"),
                  ("output_query.LayerNorm", "output_query.LayerNorm")]
        if hasattr(layer, "intermediate"):  # use_qformer_text_input: the text feed-forward is built too
            names += [("intermediate.dense", "intermediate.dense"), ("output.dense", "output.dense"),
                      ("output.LayerNorm", "output.LayerNorm")]
        for lavis, hf in names:
            for p in wb:
                keys[f"{src}{lavis}.{p}"] = (f"{dst}{hf}.{p}", None)
    return keys


def read_lavis_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A LAVIS / MiniGPT-4 ``.pth`` as {key: tensor}: the ``'model'`` dict where there is one,
    else the top level. Read with ``weights_only=True`` on the CPU (a pickle from the internet
    can run code)."""
    from mmgen.checkpoints import require_regular_file

    path = require_regular_file(path, "LAVIS checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, a pickled object not allowed
        hint = (" It pickles Python objects besides tensors; mmgen does not unpickle downloaded files. If you trust "
                "it, keep only the weights: torch.save({'model': torch.load(path, weights_only=False)['model']}, new_path)."
                if "weights only load failed" in str(error).lower() else " Truncated or damaged file?")
        raise ConfigError(f"{path}: cannot be read with torch.load(weights_only=True).{hint} "
                          f"({type(error).__name__}: {error})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a dict of tensors (or {{'model': ...}}), found {type(data).__name__}")
    state = data["model"] if isinstance(data.get("model"), dict) else data
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{path}: entries that are not tensors: {bad[:8]}")
    from mmgen.checkpoints import check_tensors

    return check_tensors(state, str(path))


class LavisLoad:
    """Source tensors -> ``QFormerEncoder``'s tensors, planned in full, then copied at once.

    ``add_lavis(path)`` and ``add_named(label, state)`` (a state already in QFormerEncoder's names,
    as a BLIP-2 folder of transformers gives it) plan values; later sources replace earlier ones.
    ``apply(required)`` checks that every required tensor has a value and copies. ``summary``
    lists where each source tensor went, or why it was not used.
    """

    def __init__(self, encoder: nn.Module):
        self.targets = dict(encoder.state_dict(keep_vars=True))  # name -> parameter
        self.key_map = lavis_key_map(encoder.vision_model, encoder.qformer)
        self.n_vision_layers = len(encoder.vision_model.encoder.layers)
        self.values: dict[tuple[str, int | None], tuple[str, torch.Tensor]] = {}  # (target, part) -> (label, tensor)
        self.summary: list[str] = []

    # -- planning ------------------------------------------------------------------------------
    def add_lavis(self, path: str | Path, bare_eva: bool = False) -> None:
        """Plan every key of a LAVIS-layout file; unknown keys are an error naming them all.
        ``bare_eva``: the file may use EVA's own names (``eva_vit_g.pth``: ``blocks.0...``),
        which mean ``visual_encoder.<name>``."""
        path = Path(path)
        unmapped = sorted(set(self.targets) - {t for t, _ in self.key_map.values()})
        if unmapped:  # a transformers version whose BLIP-2 modules have tensors LAVIS has no name for
            raise ConfigError(f"QFormerEncoder has tensors the LAVIS key mapping does not fill: {unmapped[:8]}")
        state = read_lavis_file(path)
        unknown = []
        for original, tensor in state.items():
            label = f"{path.name}:{original}"
            key = f"visual_encoder.{original}" if bare_eva and original.startswith(BARE_EVA) else original
            if key in self.key_map:
                self._place(label, tensor, *self.key_map[key])
                continue
            reason = self._not_used(key)
            if reason is None:
                unknown.append(original)
            elif reason.startswith("error: "):
                raise ConfigError(f"{path}: {original}: {reason.removeprefix('error: ')}")
            else:
                self.summary.append(f"{label}: not used ({reason})")
        if unknown:
            raise ConfigError(f"{path}: keys with no place in QFormerEncoder (nothing was loaded): {unknown[:10]}"
                              f"{f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''}")

    def add_named(self, label: str, state: dict[str, torch.Tensor]) -> None:
        """Plan tensors already named as QFormerEncoder's (a transformers BLIP-2 checkpoint)."""
        for key, tensor in state.items():
            if key in self.targets:
                self._place(f"{label}:{key}", tensor, key, None)
            else:
                self.summary.append(f"{label}:{key}: not used (not a tensor of the configured BLIP-2 modules)")

    def _not_used(self, key: str) -> str | None:
        for pattern, reason in UNSUPPORTED:
            if re.match(pattern, key):
                return "error: " + reason
        block = re.match(r"visual_encoder\.blocks\.(\d+)\.", key)
        if block and int(block.group(1)) >= self.n_vision_layers:
            return (f"ViT block {block.group(1)}: the model uses the first {self.n_vision_layers} "
                    "(BLIP-2 and MiniGPT-4 drop EVA ViT-g's last block)")
        for pattern, reason in NOT_USED:
            if re.match(pattern, key):
                return reason
        return None

    def _place(self, label: str, tensor: torch.Tensor, target: str, part: int | None) -> None:
        full = self.targets[target]
        shape = tuple(full.shape) if part is None else (full.shape[0] // 3,)
        if tuple(tensor.shape) != shape:
            raise ConfigError(f"{label} has shape {tuple(tensor.shape)}, {target} needs {shape}"
                              f"{' (one third of the fused qkv bias)' if part is not None else ''}")
        if not tensor.is_floating_point():
            raise ConfigError(f"{label} has dtype {tensor.dtype}, {target} needs floating point values")
        # A later file replaces an earlier one, as strict=False loading does. A whole fused bias
        # replaces both thirds; a third replaces that third of an earlier whole bias.
        replaced = [(target, part)] + ([(target, QUERY), (target, VALUE)] if part is None else [])
        for key in replaced:
            if key in self.values:
                self.summary.append(f"{self.values.pop(key)[0]}: superseded by {label}")
        if part is not None and (target, None) in self.values:
            self.summary.append(f"{self.values[(target, None)][0]}: its {_PART_NAMES[part]} third superseded by {label}")
        self.values[(target, part)] = (label, tensor)
        where = target if part is None else f"{target} ({_PART_NAMES[part]} third)"
        self.summary.append(f"{label} -> {where}")

    # -- applying ------------------------------------------------------------------------------
    def apply(self, required: list[str]) -> None:
        """Check that each of ``required`` (tensor names) has a value, then copy every planned
        value; nothing is copied if anything is missing."""
        final = {target: self._assemble(target) for target in {t for t, _ in self.values}}
        missing = [t for t in required if final.get(t) is None]
        if missing:
            named = [f"{t} (LAVIS: {', '.join(self._lavis_names(t))})" for t in missing]
            files = sorted({label.split(":", 1)[0] for label, _ in self.values.values()})
            raise ConfigError(f"{', '.join(files) or 'the given files'}: no value for {named[:8]}"
                              f"{f' and {len(named) - 8} more' if len(named) > 8 else ''} (nothing was loaded)")
        with torch.no_grad():
            for target, tensor in final.items():
                if tensor is not None:
                    self.targets[target].copy_(tensor)
        for line in self.summary:
            log.info(line)

    def _lavis_names(self, target: str) -> list[str]:
        """The LAVIS keys that would give ``target`` and were not given."""
        return [key for key, (t, part) in self.key_map.items() if t == target and (t, part) not in self.values]

    def _assemble(self, target: str) -> torch.Tensor | None:
        """A target's value: the whole tensor, or a fused qkv bias from its query and value
        thirds (key third zero, as EVA has no key bias) over any whole value given earlier."""
        whole = self.values.get((target, None))
        parts = {p: self.values[(target, p)][1] for p in (QUERY, VALUE) if (target, p) in self.values}
        if not parts:
            return whole[1] if whole else None
        if whole is None and len(parts) < 2:
            return None  # half a bias: reported as missing
        base = whole[1].detach().clone() if whole else torch.zeros(self.targets[target].shape, dtype=torch.float32)
        third = base.shape[0] // 3
        if whole is None:
            base[third : 2 * third] = 0  # EVA's key bias: a constant zero
        for part, tensor in parts.items():
            base[part * third : (part + 1) * third] = tensor
        return base
