"""MiniGPT-4's frozen visual path: EVA ViT-g -> Q-Former (32 queries) -> Linear(768, 4096).

REFERENCE.md sec. 5. ``transformers.Blip2VisionModel`` with the default ``Blip2VisionConfig`` is
EVA ViT-g/14 as BLIP-2 uses it (39 layers, width 1408, final LayerNorm included);
``Blip2QFormerModel`` plus a ``query_tokens`` parameter is the Q-Former. MiniGPT-4 takes both
from ``Salesforce/blip2-flan-t5-xxl`` and adds its own ``llama_proj`` (768 -> 4096). Everything
here is frozen: MiniGPT-5 trains none of it.

    images (b, 3, 224, 224) --ViT--> (b, 257, 1408) --Q-Former(32 queries)--> (b, 32, 768)
                             --llama_proj--> (b, 32, 4096)   one LLM input token per query
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from mmgen.components.base import VisualEncoder
from mmgen.components.clip_vision import CLIP_MEAN, CLIP_STD, normalized_pixels
from mmgen.components.hub import KNOWN_CONFIGS, random_weights_requested, register_known_config, resolve_name
from mmgen.errors import ConfigError

# BLIP-2 (FlanT5-XXL) architecture, as published: the vision and Q-Former configs are the
# transformers defaults, which are exactly EVA ViT-g/14 (39 layers) and BERT-base with
# cross-attention every other layer.
register_known_config(
    "Salesforce/blip2-flan-t5-xxl",
    dict(
        model_type="blip-2",
        vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                           num_attention_heads=16, image_size=224, patch_size=14,
                           layer_norm_eps=1e-6, qkv_bias=True),
        qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, cross_attention_frequency=2,
                            encoder_hidden_size=1408),
        num_query_tokens=32,
    ),
)


class QFormerEncoder(VisualEncoder):
    """Frozen BLIP-2 vision model + Q-Former + query tokens + MiniGPT-4's ``llama_proj``.

    The output is already in the LLM's input embedding space: (b, num_query_tokens, embed_dim),
    32 tokens per image at full size, inserted where a prompt says ``<ImageHere>``.

    Args:
        name_or_path: Hub id or local folder of a BLIP-2 checkpoint (MiniGPT-4 uses
            ``Salesforce/blip2-flan-t5-xxl``). Only ``vision_model.*``, ``qformer.*`` and
            ``query_tokens`` are read; the language model in the checkpoint is never loaded.
        projection: File with MiniGPT-4's projection weights (``llama_proj.weight``,
            ``llama_proj.bias``, at top level or under ``"model"``, as in
            ``pretrained_minigpt4.pth``), loaded with ``weights_only=True``. None: a random
            projection (tests, dry runs, or training one yourself).
        config: For random weights: ``{"vision_config": {...}, "qformer_config": {...},
            "num_query_tokens": n}``, or overrides of ``name_or_path``'s values.
        random_weights: Build ``name_or_path``'s architecture with random weights.
        dtype: dtype of the frozen weights.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        projection: str | None = None,
        config: dict | None = None,
        random_weights: bool = False,
        dtype: str = "float32",
    ):
        super().__init__()
        self.name_or_path = resolve_name(name_or_path)
        self.projection_path = projection
        self.config_overrides = config
        self.random_weights = random_weights
        self.dtype = getattr(torch, dtype)
        self.vision_model: nn.Module | None = None
        self.qformer: nn.Module | None = None
        self.query_tokens: nn.Parameter | None = None
        self.llama_proj: nn.Linear | None = None
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # -- building --------------------------------------------------------------------------------
    def configure(self, embed_dim: int) -> None:
        """Build (or load) the encoder; ``embed_dim`` is the LLM's input width (4096)."""
        if self.vision_model is not None:
            return
        from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

        random = random_weights_requested(self.random_weights) or self.name_or_path is None
        vision_values, qformer_values, n_queries = self._config_values()
        vision_config = Blip2VisionConfig(**vision_values)
        qformer_values.setdefault("encoder_hidden_size", vision_config.hidden_size)
        qformer_config = Blip2QFormerConfig(**qformer_values)
        self.vision_model = Blip2VisionModel(vision_config)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, n_queries, qformer_config.hidden_size))
        nn.init.normal_(self.query_tokens, std=qformer_config.initializer_range)
        self.llama_proj = nn.Linear(qformer_config.hidden_size, embed_dim)
        if not random:
            self._load_blip2(self.name_or_path)
        if self.projection_path is not None and not random_weights_requested(False):
            self._load_projection(self.projection_path)
        self.to(self.dtype)
        self.requires_grad_(False)
        self.train(self.training)

    def _config_values(self) -> tuple[dict, dict, int]:
        overrides = dict(self.config_overrides or {})
        name = self.name_or_path
        if name is not None and os.path.isdir(name):
            from transformers import Blip2Config

            loaded = Blip2Config.from_pretrained(name)
            base = dict(
                vision_config=loaded.vision_config.to_dict(),
                qformer_config=loaded.qformer_config.to_dict(),
                num_query_tokens=loaded.num_query_tokens,
            )
        elif name in KNOWN_CONFIGS:
            base = KNOWN_CONFIGS[name]
        elif name is None:
            base = {}
        else:
            from transformers import Blip2Config

            loaded = Blip2Config.from_pretrained(name)  # hub id not bundled: needs the hub
            base = dict(
                vision_config=loaded.vision_config.to_dict(),
                qformer_config=loaded.qformer_config.to_dict(),
                num_query_tokens=loaded.num_query_tokens,
            )
        if not base and not overrides:
            raise ConfigError("QFormerEncoder needs `name_or_path` (BLIP-2 hub id or folder) or `config`")
        vision = {**base.get("vision_config", {}), **overrides.get("vision_config", {})}
        qformer = {**base.get("qformer_config", {}), **overrides.get("qformer_config", {})}
        for values in (vision, qformer):
            for key in ("model_type", "transformers_version", "architectures"):
                values.pop(key, None)
        n_queries = overrides.get("num_query_tokens", base.get("num_query_tokens", 32))
        return vision, qformer, int(n_queries)

    def _load_blip2(self, name_or_path: str) -> None:
        """Read only the vision model, Q-Former and query tokens from a BLIP-2 checkpoint."""
        folder = Path(name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
        wanted = ("vision_model.", "qformer.", "query_tokens")
        state = _read_checkpoint_keys(folder, wanted)
        own = {"query_tokens": self.query_tokens}
        own.update({f"vision_model.{k}": v for k, v in self.vision_model.state_dict().items()})
        own.update({f"qformer.{k}": v for k, v in self.qformer.state_dict().items()})
        missing = sorted(set(own) - set(state))
        if missing:
            raise ConfigError(f"{folder}: BLIP-2 checkpoint lacks {missing[:6]}{'...' if len(missing) > 6 else ''}")
        with torch.no_grad():
            for key, target in own.items():
                if state[key].shape != target.shape:
                    raise ConfigError(f"{folder}: {key} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}")
                target.copy_(state[key])

    def _load_projection(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        try:
            weight, bias = state["llama_proj.weight"], state["llama_proj.bias"]
        except KeyError:
            raise ConfigError(f"{path}: no llama_proj.weight / llama_proj.bias (keys: {sorted(state)[:8]})") from None
        if weight.shape != self.llama_proj.weight.shape:
            raise ConfigError(f"{path}: llama_proj.weight is {tuple(weight.shape)}, expected {tuple(self.llama_proj.weight.shape)}")
        with torch.no_grad():
            self.llama_proj.weight.copy_(weight)
            self.llama_proj.bias.copy_(bias)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vision_model is not None:
            self.vision_model.eval()  # frozen: always inference behaviour
            self.qformer.eval()
        return self

    # -- using -----------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.llama_proj.out_features

    @property
    def image_size(self) -> int:
        return self.vision_model.config.image_size

    @torch.no_grad()  # frozen: no activations kept for a backward pass
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = normalized_pixels(images, self.image_size, self.mean, self.std, self.dtype)  # (b, 3, s, s)
        patches = self.vision_model(pixel_values=pixels).last_hidden_state  # (b, 1 + n_patches, 1408)
        queries = self.query_tokens.expand(images.shape[0], -1, -1)  # (b, 32, 768)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=patches, encoder_attention_mask=mask)
        return self.llama_proj(out.last_hidden_state)  # (b, 32, embed_dim)


def _read_checkpoint_keys(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a (possibly sharded) safetensors or PyTorch checkpoint whose names start
    with one of ``prefixes``; only the shards that hold them are opened."""
    index = next((folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (folder / n).is_file()), None)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if k.startswith(prefixes)})
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()][:1]
    if not files:
        raise ConfigError(f"{folder}: no model.safetensors / pytorch_model.bin checkpoint")
    state = {}
    for name in files:
        path = folder / name
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)})
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            state.update({k: v for k, v in loaded.items() if k.startswith(prefixes)})
    return state
