"""VIST (Visual Storytelling) for MiniGPT-5 stage 2: stories of (caption, image) steps.

Two file layouts are read (the kind is told from the json itself):

- MiniGPT-5's, as distributed with its code: ``{split}_cleaned.json`` = ``{story_id: [{"caption",
  "image_id", "sequence_index"}, ...]}`` next to ``{split}_image_mapping.json`` = ``{image_id:
  path}``, the paths relative to the dataset folder (by default the json's folder);
- VIST's own SIS json (``{"annotations": [[{"story_id", "worker_arranged_photo_order", "text",
  "photo_flickr_id"}], ...]}``) with images ``{photo_flickr_id}.jpg`` (or .png/.jpeg/.gif) in
  ``image_dir``.

Samples, as MiniGPT-5 builds them. Before step k the history is the previous captions joined by
``<Img><ImageHere></Img>``, closed by one more ``<Img><ImageHere></Img>`` and a newline (empty at
step 0). Every source starts with ``VIST_SYSTEM_PROMPT``, glued to ``###Human:``; the phrasing of
each task is drawn from its list (``random.Random(seed)``, one draw per task and step):

    generate    {system}###Human:{history} Generate an image with the scene description: {caption} ###Assistant:
                -> [IMG0..7] ###                     (every step, step 0 included)
    next        {system}###Human:{history} Tell me the next scene with image. ###Assistant:
                -> {caption} [IMG0..7] ###           (steps >= 1, training split)
    understand  {system}###Human:{history} Tell me the next scene description by this image: <Img><ImageHere></Img> ###Assistant:
                -> {caption} ###                     (steps >= 1, training split)

so ``"cap 0<Img><ImageHere></Img>cap 1<Img><ImageHere></Img>\\n"`` is the history at step 2.
The test split has the ``generate`` samples of every step. No VIST sample carries a caption for
the caption loss (as in the reference).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from mmgen.data.minigpt5_samples import (
    ASSISTANT, END, HUMAN, IMAGE_IN_PROMPT, VOKEN_STRING, ImagePreprocessing, Sample, SampleDataset, Split,
    require_text,
)
from mmgen.errors import ConfigError, DataError
from mmgen.files import inside_root, read_text, replace_atomically, require_fields

TASKS = ("generate", "next", "understand")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".gif")

VIST_SYSTEM_PROMPT = (
    "Give the following images in <Img>ImageContent</Img> format. "
    "You will be able to see the images once I provide it to you. Please understanding images and generate story."
)
# MiniGPT-5's phrasings of each task; {history} and {caption} are filled in.
TEMPLATES = {
    "generate": (
        f"{HUMAN}{{history}} Generate an image with the scene description: {{caption}} {ASSISTANT}",
        f"{HUMAN}{{history}} the scene description: {{caption}} {ASSISTANT}",
    ),
    "next": (
        f"{HUMAN}{{history}} Tell me the next scene with image. {ASSISTANT}",
        f"{HUMAN}{{history}} Generate the next scene with image. {ASSISTANT}",
        f"{HUMAN}{{history}} What should happen then? {ASSISTANT}",
    ),
    "understand": (
        f"{HUMAN}{{history}} Tell me the next scene description by this image: {IMAGE_IN_PROMPT} {ASSISTANT}",
        f"{HUMAN}{{history}} What happen in the next scene image: {IMAGE_IN_PROMPT} {ASSISTANT}",
    ),
}

Story = tuple[str, list[tuple[str, str]]]  # (story id, [(caption, image key)] in story order)


# -- reading -------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> object:
    if not path.exists():
        raise DataError(f"VIST {what} not found: {path}")
    text = read_text(path, f"VIST {what}")  # a regular, non-empty UTF-8 file
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON: {error}") from error


def read_cleaned_stories(json_path: Path, data: object) -> list[Story]:
    """MiniGPT-5's ``*_cleaned.json``: stories in file order, steps sorted by ``sequence_index``
    (the reference takes them in file order; its files are written in that order)."""
    if not isinstance(data, dict):
        raise DataError(f"{json_path}: expected {{story_id: [steps]}} or an SIS json object")
    if not data:
        raise DataError(f"{json_path}: no stories (empty split)")
    stories = []
    for story_id, steps in data.items():
        where = f"{json_path}, story {story_id}"
        if not isinstance(steps, list) or not steps:
            raise DataError(f"{where}: expected a non-empty list of steps, got {steps!r:.80}")
        ordered = []
        for j, step in enumerate(steps):
            at = f"{where}, step [{j}]"
            require_fields(step, ("caption", "image_id", "sequence_index"), at, "a step object")
            index, image_id = step["sequence_index"], step["image_id"]
            if not isinstance(index, int) or isinstance(index, bool):
                raise DataError(f"{at}: 'sequence_index' must be an integer, got {index!r}")
            if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
                raise DataError(f"{at}: 'image_id' must be a string, got {image_id!r}")
            ordered.append((index, require_text(step["caption"], at, "caption"), str(image_id)))
        indices = sorted(index for index, _, _ in ordered)
        if len(set(indices)) != len(indices):
            raise DataError(f"{where}: repeated sequence_index in {indices}")
        stories.append((str(story_id), [(caption, image) for _, caption, image in sorted(ordered)]))
    return stories


def read_sis_stories(json_path: Path, data: dict) -> list[Story]:
    """VIST's SIS json: stories in order of first appearance, steps sorted by
    ``worker_arranged_photo_order`` (which must be 0..n-1)."""
    if not isinstance(data.get("annotations"), list):
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
        order = record["worker_arranged_photo_order"]
        if not isinstance(order, int) or isinstance(order, bool):
            raise DataError(f"{where}: 'worker_arranged_photo_order' must be an integer, got {order!r}")
        text = require_text(record["text"], f"{where} (story {record['story_id']})", "text").strip()
        if not text:
            raise DataError(f"{where} (story {record['story_id']}): empty 'text'")
        photo = record["photo_flickr_id"]
        if not isinstance(photo, (str, int)) or isinstance(photo, bool) or str(photo) == "":
            raise DataError(f"{where}: 'photo_flickr_id' must be an id string, got {photo!r:.80}")
        if not isinstance(record["story_id"], (str, int)) or isinstance(record["story_id"], bool):
            raise DataError(f"{where}: 'story_id' must be a string, got {record['story_id']!r:.80}")
        steps[str(record["story_id"])].append((order, text, str(photo)))
    if not steps:
        raise DataError(f"{json_path}: 'annotations' holds no stories (empty split)")
    stories = []
    for story_id, items in steps.items():
        orders = sorted(o for o, _, _ in items)
        if orders != list(range(len(items))):
            raise DataError(f"{json_path}: story {story_id} has photo orders {orders}, expected 0..{len(items) - 1}")
        stories.append((story_id, [(text, photo) for _, text, photo in sorted(items)]))
    return stories


def read_vist_stories(json_path: Path) -> tuple[list[Story], bool]:
    """(stories, whether the file is MiniGPT-5's cleaned kind); raises DataError naming the file
    and record at fault."""
    data = _read_json(json_path, "file")
    if isinstance(data, dict) and "annotations" in data:
        return read_sis_stories(json_path, data), False
    return read_cleaned_stories(json_path, data), True


def default_mapping_path(json_path: Path) -> Path:
    """``val_cleaned.json`` -> ``val_image_mapping.json``, MiniGPT-5's naming (changed in the
    file name only, never in the folders above it)."""
    if "cleaned" not in json_path.name:
        raise ConfigError(f"{json_path}: cannot derive the image mapping file from a name without "
                          "'cleaned'; give `image_mapping`")
    return json_path.with_name(json_path.name.replace("cleaned", "image_mapping"))


def read_image_mapping(path: Path) -> dict[str, str]:
    """``{image_id: image path}`` of MiniGPT-5's ``*_image_mapping.json``."""
    data = _read_json(path, "image mapping")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected {{image_id: image path}}, got {type(data).__name__}")
    for image_id, image in data.items():
        if not isinstance(image, str) or not image:
            raise DataError(f"{path}, image {image_id}: expected a non-empty path string, got {image!r}")
    return data


