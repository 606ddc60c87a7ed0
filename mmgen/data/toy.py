"""A generated toy world of coloured shapes, for tests and the CPU demo (no downloads).

Each image is one shape on a plain background, captioned "a {color} {shape} on a {bg_color}
background". The caption fully describes what matters in the image, the vocabulary is a dozen
words, and any number of examples can be generated in seconds, so tiny models can visibly learn
captioning, retrieval and generation on a laptop.
"""

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from mmgen.data.captions import CaptionDataModule

# Colour names and RGB values, far apart so that even 32 px images separate them.
TOY_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
}
TOY_COLORS: list[str] = list(TOY_RGB)
TOY_SHAPES: list[str] = ["circle", "square", "triangle", "cross"]
CAPTION_TEMPLATE = "a {color} {shape} on a {bg_color} background"

# Bump when the drawing or the file layout changes, so cached datasets are regenerated.
TOY_FORMAT_VERSION = 1
SUPERSAMPLE = 4  # draw at 4x and downsample: antialiased edges, as in natural images


def toy_vocabulary() -> list[str]:
    """Every word a toy caption can contain, sorted."""
    template_words = CAPTION_TEMPLATE.format(color="", shape="", bg_color="").split()
    return sorted(set(template_words) | set(TOY_COLORS) | set(TOY_SHAPES))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":  # pointing up
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "cross":  # a plus sign, arms a third of the extent wide
        arm = (right - left) // 3
        draw.rectangle((left + arm, top, right - arm, bottom), fill=fill)
        draw.rectangle((left, top + arm, right, bottom - arm), fill=fill)
    else:
        raise ValueError(f"unknown toy shape {shape!r}; known: {TOY_SHAPES}")


def draw_toy_image(
    color: str, shape: str, bg_color: str, image_size: int, rng: random.Random
) -> Image.Image:
    """One shape, its size (40-70% of the side) and position jittered, on a plain background."""
    side = image_size * SUPERSAMPLE
    extent = int(side * rng.uniform(0.4, 0.7))
    left = rng.randint(0, side - extent)
    top = rng.randint(0, side - extent)
    image = Image.new("RGB", (side, side), TOY_RGB[bg_color])
    _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + extent, top + extent), TOY_RGB[color])
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _write_split(root: Path, split: str, n: int, image_size: int, rng: random.Random) -> None:
    rows = ["caption\timage"]
    for i in range(n):
        color, shape = rng.choice(TOY_COLORS), rng.choice(TOY_SHAPES)
        bg_color = rng.choice([c for c in TOY_COLORS if c != color])
        name = f"{split}_{i:05d}.png"
        draw_toy_image(color, shape, bg_color, image_size, rng).save(root / "images" / name)
        rows.append(CAPTION_TEMPLATE.format(color=color, shape=shape, bg_color=bg_color) + "\t" + name)
    (root / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def write_toy_dataset(root: Path, n_train: int, n_val: int, image_size: int = 32, seed: int = 0) -> None:
    """Write `root/images/*.png`, `root/train.tsv` and `root/val.tsv` (paths relative to images/).

    Deterministic: the same arguments give byte-identical files. `root/DONE`, written last, holds
    the parameters as JSON; a dataset with a matching marker is kept, anything else (no marker: an
    interrupted write; other parameters) is regenerated.
    """
    root = Path(root)
    marker = root / "DONE"
    params = {
        "n_train": n_train,
        "n_val": n_val,
        "image_size": image_size,
        "seed": seed,
        "version": TOY_FORMAT_VERSION,
    }
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return
    marker.unlink(missing_ok=True)  # from here until the end the dataset is incomplete
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in [*images.glob("train_*.png"), *images.glob("val_*.png")]:  # only files we wrote
        stale.unlink()
    rng = random.Random(seed)
    _write_split(root, "train", n_train, image_size, rng)
    _write_split(root, "val", n_val, image_size, rng)
    marker.write_text(json.dumps(params, sort_keys=True) + "\n")


class ToyCaptionDataModule(CaptionDataModule):
    """Captioned toy images generated on first use, served like `CaptionDataModule`.

    Args:
        root: Folder for the generated dataset (created if missing, regenerated if its parameters
            differ).
        n_train: Number of training examples to generate.
        n_val: Number of validation examples to generate.
        image_size: Side of the generated square images, in pixels.
        batch_size: Examples per batch, per device.
        num_workers: DataLoader worker processes; 0 loads images in the main process.
        seed: Seed of both the generated dataset and the training shuffle order.
    """

    def __init__(
        self,
        root: str = ".cache/mmgen-toy",
        n_train: int = 256,
        n_val: int = 64,
        image_size: int = 32,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            train_tsv=str(Path(root) / "train.tsv"),
            val_tsv=str(Path(root) / "val.tsv") if n_val > 0 else None,
            image_dir=str(Path(root) / "images"),
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.root = root
        self.n_train = n_train
        self.n_val = n_val

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node, before setup() on all of them.
        write_toy_dataset(Path(self.root), self.n_train, self.n_val, self.image_size, self.seed)

    def setup(self, stage: str | None = None) -> None:
        # Also here for use without a Trainer, where prepare_data() never runs; where it has run,
        # the marker matches and this only reads it.
        self.prepare_data()
        super().setup(stage)
