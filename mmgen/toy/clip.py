"""The toy world's CLIP: a transformers ``CLIPModel`` (vision + text) trained contrastively on the
world's image-caption pairs. Its vision tower is FROMAGe's and GILL's visual encoder; its text
tower is the diffusion model's text encoder, as CLIP's is Stable Diffusion's."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from mmgen.components.clip_vision import CLIP_MEAN, CLIP_STD
from mmgen.toy.training import distinct_caption_batch, fit, save_trained

# 32-px images in 8-px patches (16 tokens; 4-px patches were 2.5x slower and no better); text width = the UNet's cross-attention width.
VISION_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                     image_size=32, patch_size=8)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77)
PROJECTION_DIM = 64


def build_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    # The text tower pools at the first "</s>" (its eos_token_id); the CLIP-shaped tokenizer puts
    # one after every caption.
    text = dict(TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=VISION_CONFIG, projection_dim=PROJECTION_DIM))


def _pixels(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std  # what CLIPVisionEncoder feeds the tower (no resize at 32 px)


def _text(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(captions, padding=True, return_tensors="pt")


def embed(model, tokenizer, images: torch.Tensor | None = None, captions: list[str] | None = None,
          batch_size: int = 256) -> torch.Tensor:
    """Unit-norm projected embeddings (n, PROJECTION_DIM) of images (n, 3, 32, 32) or captions."""
    out = []
    with torch.no_grad():
        n = len(images) if images is not None else len(captions)
        for i in range(0, n, batch_size):
            if images is not None:
                features = model.get_image_features(pixel_values=_pixels(images[i:i + batch_size]))
            else:
                features = model.get_text_features(**_text(tokenizer, captions[i:i + batch_size]))
            features = getattr(features, "pooler_output", features)  # transformers 5: an output object
            out.append(F.normalize(features, dim=-1))
    return torch.cat(out)


def train_clip(tokenizer, images: torch.Tensor, captions: list[str], out_dir: Path, steps: int = 500,
               batch_size: int = 128, lr: float = 2e-3, seed: int = 0, log=print) -> dict:
    """Symmetric InfoNCE on (image, caption) pairs (``CLIPModel(return_loss=True)``); saves the
    model and the CLIP-shaped tokenizer to ``out_dir``."""
    torch.manual_seed(seed)
    model = build_clip(tokenizer).train()
    rng = random.Random(seed)
    pixels = _pixels(images)

    def loss(step: int) -> torch.Tensor:
        chosen = distinct_caption_batch(rng, captions, batch_size)
        text = _text(tokenizer, [captions[i] for i in chosen])
        return model(pixel_values=pixels[chosen], **text, return_loss=True).loss

    result = fit(model.parameters(), loss, steps=steps, lr=lr, log=log, name="clip")
    return save_trained(model, tokenizer, out_dir, result)


def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, scenes: list) -> dict[str, float]:
    """Shape and colour read by CLIP zero-shot (no labels trained on): for each image, the
    captions that differ from its true one in that attribute only compete (4 for shape, 6 for
    colour), and the nearest one must name the true value."""
    from mmgen.data.toy import TOY_COLORS, TOY_SHAPES, caption_scene

    image_embeds = embed(model, tokenizer, images=images)  # (n, d)
    result = {}
    for attribute, values in (("shape", TOY_SHAPES), ("color", TOY_COLORS)):
        candidates = [caption_scene(s.replace(**{attribute: v})) for s in scenes for v in values]
        texts = embed(model, tokenizer, captions=candidates).view(len(scenes), len(values), -1)  # (n, k, d)
        predicted = torch.einsum("nd,nkd->nk", image_embeds, texts).argmax(-1)
        truth = torch.tensor([values.index(getattr(s, attribute)) for s in scenes])
        result[attribute] = round((predicted == truth).float().mean().item(), 4)
    return result


def retrieval_r1(model, tokenizer, images: torch.Tensor, captions: list[str]) -> float:
    """Text-to-image recall@1 of CLIP itself among ``images`` (the pairs' own images)."""
    sims = embed(model, tokenizer, captions=captions) @ embed(model, tokenizer, images=images).T
    return round((sims.argmax(-1) == torch.arange(len(captions))).float().mean().item(), 4)