# -- samples -------------------------------------------------------------------------------------
def story_history(captions: list[str]) -> str:
    """The prompt text of the steps so far: ``""`` or ``"c0<Img>..</Img>c1<Img>..</Img>\\n"``."""
    if not captions:
        return ""
    return IMAGE_IN_PROMPT.join(captions) + IMAGE_IN_PROMPT + "\n"


def story_samples(steps: list[tuple[str, Path]], tasks=TASKS, split: Split = "train", last_step_only: bool = False,
                  rng: random.Random | None = None, system_prompt: str = VIST_SYSTEM_PROMPT,
                  origin: str = "") -> list[Sample]:
    """MiniGPT-5's samples of one story, ``steps`` = [(caption, image path)] in order.

    Per step, in the reference's order: generate, then (steps >= 1, training split) next and
    understand. A phrasing is drawn for every sample the reference would build, whether or not
    its task is in ``tasks``, so the phrasings do not depend on ``tasks``."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown VIST tasks {unknown}; tasks are {TASKS}")
    rng = rng or random.Random(0)
    samples = []
    for k, (caption, image) in enumerate(steps):
        history = story_history([c for c, _ in steps[:k]])
        seen = [path for _, path in steps[:k]]
        where = f"{origin}, step {k}"
        kinds = ["generate"] + (["next", "understand"] if k > 0 and split == "train" else [])
        sources = {kind: system_prompt + rng.choice(TEMPLATES[kind]).format(history=history, caption=caption)
                   for kind in kinds}
        if last_step_only and k != len(steps) - 1:
            continue
        targets = {  # target, input images, output images
            "generate": (f"{VOKEN_STRING} {END}", seen, [image]),
            "next": (f"{caption} {VOKEN_STRING} {END}", seen, [image]),
            "understand": (f"{caption} {END}", seen + [image], []),
        }
        samples += [Sample(sources[kind], *targets[kind], None, where) for kind in kinds if kind in tasks]
    return samples


class VISTDataset(SampleDataset):
    """VIST stories as MiniGPT-5 stage-2 samples (see the module docstring for both layouts).

    Args:
        json_path: MiniGPT-5's ``*_cleaned.json`` or VIST's SIS json.
        image_dir: Folder the image paths are relative to. Default: the json's folder
            (MiniGPT-5's layout: mapping paths like ``val_images/000000005.jpg``).
        image_mapping: MiniGPT-5's ``{image_id: path}`` json. Default: the json's name with
            ``cleaned`` replaced by ``image_mapping``. Not used for an SIS json.
        split: ``"train"`` (all three tasks) or ``"test"`` (``generate`` at every step).
        tasks: Which of "generate", "next", "understand" to keep.
        last_step_only: Only the last step of each story (the 5th image from 4 steps, as GILL's
            evaluation); not a reference option.
        system_prompt: Prefix of every source.
        seed: Seed of the phrasing draws.
        input_image_size, output_image_size, image_preprocessing, random_flip, check_images,
        allow_outside_paths: see :class:`~mmgen.data.minigpt5_samples.SampleDataset`.
    """

    def __init__(self, json_path: str, image_dir: str | None = None, image_mapping: str | None = None,
                 split: Split = "train", tasks: list[str] = TASKS, last_step_only: bool = False,
                 system_prompt: str = VIST_SYSTEM_PROMPT, seed: int = 0, input_image_size: int = 224,
                 output_image_size: int = 512, image_preprocessing: ImagePreprocessing = "minigpt5",
                 random_flip: bool | None = None, check_images: bool = True, allow_outside_paths: bool = False):
        super().__init__(split, input_image_size, output_image_size, image_preprocessing, random_flip, check_images,
                         allow_outside_paths)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"unknown VIST tasks {unknown}; tasks are {TASKS}")
        self.json_path = Path(json_path)
        self.image_dir = Path(image_dir) if image_dir is not None else self.json_path.parent
        self.image_mapping = Path(image_mapping) if image_mapping is not None else None
        self.tasks, self.last_step_only = list(tasks), last_step_only
        self.system_prompt, self.seed = system_prompt, seed

    def _sis_image_path(self, photo_id: str) -> Path:
        for ext in IMAGE_EXTENSIONS:
            path = inside_root(Path(f"{photo_id}{ext}"), self.image_dir, f"{self.json_path}, photo {photo_id}",
                               "'photo_flickr_id'", self.allow_outside_paths)
            if path.is_file():
                return path
        return self.image_dir / f"{photo_id}.jpg"  # missing: reported by the image check

    def _image_paths(self, stories: list[Story], cleaned: bool) -> dict[str, Path]:
        keys = {key for _, steps in stories for _, key in steps}
        if not cleaned:
            return {key: self._sis_image_path(key) for key in keys}
        mapping_path = self.image_mapping or default_mapping_path(self.json_path)
        mapping = read_image_mapping(mapping_path)
        for story_id, steps in stories:
            for k, (_, key) in enumerate(steps):
                if key not in mapping:
                    raise DataError(f"{self.json_path}, story {story_id}, step {k}: image_id {key} "
                                    f"is not in {mapping_path}")
        return {key: inside_root(Path(mapping[key]), self.image_dir, f"{mapping_path}, image {key}", "image path",
                                 self.allow_outside_paths) for key in keys}

    def stories(self) -> list[tuple[str, list[tuple[str, Path]]]]:
        """The stories as ``(story id, [(caption, image path)])`` in file order (evaluation
        reads them this way; images are not checked here)."""
        stories, cleaned = read_vist_stories(self.json_path)
        paths = self._image_paths(stories, cleaned)
        return [(story_id, [(caption, paths[key]) for caption, key in steps]) for story_id, steps in stories]

    def build(self) -> list[Sample]:
        stories, cleaned = read_vist_stories(self.json_path)
        paths = self._image_paths(stories, cleaned)
        rng = random.Random(self.seed)
        samples = []
        for story_id, steps in stories:
            samples += story_samples([(caption, paths[key]) for caption, key in steps], self.tasks, self.split,
                                     self.last_step_only, rng, self.system_prompt,
                                     f"{self.json_path}, story {story_id}")
        return samples


# -- toy stories ---------------------------------------------------------------------------------
def write_toy_vist(root: Path, n_stories: int, n_steps: int = 3, image_size: int = 32, seed: int = 0,
                   name: str = "train") -> Path:
    """Toy-world stories in MiniGPT-5's VIST layout: ``root/{name}_cleaned.json``,
    ``root/{name}_image_mapping.json`` and ``root/images/*.png``, for tests and the CPU demo.
    Returns the json path."""
    from mmgen.data.toy import CAPTION_TEMPLATE, TOY_COLORS, TOY_SHAPES, draw_toy_image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    stories, mapping = {}, {}
    for s in range(n_stories):
        steps = []
        for k in range(n_steps):
            color, shape = rng.choice(TOY_COLORS), rng.choice(TOY_SHAPES)
            bg = rng.choice([c for c in TOY_COLORS if c != color])
            image_id = f"{s:04d}{k}"
            image = draw_toy_image(color, shape, bg, image_size, rng)
            replace_atomically(root / "images" / f"{image_id}.png", lambda p, im=image: im.save(p, format="PNG"))
            mapping[image_id] = f"images/{image_id}.png"
            steps.append({"caption": CAPTION_TEMPLATE.format(color=color, shape=shape, bg_color=bg),
                          "image_id": image_id, "sequence_index": k})
        stories[str(s)] = steps
    # atomic writes: under DDP every process generates (the same) files while others read them
    replace_atomically(root / f"{name}_image_mapping.json", lambda p: p.write_text(json.dumps(mapping, indent=1)))
    return replace_atomically(root / f"{name}_cleaned.json", lambda p: p.write_text(json.dumps(stories, indent=1)))


class ToyVISTDataset(VISTDataset):
    """Toy stories in MiniGPT-5's VIST layout, generated on first use (tiny stage-2 config);
    images are ``image_size`` pixels and loaded at that size for both roles."""

    def __init__(self, root: str = ".cache/mmgen-toy-vist", n_stories: int = 32, n_steps: int = 3,
                 split: Split = "train", tasks: list[str] = TASKS, image_size: int = 32, seed: int = 0,
                 image_preprocessing: ImagePreprocessing = "minigpt5", random_flip: bool | None = None):
        super().__init__(str(Path(root) / "train_cleaned.json"), split=split, tasks=tasks, seed=seed,
                         input_image_size=image_size, output_image_size=image_size,
                         image_preprocessing=image_preprocessing, random_flip=random_flip)
        self.root, self.n_stories, self.n_steps, self.image_size = Path(root), n_stories, n_steps, image_size

    def build(self) -> list[Sample]:
        write_toy_vist(self.root, self.n_stories, self.n_steps, self.image_size, self.seed)
        return super().build()
