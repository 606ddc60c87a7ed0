"""Image files to tensors the visual encoders and image generators accept.

Everything here is PIL and torch: decoding, resizing and cropping need no torchvision (whose CUDA
wheels do not load next to a CPU torch), and the helpers below give the same pixels as torchvision's
``resize``/``center_crop``/``pil_to_tensor`` on PIL images, which call these same PIL operations.
Normalisation (CLIP or EVA mean/std, the VAE's [-1, 1]) is left to the component that reads the
pixels, so that data stays model-agnostic: every tensor made here is float RGB in [0, 1].

Two ways to make a picture square, both resizing with antialiasing (PIL's filters widen their
support when they shrink, so a 512 px photo brought to 224 px is filtered, not subsampled):

- ``fit="crop"``: shorter side to the target size, then a centre crop. What CLIP, BLIP-2 and
  MiniGPT-5's Q-Former inputs see; the default, so FROMAGe and GILL keep CLIP's preprocessing.
- ``fit="pad"``: pad the short side to a square with a background colour (the picture centred),
  then resize. MiniGPT-5 does this, with white, for the images its diffusion model learns to
  generate, so nothing of the target picture is cut away.
"""

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from mmgen.errors import DataError
from mmgen.files import require_regular_file

Fit = Literal["crop", "pad"]
Interpolation = Literal["bicubic", "bilinear"]
WHITE = (255, 255, 255)

_INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resize_shorter(image: Image.Image, size: int, interpolation: Interpolation = "bicubic") -> Image.Image:
    """Shorter side to ``size``, aspect kept (the longer side rounded down); PIL's resize, which
    widens its filter when it shrinks (antialiased)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new = (new_short, new_long) if width <= height else (new_long, new_short)  # (w, h)
    if new == (width, height):
        return image
    return image.resize(new, resample=_INTERPOLATIONS[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The centre ``size`` x ``size`` square of an image at least that large (odd margins
    rounded half to even, as torchvision does)."""
    width, height = image.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, h, w) in [0, 1]."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # uint8 (3, h, w)
    return pixels.to(torch.float32).mul_(1.0 / 255)


def to_pil(image: torch.Tensor) -> Image.Image:
    """Float (3, h, w) in [0, 1] -> RGB PIL image (values truncated to uint8, as torchvision does)."""
    array = image.detach().cpu().permute(1, 2, 0).numpy()  # (h, w, 3)
    return Image.fromarray((array * 255).astype(np.uint8))  # (h, w, 3) uint8: RGB


def pad_to_square(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """The picture centred on a square canvas of its longer side, filled with ``background``.

    An odd margin puts the extra pixel after the picture (offset rounded down), as MiniGPT-5 does.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_image(
    path: Path,
    image_size: int,
    fit: Fit = "crop",
    interpolation: Interpolation = "bicubic",
    flip: bool = False,
    background: tuple[int, int, int] = WHITE,
) -> torch.Tensor:
    """Read an image as float RGB in [0, 1], shape (3, image_size, image_size).

    Args:
        path: The image file.
        image_size: Side of the square result, in pixels.
        fit: ``"crop"`` (shorter side to ``image_size``, centre crop: CLIP's preprocessing, so
            features match those the encoder was trained on) or ``"pad"`` (pad to a square with
            ``background``, then resize: MiniGPT-5's generation targets).
        interpolation: Resampling filter, ``"bicubic"`` (CLIP) or ``"bilinear"`` (MiniGPT-5);
            antialiased either way.
        flip: Mirror left-right (training augmentation; the caller draws the coin).
        background: Padding colour for ``fit="pad"``.

    A path that is not a regular file, and an image of more pixels than PIL's
    ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb), raise DataError naming the file; otherwise
    raises whatever PIL raises for a missing or undecodable file, and callers add the context.
    """
    if fit not in ("crop", "pad"):
        raise ValueError(f"unknown fit {fit!r}; expected 'crop' or 'pad'")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {list(_INTERPOLATIONS)}")
    require_regular_file(path, "image")  # a named pipe would block the open forever
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; both are refused here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                width, height = image.size  # from the header, before decoding
                if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                    raise DataError(f"{path}: image of {width}x{height} pixels exceeds the limit of "
                                    f"{Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?); refused")
                rgb = image.convert("RGB")  # decodes now (PIL is lazy); also drops alpha and palettes
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise DataError(f"{path}: image too large to decode safely (a decompression bomb?): {error}") from None
    if fit == "pad":
        rgb = pad_to_square(rgb, background)
    rgb = resize_shorter(rgb, image_size, interpolation)
    rgb = center_crop(rgb, image_size)  # a no-op after padding
    if flip:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(rgb)  # float (3, S, S) in [0, 1]
