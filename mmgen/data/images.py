"""Image files to tensors the visual encoders accept.

Decoding is PIL's: torchvision's compiled decoders may be unavailable (see `mmgen._torchvision_fix`).
Normalisation (CLIP or EVA mean/std) is left to the visual encoder, so that data stays encoder-agnostic.
"""

from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F


def load_image(path: Path, image_size: int) -> torch.Tensor:
    """Read an image as float RGB in [0, 1], shape (3, image_size, image_size).

    Resizes the shorter side to `image_size` (bicubic, antialiased) and centre-crops, as CLIP's
    preprocessing does, so features match those the encoder was trained on.
    Raises whatever PIL raises for a missing or undecodable file; callers add the context.
    """
    with Image.open(path) as image:
        rgb = image.convert("RGB")  # decodes now (PIL is lazy); also drops alpha and palettes
    rgb = F.resize(rgb, [image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    rgb = F.center_crop(rgb, [image_size, image_size])
    pixels = F.pil_to_tensor(rgb)  # uint8 (3, S, S)
    return F.to_dtype(pixels, torch.float32, scale=True)  # float (3, S, S) in [0, 1]
