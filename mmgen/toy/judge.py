"""The judge: a small image classifier that reads a toy image's attributes (shape, colour, ...).

It is trained on rendered toy scenes only, never on anything a generator produced, so it can score
generated images: "a big red circle ..." drawn by a diffusion model counts as correct in colour when
the judge reads "red". The classifier is transformers' ResNet (one stem, three basic stages of a
single block), saved with ``save_pretrained``; its ``id2label`` holds ``"attribute=value"`` names,
so the saved folder alone says what it reads. The logits are one block per attribute (softmax
within each block), which transformers' single-label head cannot express, so the loss and the
decoding of the blocks are written here.

    judge = load_judge(TOY_JUDGE_DIR)
    scores = judge_images(judge, images, scenes_or_captions)  # {"shape": 0.97, "color": 1.0, ...}
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from mmgen.data import toy
from mmgen.data.images import to_tensor
from mmgen.errors import ConfigError, DataError
from mmgen.toy import TOY_WORLD_DIR

TOY_JUDGE_DIR = TOY_WORLD_DIR / "judge"

# What the judge reads, in the order of its logit blocks, with the world's values for each.
ATTRIBUTES: dict[str, list[str]] = toy.ATTRIBUTE_VALUES
RECORD = "judge.json"  # how the shipped judge was trained and how well it reads held-out images


@dataclass
class Judge:
    """A trained judge: the classifier, the attribute blocks of its logits and its input side."""

    model: torch.nn.Module  # transformers ResNetForImageClassification
    attributes: dict[str, list[str]]
    image_size: int

    def _pixels(self, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
        """(b, 3, s, s) in [-1, 1] from PIL images or a (b, 3, h, w) tensor in [0, 1]."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([to_tensor(image.convert("RGB")) for image in images])
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"the judge reads (b, 3, h, w) images, got shape {tuple(images.shape)}")
        images = images.float()
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return images * 2 - 1

    @torch.no_grad()
    def read(self, images: torch.Tensor | Sequence[Image.Image], batch_size: int = 256) -> list[dict[str, str]]:
        """The attribute values the judge reads in each image: [{"shape": "circle", ...}]."""
        self.model.eval()
        pixels = self._pixels(images)
        logits = torch.cat([self.model(pixel_values=chunk).logits for chunk in pixels.split(batch_size)])
        readings: list[dict[str, str]] = [{} for _ in range(len(pixels))]
        for name, block in zip(self.attributes, _blocks(logits, self.attributes)):  # block: (b, n_values)
            for reading, index in zip(readings, block.argmax(dim=1).tolist()):
                reading[name] = self.attributes[name][index]
        return readings


def _blocks(logits: torch.Tensor, attributes: dict[str, list[str]]) -> list[torch.Tensor]:
    """(b, sum of n_values) -> one (b, n_values) block per attribute, in order."""
    return list(logits.split([len(values) for values in attributes.values()], dim=1))


def scene_attributes(target: toy.ToyScene | dict | str, attributes: Sequence[str] = tuple(ATTRIBUTES)) -> dict[str, str]:
    """The true attribute values of a scene, a dict, or a caption in the world's wording
    (``toy.SCENE_CAPTION``); anything else is a DataError naming it."""
    if isinstance(target, str):
        try:
            target = toy.parse_caption(target)
        except ValueError as error:
            raise DataError(f"cannot judge against {target!r}: {error}") from error
    if isinstance(target, toy.ToyScene):
        return {name: getattr(target, name) for name in attributes}
    missing = [name for name in attributes if name not in target]
    if missing:
        raise DataError(f"target {target!r} has no {', '.join(missing)}")
    return {name: target[name] for name in attributes}


def judge_images(
    judge: Judge, images: torch.Tensor | Sequence[Image.Image], targets: Sequence[toy.ToyScene | dict | str]
) -> dict[str, float]:
    """Fraction of ``images`` whose attribute the judge reads as in its target (scene, attribute
    dict or caption), per attribute, plus ``"shape+color"`` (both right) and ``"n"``."""
    if len(images) != len(targets):
        raise DataError(f"{len(images)} images but {len(targets)} targets to judge them against")
    if len(targets) == 0:
        raise DataError("no images to judge")
    truths = [scene_attributes(target, tuple(judge.attributes)) for target in targets]
    readings = judge.read(images)
    scores = {name: sum(r[name] == t[name] for r, t in zip(readings, truths)) / len(truths)
              for name in judge.attributes}
    scores["shape+color"] = sum(r["shape"] == t["shape"] and r["color"] == t["color"]
                                for r, t in zip(readings, truths)) / len(truths)
    scores["n"] = len(truths)
    return scores


