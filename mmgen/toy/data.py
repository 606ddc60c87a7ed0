"""The toy world as tensors and texts for pretraining the backbones, read back through mmgen's own
readers from the files `write_toy_world` writes (so pretraining sees exactly what the methods see)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmgen.data.captions import read_caption_tsv


def load_image(path: Path) -> torch.Tensor:
    """(3, h, w) RGB in [0, 1]."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def caption_pairs(world: Path, split: str) -> tuple[torch.Tensor, list[str]]:
    """(images (n, 3, s, s) in [0, 1], captions) of the world's CC3M-layout split."""
    folder = Path(world) / "captions"
    records = read_caption_tsv(folder / f"{split}.tsv", folder / "images", "caption", "image")
    return torch.stack([load_image(r.image_path) for r in records]), [r.caption for r in records]


def language_texts(world: Path, split: str, restatements: int = 1) -> list[str]:
    """Everything the LMs read: captions; each caption ``restatements`` times more as a
    restatement (`mmgen.data.toy.restate_scene`: the caption, then its attributes again, so that
    the state after a caption must hold all of them; drawn from a fixed seed per split); each story as one
    text; and the MiniGPT-5-shaped samples (system prompt, roles, templates) of the stories and
    dialogues, with images left out of the text (their slots become the bare
    ``<Img><ImageHere></Img>`` string, the vokens dropped)."""
    from mmgen.data.minigpt5_samples import VOKEN_STRING
    from mmgen.data.mmdialog import MMDialogDataset
    from mmgen.data.toy import parse_caption, restate_scene
    from mmgen.data.vist import TASKS, VISTDataset, read_vist_stories

    world = Path(world)
    captions = [r.caption for r in read_caption_tsv(world / "captions" / f"{split}.tsv", world / "captions" / "images",
                                                    "caption", "image")]  # the texts only: no image is read
    stories, _ = read_vist_stories(world / "vist" / f"{split}.json")
    story_texts = [" . ".join(text for text, _ in steps) for _, steps in stories]
    vist = VISTDataset(str(world / "vist" / f"{split}.json"), image_dir=str(world / "vist" / "images"),
                       tasks=list(TASKS), check_images=False).build()
    dialogues = MMDialogDataset(str(world / "mmdialog" / f"{split}_conversations.txt"), max_turn_tokens=None,
                                check_images=False).build()
    samples = [f"{s.source} {s.target.replace(VOKEN_STRING, '')}" for s in vist + dialogues]
    rng = random.Random(f"restate-{split}")
    restated = [restate_scene(parse_caption(c), rng) for _ in range(restatements) for c in captions]
    return captions + restated + story_texts + samples
