"""MiniGPT-4's frozen visual path: EVA ViT-g -> Q-Former (32 queries) -> Linear(768, 4096).

``transformers.Blip2VisionModel`` with the default ``Blip2VisionConfig`` is
EVA ViT-g/14 as BLIP-2 uses it (39 layers, width 1408); its ``post_layernorm`` is LAVIS's
``ln_vision`` (with LAVIS's eps, 1e-5, set here); ``Blip2QFormerModel`` plus a ``query_tokens``
parameter is the Q-Former. MiniGPT-4 takes both from BLIP-2 FlanT5-XXL and adds its own
``llama_proj`` (768 -> 4096). Weights come from a transformers BLIP-2 folder or hub id, or from
the LAVIS files MiniGPT-4 itself loads (``mmgen.components.lavis`` has the key mapping).
Everything here is frozen: MiniGPT-5 trains none of it.

    images (b, 3, 224, 224) --ViT--> (b, 257, 1408) --ln_vision--> --Q-Former(32 queries)--> (b, 32, 768)
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
from mmgen.components.hub import KNOWN_CONFIGS, random_weights_requested, register_known_config, resolve_name, seeded
from mmgen.components.lavis import LavisLoad
from mmgen.errors import ConfigError
from mmgen.precision import storage_dtype

#: The hub id of the BLIP-2 MiniGPT-4 takes its Q-Former from; also the architecture LAVIS files
#: are loaded into when ``name_or_path`` is not given.
BLIP2_FLAN_T5_XXL = "Salesforce/blip2-flan-t5-xxl"
#: eps of LAVIS's ``ln_vision`` (torch's LayerNorm default); the EVA blocks use 1e-6.
LN_VISION_EPS = 1e-5

# BLIP-2 (FlanT5-XXL) architecture, as published: the vision and Q-Former configs are the
# transformers defaults, which are exactly EVA ViT-g/14 (39 layers) and BERT-base with
# cross-attention every other layer.
register_known_config(
    BLIP2_FLAN_T5_XXL,
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

    Weights come from one of two places: a transformers BLIP-2 checkpoint (``name_or_path``), or
    the LAVIS files MiniGPT-4 loads (``lavis_vit`` + ``lavis_qformer``; then ``name_or_path``, if
    given, names only the architecture). Either way every tensor is checked (name, shape) and
    nothing is copied unless all of them have a value.

    Args:
        name_or_path: Hub id or local folder of a transformers BLIP-2 checkpoint (MiniGPT-4's
            Q-Former is ``Salesforce/blip2-flan-t5-xxl``'s). Only ``vision_model.*``, ``qformer.*``
            and ``query_tokens`` are read; the language model in it is never loaded. With
            ``lavis_*`` files: the architecture only (default: BLIP-2 FlanT5-XXL's, bundled).
        projection: MiniGPT-4's checkpoint with ``llama_proj.weight`` / ``.bias`` (at top level or
            under ``"model"``, as in ``prerained_minigpt4_7b.pth``), loaded last, as MiniGPT-4
            does: visual-path tensors it also holds replace the earlier ones. None: a random
            projection (tests, dry runs, or training one yourself).
        lavis_vit: LAVIS's EVA ViT-g file (``eva_vit_g.pth``: EVA's own key names, 40 blocks of
            which the first ``num_hidden_layers`` (39) are used).
        lavis_qformer: LAVIS's BLIP-2 file MiniGPT-4 uses (``blip2_pretrained_flant5xxl.pth``:
            ``Qformer.bert.*``, ``query_tokens``, ``ln_vision.*`` under ``"model"``), loaded after
            ``lavis_vit``. Give both: ``ln_vision`` and the Q-Former are only in this file.
        ln_vision_eps: eps of the LayerNorm between the ViT and the Q-Former (``post_layernorm``):
            LAVIS's 1e-5 (transformers would use the blocks' 1e-6).
        config: For random weights: ``{"vision_config": {...}, "qformer_config": {...},
            "num_query_tokens": n}``, or overrides of ``name_or_path``'s values.
        random_weights: Build the architecture with random weights (no file is read but
            ``projection``).
        dtype: dtype of the frozen weights; "auto": the run's precision decides (mmgen.precision).
            The LAVIS ViT file is fp16: float32 holds it exactly.
        seed: Seed of random builds (and of ``llama_proj`` without ``projection``): the same config
            always gives the same random weights.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        projection: str | None = None,
        lavis_vit: str | None = None,
        lavis_qformer: str | None = None,
        ln_vision_eps: float = LN_VISION_EPS,
        config: dict | None = None,
        random_weights: bool = False,
        dtype: str = "auto",
        seed: int = 0,
    ):
        super().__init__()
        self.seed = seed
        self.name_or_path = resolve_name(name_or_path)
        self.projection_path = resolve_name(projection)  # mmgen:NAME: a file under mmgen/assets
        self.lavis_vit = lavis_vit
        self.lavis_qformer = lavis_qformer
        self.ln_vision_eps = ln_vision_eps
        self.config_overrides = config
        self.random_weights = random_weights
        self.dtype_name, self.dtype = dtype, storage_dtype(dtype)
        self.vision_model: nn.Module | None = None
        self.qformer: nn.Module | None = None
        self.query_tokens: nn.Parameter | None = None
        self.llama_proj: nn.Linear | None = None
        self.load_summary: list[str] = []  # where each loaded tensor came from (or why one was not used)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def uses_lavis(self) -> bool:
        return self.lavis_vit is not None or self.lavis_qformer is not None

    # -- building --------------------------------------------------------------------------------
    def configure(self, embed_dim: int) -> None:
        """Build (or load) the encoder; ``embed_dim`` is the LLM's input width (4096)."""
        if self.vision_model is not None:
            return
        from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

        vision_values, qformer_values, n_queries = self._config_values()
        vision_config = Blip2VisionConfig(**vision_values)
        qformer_values["encoder_hidden_size"] = vision_config.hidden_size  # cross-attention reads the ViT
        qformer_config = Blip2QFormerConfig(**qformer_values)
        with seeded(self.seed):  # what no file fills stays the same for the same config
            self.vision_model = Blip2VisionModel(vision_config)
            self.vision_model.post_layernorm.eps = self.ln_vision_eps  # LAVIS's ln_vision (see lavis.py)
            self.qformer = Blip2QFormerModel(qformer_config)
            self.query_tokens = nn.Parameter(torch.zeros(1, n_queries, qformer_config.hidden_size))
            nn.init.normal_(self.query_tokens, std=qformer_config.initializer_range)
            self.llama_proj = nn.Linear(qformer_config.hidden_size, embed_dim)
        self._load_weights()
        self.to(self.dtype)
        self.requires_grad_(False)
        self.train(self.training)

    def _load_weights(self) -> None:
        """Plan every source tensor (BLIP-2 folder or LAVIS files, then the projection file), check
        that the backbone (and, with ``projection``, ``llama_proj``) is complete, then copy."""
        random = random_weights_requested(self.random_weights)
        backbone = not random and (self.uses_lavis or self.name_or_path is not None)
        projection = self.projection_path is not None and not random_weights_requested(False)
        if not backbone and not projection:
            return
        load = LavisLoad(self)
        if backbone and self.uses_lavis:
            if self.lavis_vit is not None:
                load.add_lavis(self.lavis_vit, bare_eva=True)
            if self.lavis_qformer is not None:
                load.add_lavis(self.lavis_qformer)
        elif backbone:
            folder = self._blip2_folder(self.name_or_path)
            load.add_named(folder.name, _read_checkpoint_keys(folder, ("vision_model.", "qformer.", "query_tokens")))
        if projection:
            load.add_lavis(self.projection_path)
        own = list(self.state_dict())
        required = [n for n in own if not n.startswith("llama_proj.")] if backbone else []
        required += [n for n in own if n.startswith("llama_proj.")] if projection else []
        load.apply(required)
        self.load_summary = load.summary

    def _config_values(self) -> tuple[dict, dict, int]:
        overrides = dict(self.config_overrides or {})
        name = self.name_or_path or (BLIP2_FLAN_T5_XXL if self.uses_lavis else None)
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

    @staticmethod
    def _blip2_folder(name_or_path: str) -> Path:
        folder = Path(name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
        return folder

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
        return self.llama_proj(self.query_features(images))  # (b, 32, embed_dim)

    @torch.no_grad()
    def query_features(self, images: torch.Tensor) -> torch.Tensor:
        """The Q-Former's output before ``llama_proj``: (b, 32, 768); what training a
        projection (MiniGPT-4's first stage) starts from."""
        pixels = normalized_pixels(images, self.image_size, self.mean, self.std, self.dtype)  # (b, 3, s, s)
        patches = self.vision_model(pixel_values=pixels).last_hidden_state  # (b, 1 + n_patches, 1408)
        queries = self.query_tokens.expand(images.shape[0], -1, -1)  # (b, 32, 768)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=patches, encoder_attention_mask=mask)
        return out.last_hidden_state


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
            from mmgen.checkpoints import load_torch_file

            loaded = load_torch_file(path, "weights file")
            state.update({k: v for k, v in loaded.items() if k.startswith(prefixes)})
    return state
