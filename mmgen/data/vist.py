"""VIST (Visual Storytelling) for MiniGPT-5 stage 2: stories of (caption, image) steps.

Reads the SIS json (``{"annotations": [[{"story_id", "worker_arranged_photo_order", "text",
"photo_flickr_id", ...}], ...]}``) and an image folder holding ``{photo_flickr_id}.jpg`` (or
.png/.jpeg/.gif). For each story and each step k >= 1 (REFERENCE.md sec. 4) the history is the
previous captions each followed by ``<Img><ImageHere></Img>``, and the tasks are:

    generate    ###Human:{history} Generate an image with the scene description: {caption} ###Assistant:
                -> [IMG0..7] ###
    next        ###Human:{history} Tell me the next scene with image. ###Assistant:
                -> {caption} [IMG0..7] ###
    understand  ###Human:{history} Tell me the next scene description by this image: <Img><ImageHere></Img> ###Assistant:
                -> {caption} ###

A test set uses ``tasks=["generate"]`` and ``last_step_only=True`` (the 5th image from 4 steps).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from mmgen.data.minigpt5_samples import ASSISTANT, END, HUMAN, IMAGE_IN_PROMPT, VOKEN_STRING, Sample, SampleDataset
from mmgen.errors import DataError

TASKS = ("generate", "next", "understand")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".gif")


def read_vist_stories(json_path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(story_id, [(caption, photo_id), ...] in story order)], in file order; raises DataError
    naming the file and record at fault."""
    if not json_path.is_file():
        raise DataError(f"VIST file not found: {json_path}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{json_path}: not valid JSON: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{json_path}: expected an SIS json object with an 'annotations' list")
    steps: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for i, entry in enumerate(data["annotations"]):
        record = entry[0] if isinstance(entry, list) and len(entry) == 1 else entry
        where = f"{json_path}, annotations[{i}]"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an annotation object, got {type(record).__name__}")
        missing = [k for k in ("story_id", "worker_arranged_photo_order", "text", "photo_flickr_id") if k not in record]
        if missing:
            raise DataError(f"{where}: missing {missing}")
        text = str(record["text"]).strip()
        if not text:
            raise DataError(f"{where} (story {record['story_id']}): empty 'text'")
        steps[str(record["story_id"])].append((int(record["worker_arranged_photo_order"]), text, str(record["photo_flickr_id"])))
    stories = []
    for story_id, items in steps.items():
        orders = sorted(o for o, _, _ in items)
        if orders != list(range(len(items))):
            raise DataError(f"{json_path}: story {story_id} has photo orders {orders}, expected 0..{len(items) - 1}")
        stories.append((story_id, [(text, photo) for _, text, photo in sorted(items)]))
    return stories


def story_samples(steps: list[tuple[str, Path]], tasks=TASKS, last_step_only: bool = False, origin: str = "") -> list[Sample]:
    """MiniGPT-5's samples of one story, ``steps`` = [(caption, image path)] in order."""
    samples = []
    first = len(steps) - 1 if last_step_only else 1
    for k in range(max(first, 1), len(steps)):
        history = "".join(f" {caption} {IMAGE_IN_PROMPT}" for caption, _ in steps[:k])
        seen = [image for _, image in steps[:k]]
        caption, image = steps[k]
        where = f"{origin}, step {k}"
        for task in tasks:
            if task == "generate":
                source = f"{HUMAN}{history} Generate an image with the scene description: {caption} {ASSISTANT}"
                samples.append(Sample(source, f"{VOKEN_STRING} {END}", seen, [image], caption, where))
            elif task == "next":
                source = f"{HUMAN}{history} Tell me the next scene with image. {ASSISTANT}"
                samples.append(Sample(source, f"{caption} {VOKEN_STRING} {END}", seen, [image], caption, where))
            elif task == "understand":
                source = f"{HUMAN}{history} Tell me the next scene description by this image: {IMAGE_IN_PROMPT} {ASSISTANT}"
                samples.append(Sample(source, f"{caption} {END}", seen + [image], [], None, where))
            else:
                raise DataError(f"unknown VIST task {task!r}; tasks are {TASKS}")
    return samples


class VISTDataset(SampleDataset):
    """VIST stories as MiniGPT-5 stage-2 samples.

    Args:
        json_path: SIS json file (e.g. ``train.story-in-sequence.json``).
        image_dir: Folder of ``{photo_flickr_id}.jpg`` images.
        tasks: Which of "generate", "next", "understand" to build per step.
        last_step_only: Only the last step of each story (test: the 5th image).
        image_size: Side of the loaded images (input images are resized again by the encoder).
        check_images: Check at start-up that every image exists.
    """

    def __init__(self, json_path: str, image_dir: str, tasks: list[str] = TASKS, last_step_only: bool = False,
                 image_size: int = 224, check_images: bool = True):
        super().__init__(image_size, check_images)
        self.json_path, self.image_dir = Path(json_path), Path(image_dir)
        self.tasks, self.last_step_only = list(tasks), last_step_only

    def _image_path(self, photo_id: str) -> Path:
        for ext in IMAGE_EXTENSIONS:
            path = self.image_dir / f"{photo_id}{ext}"
            if path.is_file():
                return path
        return self.image_dir / f"{photo_id}.jpg"  # missing: reported by the image check

    def build(self) -> list[Sample]:
        samples = []
        for story_id, steps in read_vist_stories(self.json_path):
            paths = [(caption, self._image_path(photo)) for caption, photo in steps]
            samples += story_samples(paths, self.tasks, self.last_step_only, f"{self.json_path}, story {story_id}")
        return samples


def write_toy_vist(root: Path, n_stories: int, n_steps: int = 3, image_size: int = 32, seed: int = 0) -> Path:
    """A VIST-format SIS json of toy-world stories (``root/story.json``, images in
    ``root/images``), for tests and the CPU demo. Returns the json path."""
    from mmgen.data.toy import CAPTION_TEMPLATE, TOY_COLORS, TOY_SHAPES, draw_toy_image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    annotations = []
    for s in range(n_stories):
        for k in range(n_steps):
            color, shape = rng.choice(TOY_COLORS), rng.choice(TOY_SHAPES)
            bg = rng.choice([c for c in TOY_COLORS if c != color])
            photo = f"{s:04d}{k}"
            draw_toy_image(color, shape, bg, image_size, rng).save(root / "images" / f"{photo}.png")
            annotations.append([{"story_id": str(s), "worker_arranged_photo_order": k, "photo_flickr_id": photo,
                                 "text": CAPTION_TEMPLATE.format(color=color, shape=shape, bg_color=bg)}])
    path = root / "story.json"
    path.write_text(json.dumps({"annotations": annotations}))
    return path


class ToyVISTDataset(VISTDataset):
    """VIST-format toy stories, generated on first use (tiny stage-2 config)."""

    def __init__(self, root: str = ".cache/mmgen-toy-vist", n_stories: int = 32, n_steps: int = 3,
                 tasks: list[str] = TASKS, image_size: int = 32, seed: int = 0):
        super().__init__(str(Path(root) / "story.json"), str(Path(root) / "images"), tasks, False, image_size)
        self.root, self.n_stories, self.n_steps, self.seed = Path(root), n_stories, n_steps, seed

    def build(self) -> list[Sample]:
        write_toy_vist(self.root, self.n_stories, self.n_steps, self.image_size, self.seed)
        return super().build()
