"""CLIP's vision tower as a frozen visual encoder (FROMAGe, GILL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmgen.components.base import VisualEncoder
from mmgen.components.hub import random_weights_requested, resolve_config, resolve_name, seeded
from mmgen.errors import ConfigError
from mmgen.quiet import quiet_load_report
from mmgen.precision import storage_dtype

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalized_pixels(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor, dtype) -> torch.Tensor:
    """RGB in [0, 1], (b, 3, h, w) -> the (b, 3, size, size) pixel values CLIP-style encoders
    take: bicubic resize if needed (antialiased when shrinking, so a 512-px image does not
    reach the encoder aliased), then per-channel normalisation."""
    if images.shape[-2:] != (size, size):
        shrink = images.shape[-2] > size or images.shape[-1] > size
        images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=shrink)
    return ((images - mean) / std).to(dtype)


class CLIPVisionEncoder(VisualEncoder):
    """Frozen CLIP vision model; features are its ``pooler_output`` (the post-LayerNorm CLS vector,
    1024-d for ViT-L/14), not the projected ``image_embeds``, as FROMAGe and GILL use.

    Args:
        name_or_path: Hub id or local folder of a CLIP model (or of its vision tower).
        config: ``CLIPVisionConfig`` values for random weights, or overrides of ``name_or_path``'s.
        random_weights: Build ``name_or_path``'s architecture with random weights.
        dtype: dtype of the frozen weights; "auto": the run's precision decides (mmgen.precision).
        seed: Seed of random builds: the same config always gives the same random weights.
    """

    n_tokens = 1

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict | None = None,
        random_weights: bool = False,
        dtype: str = "auto",
        seed: int = 0,
    ):
        super().__init__()
        self.seed = seed
        self.name_or_path = resolve_name(name_or_path)
        self.config_overrides = config
        self.random_weights = random_weights
        self.dtype_name, self.dtype = dtype, storage_dtype(dtype)
        self.model = None
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def configure(self) -> None:
        if self.model is not None:
            return
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if random_weights_requested(self.random_weights) or self.name_or_path is None:
            config = resolve_config(self.name_or_path, self.config_overrides, CLIPVisionConfig)
            with seeded(self.seed):
                model = CLIPVisionModel(config).to(self.dtype)
        else:
            from mmgen.components.hub import require_local_folder

            require_local_folder(self.name_or_path, "visual encoder")
            # A whole CLIPModel folder (as released) also holds the text tower, which transformers
            # reports key by key as unexpected; the vision tower's own keys are checked here instead.
            with quiet_load_report():
                model, info = CLIPVisionModel.from_pretrained(self.name_or_path, dtype=self.dtype,
                                                              output_loading_info=True)
            if info.get("missing_keys"):
                raise ConfigError(f"{self.name_or_path}: not a CLIP vision tower, missing "
                                  f"{sorted(info['missing_keys'])[:6]}")
        self.model = model.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.model is not None:
            self.model.eval()  # frozen: always inference behaviour
        return self

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @torch.no_grad()  # frozen: no activations kept for a backward pass
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = normalized_pixels(images, self.image_size, self.mean, self.std, self.dtype)
        pooled = self.model(pixel_values=pixels).pooler_output  # (b, feature_dim)
        return pooled.unsqueeze(1)  # (b, 1, feature_dim)
