"""Image files to tensors the visual encoders and image generators accept.

Decoding is PIL's: torchvision's compiled decoders may be unavailable (see `mmgen._torchvision_fix`).
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

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mmgen.errors import DataError
from mmgen.files import require_regular_file

Fit = Literal["crop", "pad"]
Interpolation = Literal["bicubic", "bilinear"]
WHITE = (255, 255, 255)

_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


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
    # On a PIL image this is PIL's resize, which is always antialiased.
    rgb = F.resize(rgb, [image_size], interpolation=_INTERPOLATIONS[interpolation], antialias=True)
    rgb = F.center_crop(rgb, [image_size, image_size])  # a no-op after padding
    if flip:
        rgb = F.horizontal_flip(rgb)
    pixels = F.pil_to_tensor(rgb)  # uint8 (3, S, S)
    return F.to_dtype(pixels, torch.float32, scale=True)  # float (3, S, S) in [0, 1]