# -- training --------------------------------------------------------------------------------------
def _render(scenes: list[toy.ToyScene], image_size: int) -> torch.Tensor:
    return torch.stack([to_tensor(toy.render_scene(scene, image_size)) for scene in scenes])  # (n, 3, s, s)


def _labels(scenes: list[toy.ToyScene], attributes: dict[str, list[str]]) -> torch.Tensor:
    return torch.tensor([[values.index(getattr(s, name)) for name, values in attributes.items()]
                         for s in scenes])  # (n, n_attributes)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Perturb clean renders the way a generator's images deviate from them (a slight colour cast,
    noise, soft edges), so the judge reads generated images by their attributes, not by pixel
    exactness. images: (b, 3, s, s) in [0, 1]."""
    b = images.shape[0]
    gain = 1 + 0.08 * (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1)  # per-channel cast
    noise = torch.randn(images.shape, generator=generator) * 0.06 * torch.rand(b, 1, 1, 1, generator=generator)
    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    blur = (torch.rand(b, 1, 1, 1, generator=generator) < 0.3).float()
    images = blur * blurred + (1 - blur) * images
    return (images * gain + noise).clamp(0, 1)


def build_judge_model(attributes: dict[str, list[str]], width: int = 16):
    """A ResNet of about 80k parameters whose ``num_labels`` logits are the attribute blocks."""
    from transformers import ResNetConfig, ResNetForImageClassification

    labels = [f"{name}={value}" for name, values in attributes.items() for value in values]
    config = ResNetConfig(
        num_channels=3, embedding_size=width, hidden_sizes=[width, 2 * width, 4 * width], depths=[1, 1, 1],
        layer_type="basic", downsample_in_first_stage=False,  # keep 8x8 features from a 32 px input
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
    )
    return ResNetForImageClassification(config)


def train_judge(
    out_dir: str | Path | None,
    seed: int = 0,
    image_size: int = 32,
    n_train: int = 6000,
    n_val: int = 1000,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 16,
) -> tuple[Judge, dict]:
    """Train a judge on freshly drawn scenes and measure it on ``n_val`` held-out scenes.

    Deterministic in ``seed`` (scenes, initial weights, batches, augmentation). Writes the
    classifier (``save_pretrained``: config.json + model.safetensors) and ``judge.json`` (settings,
    held-out accuracy per attribute, seconds) to ``out_dir`` unless it is None.
    Returns (judge, record)."""
    start = time.perf_counter()
    rng = random.Random(seed)
    scenes = [toy.sample_scene(rng) for _ in range(n_train + n_val)]
    images = _render(scenes, image_size)  # (n, 3, s, s) in [0, 1]
    labels = _labels(scenes, ATTRIBUTES)  # (n, n_attributes)
    train_x, val_x = images[:n_train], images[n_train:]
    train_y = labels[:n_train]

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_judge_model(ATTRIBUTES, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, n_train, (batch_size,), generator=generator)
        pixels = _augment(train_x[index], generator) * 2 - 1
        logits = model(pixel_values=pixels).logits  # (b, sum of n_values)
        loss = sum(F.cross_entropy(block, train_y[index, i])
                   for i, block in enumerate(_blocks(logits, ATTRIBUTES)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    judge = Judge(model.eval(), ATTRIBUTES, image_size)
    accuracy = judge_images(judge, val_x, scenes[n_train:])
    record = dict(seed=seed, image_size=image_size, n_train=n_train, n_val=n_val, steps=steps,
                  batch_size=batch_size, lr=lr, width=width, final_train_loss=round(loss.item(), 4),
                  held_out_accuracy={k: v for k, v in accuracy.items() if k != "n"},
                  seconds=round(time.perf_counter() - start, 1))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return judge, record


def load_judge(path: str | Path = TOY_JUDGE_DIR) -> Judge:
    """The judge saved in ``path`` by :func:`train_judge` (default: the one shipped with mmgen)."""
    from transformers import ResNetForImageClassification

    path = Path(path)
    record_file = path / RECORD
    if not record_file.is_file() or not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a toy judge folder (needs config.json, model.safetensors and {RECORD}; "
                          "train one with mmgen.toy.judge.train_judge)")
    record = json.loads(record_file.read_text())
    model = ResNetForImageClassification.from_pretrained(path).eval()
    attributes: dict[str, list[str]] = {}
    for index in range(model.config.num_labels):
        name, _, value = model.config.id2label[index].partition("=")
        attributes.setdefault(name, []).append(value)
    if "shape" not in attributes or "color" not in attributes:
        raise ConfigError(f"{path}/config.json: id2label must name 'shape=...' and 'color=...' labels")
    return Judge(model, attributes, int(record["image_size"]))
