"""A generated toy world of coloured shapes, for tests and the CPU demo (no downloads).

Each image is one shape on a plain background, captioned "a {color} {shape} on a {bg_color}
background". The caption fully describes what matters in the image, the vocabulary is a dozen
words, and any number of examples can be generated in seconds, so tiny models can visibly learn
captioning, retrieval and generation on a laptop.
"""

import dataclasses
import json
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmgen.data.captions import CaptionDataModule
from mmgen.data.minigpt5_samples import CaptionGenerationDataset, Sample
from mmgen.data.vist import VISTDataset

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
    with _one_writer(root):
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


@contextmanager
def _one_writer(root: Path):
    """Hold the lock of the generated folder ``root`` (``.<name>.lock`` beside it). Every DDP rank
    (and a second run started beside the first) builds the same toy data on first use; unlocked,
    one rank read a TSV whose images another was still writing, or deleted as stale. Under the
    lock the others wait, then find the finished folder's marker and keep it."""
    from filelock import FileLock

    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        yield


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


# -- the toy world: scenes with five attributes ---------------------------------------------------
# The world the shipped toy backbones (`mmgen toy pretrain`) are trained on. One shape per image,
# described by five attributes of a few values each; the caption names all five, so a caption picks
# out its image among a few hundred (4 x 6 x 2 x 5 x 3 = 720 scenes), up to a small jitter.
TOY_SIZES: list[str] = ["small", "big"]
TOY_POSITIONS: list[str] = ["top left", "top right", "bottom left", "bottom right", "center"]
# Backgrounds are dark or muted and none is a shape colour, so every shape stands out.
TOY_BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "gray": (120, 120, 120),
    "brown": (100, 62, 30),
}
TOY_BACKGROUNDS: list[str] = list(TOY_BACKGROUND_RGB)
ATTRIBUTE_VALUES: dict[str, list[str]] = {
    "shape": TOY_SHAPES, "color": TOY_COLORS, "size": TOY_SIZES, "position": TOY_POSITIONS,
    "background": TOY_BACKGROUNDS,
}  # fmt: skip
SCENE_CAPTION = "a {size} {color} {shape} in the {position} on a {background} background"

# Side of the shape as a fraction of the image side, and its centre per position.
_SIZE_FRACTION = {"small": 0.32, "big": 0.56}
_POSITION_CENTRE = {
    "top left": (0.28, 0.28), "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72), "center": (0.5, 0.5),
}  # fmt: skip
_MAX_JITTER = 0.05  # of the side: small enough that size and position stay unambiguous


@dataclass(frozen=True)
class ToyScene:
    """One image of the toy world. ``dx``/``dy`` shift the shape by a fraction of the side (at most
    ``_MAX_JITTER``), so that two scenes with the same caption are not pixel-identical."""

    shape: str
    color: str
    size: str
    position: str
    background: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        for name, known in ATTRIBUTE_VALUES.items():
            if getattr(self, name) not in known:
                raise ValueError(f"unknown toy {name} {getattr(self, name)!r}; known: {known}")

    def replace(self, **changes) -> "ToyScene":
        return dataclasses.replace(self, **changes)


def sample_scene(rng: random.Random) -> ToyScene:
    """A uniformly drawn scene (five attribute draws, then the jitter), deterministic in ``rng``."""
    return ToyScene(
        shape=rng.choice(TOY_SHAPES),
        color=rng.choice(TOY_COLORS),
        size=rng.choice(TOY_SIZES),
        position=rng.choice(TOY_POSITIONS),
        background=rng.choice(TOY_BACKGROUNDS),
        dx=round(rng.uniform(-_MAX_JITTER, _MAX_JITTER), 3),
        dy=round(rng.uniform(-_MAX_JITTER, _MAX_JITTER), 3),
    )


def render_scene(scene: ToyScene, image_size: int = 32) -> Image.Image:
    """The scene drawn at ``image_size`` pixels (RGB); a pure function of the scene."""
    side = image_size * SUPERSAMPLE
    extent = int(side * _SIZE_FRACTION[scene.size])
    cx, cy = _POSITION_CENTRE[scene.position]
    # Clamped so that big shapes in a corner touch the border instead of leaving the image.
    left = min(max(int(side * (cx + scene.dx)) - extent // 2, 0), side - extent)
    top = min(max(int(side * (cy + scene.dy)) - extent // 2, 0), side - extent)
    image = Image.new("RGB", (side, side), TOY_BACKGROUND_RGB[scene.background])
    _draw_shape(ImageDraw.Draw(image), scene.shape, (left, top, left + extent, top + extent), TOY_RGB[scene.color])
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def caption_scene(scene: ToyScene) -> str:
    """All five attributes in words, e.g. "a big red circle in the top left on a black background"."""
    return SCENE_CAPTION.format(size=scene.size, color=scene.color, shape=scene.shape,
                                position=scene.position, background=scene.background)


_CAPTION_PATTERN = re.compile(
    "^" + SCENE_CAPTION.format(**{k: f"(?P<{k}>[a-z ]+?)" for k in ("size", "color", "shape", "position", "background")}) + "$"
)


def parse_caption(caption: str) -> ToyScene:
    """The scene a caption describes (no jitter); ValueError naming the caption if it is not one."""
    match = _CAPTION_PATTERN.match(caption.strip())
    if match is None:
        raise ValueError(f"not a toy-world caption: {caption!r} (expected {SCENE_CAPTION!r})")
    return ToyScene(**match.groupdict())


# -- stories and dialogues -------------------------------------------------------------------------
# A story follows one shape through five images; after the first caption every step names only
# what changed, so the later steps can only be drawn right with the earlier ones in view (the shape
# is named once, at step 0), as in VIST where later sentences lean on earlier ones.
STORY_CHANGES = {
    "color": "then it turns {color}",
    "position": "then it moves to the {position}",
    "size": "then it becomes {size}",
    "background": "then the background turns {background}",
}
DIALOGUE_ASK = "show me {caption}"
DIALOGUE_CHANGES = {
    "color": "now make it {color}",
    "position": "now move it to the {position}",
    "size": "now make it {size}",
    "background": "now make the background {background}",
}
DIALOGUE_REPLY = "here it is"
DIALOGUE_QUESTION = "what is in this picture ?"


def _changed(scene: ToyScene, rng: random.Random) -> tuple[str, ToyScene]:
    """(attribute, scene with that attribute set to another value); the jitter is redrawn."""
    attribute = rng.choice(list(STORY_CHANGES))
    value = rng.choice([v for v in ATTRIBUTE_VALUES[attribute] if v != getattr(scene, attribute)])
    jitter = {"dx": round(rng.uniform(-_MAX_JITTER, _MAX_JITTER), 3), "dy": round(rng.uniform(-_MAX_JITTER, _MAX_JITTER), 3)}
    return attribute, scene.replace(**{attribute: value}, **jitter)


def sample_story(rng: random.Random, n_steps: int = 5) -> list[tuple[str, ToyScene]]:
    """[(text, scene)] of one story: the full caption, then one change per step."""
    scene = sample_scene(rng)
    steps = [(caption_scene(scene), scene)]
    for _ in range(n_steps - 1):
        attribute, scene = _changed(scene, rng)
        steps.append((STORY_CHANGES[attribute].format(**{attribute: getattr(scene, attribute)}), scene))
    return steps


def sample_dialogue(rng: random.Random, n_changes: int = 2) -> list[tuple[str, ToyScene | None]]:
    """[(text, scene or None)] turns, human first: either "show me <caption>" answered with the
    image, then requested changes answered with the changed image; or a shown image asked about,
    answered with its caption."""
    scene = sample_scene(rng)
    if rng.random() < 0.25:
        return [(DIALOGUE_QUESTION, scene), (caption_scene(scene), None)]
    turns: list[tuple[str, ToyScene | None]] = [(DIALOGUE_ASK.format(caption=caption_scene(scene)), None),
                                                (DIALOGUE_REPLY, scene)]
    for _ in range(n_changes):
        attribute, scene = _changed(scene, rng)
        turns += [(DIALOGUE_CHANGES[attribute].format(**{attribute: getattr(scene, attribute)}), None),
                  (DIALOGUE_REPLY, scene)]
    return turns


# -- restatements: texts whose continuation needs the whole caption ----------------------------------
# Next-token prediction on captions, stories and dialogues never needs the state at a caption's end
# to hold all five attributes (each word is predicted from the few before it); but FROMAGe's [RET]
# and GILL's [IMG] tokens read the caption exactly there. A restatement follows a caption with the
# same scene told again: its five attribute values in a random order (the word after the caption's
# "." is any of the five, so the state there must hold them all), or questions about the
# attributes, in a random order, each answered. The toy LMs learn to answer from the caption only
# at a gentle rate (`mmgen.toy.language.train_lm`; measured by `answer_accuracy`).
RESTATE_VALUES_SEPARATOR = " , "
RESTATE_QUESTIONS = {
    "shape": "what shape is it ? {shape}",
    "color": "what color is it ? {color}",
    "size": "what size is it ? {size}",
    "position": "what position is it in ? {position}",
    "background": "what background is it on ? {background}",
}


def restate_scene(scene: ToyScene, rng: random.Random) -> str:
    """The caption, then the scene again: either its five values in a random order ("a big red
    circle in the top left on a black background . top left , circle , black , big , red") or the
    five questions of RESTATE_QUESTIONS in a random order, answered. Only words of the captions
    and the method templates: the tokenizer (shared with CLIP's) is unchanged."""
    attributes = list(RESTATE_QUESTIONS)
    rng.shuffle(attributes)
    if rng.random() < 0.5:
        again = RESTATE_VALUES_SEPARATOR.join(getattr(scene, a) for a in attributes)
    else:
        again = " . ".join(RESTATE_QUESTIONS[a].format(**{a: getattr(scene, a)}) for a in attributes)
    return f"{caption_scene(scene)} . {again}"


def world_texts() -> list[str]:
    """Every word pattern the world's captions, stories and dialogues can contain (each attribute
    value and each template once), for building a vocabulary."""
    values = TOY_SHAPES + TOY_COLORS + TOY_SIZES + TOY_POSITIONS + TOY_BACKGROUNDS
    templates = [SCENE_CAPTION, *STORY_CHANGES.values(), DIALOGUE_ASK, *DIALOGUE_CHANGES.values(),
                 DIALOGUE_REPLY, DIALOGUE_QUESTION, RESTATE_VALUES_SEPARATOR, *RESTATE_QUESTIONS.values()]
    return values + [t.replace("{", " ").replace("}", " ") for t in templates]


# -- writing the world in the real datasets' file formats -------------------------------------------
WORLD_FORMAT_VERSION = 1


def _write_captions(root: Path, split: str, n: int, image_size: int, rng: random.Random) -> None:
    """CC3M's layout as `CaptionDataModule` reads it: `{split}.tsv` (caption, image) + images/.
    Held-out captions are all different, so that each one names exactly one image of its split."""
    rows, seen = ["caption\timage"], set()
    for i in range(n):
        scene = sample_scene(rng)
        while split != "train" and caption_scene(scene) in seen:
            scene = sample_scene(rng)
        seen.add(caption_scene(scene))
        name = f"{split}_{i:05d}.png"
        render_scene(scene, image_size).save(root / "images" / name)
        rows.append(f"{caption_scene(scene)}\t{name}")
    (root / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _write_stories(root: Path, split: str, n: int, image_size: int, rng: random.Random) -> None:
    """VIST's own SIS layout (`VISTDataset` reads it): `{split}.json` with one annotation per step
    and the images as `images/{photo_flickr_id}.png`."""
    annotations = []
    for s in range(n):
        story_id = f"{split}{s:05d}"
        for k, (text, scene) in enumerate(sample_story(rng)):
            photo = f"{story_id}{k}"
            render_scene(scene, image_size).save(root / "images" / f"{photo}.png")
            annotations.append([{"story_id": story_id, "worker_arranged_photo_order": k, "text": text,
                                 "photo_flickr_id": photo}])
    (root / f"{split}.json").write_text(json.dumps({"annotations": annotations}, indent=0) + "\n")


def _write_dialogues(root: Path, split: str, n: int, image_size: int, rng: random.Random) -> None:
    """MiniGPT-5's MMDialog layout (`MMDialogDataset` reads it): `{split}_conversations.txt`, one
    conversation per line, the images as `{media id}.jpg` beside it."""
    lines = []
    for c in range(n):
        conversation = []
        for t, (text, scene) in enumerate(sample_dialogue(rng)):
            turn = [{"__TEXT__": text}]
            if scene is not None:
                media = f"{split}{c:05d}{t}"
                render_scene(scene, image_size).save(root / f"{media}.jpg", quality=95)
                turn.append({"__MEDIA__": media})
            conversation.append({"turn": turn})
        lines.append(json.dumps({"conversation_id": f"{split}{c:05d}", "conversation": conversation}))
    (root / f"{split}_conversations.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_toy_world(root: Path, n_captions: int = 4096, n_stories: int = 384, n_dialogues: int = 384,
                    n_val: int = 128, image_size: int = 32, seed: int = 0) -> Path:
    """The whole toy world under `root`, deterministic in the arguments, in three real layouts:

        root/captions/{train,val}.tsv + root/captions/images/   (CC3M, `CaptionDataModule`)
        root/vist/{train,val}.json + root/vist/images/           (VIST SIS, `VISTDataset`)
        root/mmdialog/{train,val}_conversations.txt + *.jpg      (MMDialog, `MMDialogDataset`)

    ``n_val`` captions, and an eighth as many stories and dialogues (at least 4), are held out.
    As `write_toy_dataset`: `root/DONE` holds the parameters; a matching world is kept. Returns root.
    """
    root = Path(root)
    marker = root / "DONE"
    params = {"n_captions": n_captions, "n_stories": n_stories, "n_dialogues": n_dialogues, "n_val": n_val,
              "image_size": image_size, "seed": seed, "version": WORLD_FORMAT_VERSION}
    with _one_writer(root):
        if marker.is_file() and json.loads(marker.read_text()) == params:
            return root
        marker.unlink(missing_ok=True)
        n_val_sequences = max(4, n_val // 8)
        for part, write, n in (("captions", _write_captions, n_captions), ("vist", _write_stories, n_stories),
                               ("mmdialog", _write_dialogues, n_dialogues)):
            folder = root / part
            images = folder / "images" if part != "mmdialog" else folder
            images.mkdir(parents=True, exist_ok=True)
            for stale in [*images.glob("*.png"), *images.glob("*.jpg")]:  # only files this function wrote
                stale.unlink()
            rng = random.Random(f"{seed}-{part}")  # each part its own stream: sizes of one leave the others
            write(folder, "train", n, image_size, rng)
            write(folder, "val", n_val if part == "captions" else n_val_sequences, image_size, rng)
        marker.write_text(json.dumps(params, sort_keys=True) + "\n")
    return root


class ToyWorldCaptionDataModule(CaptionDataModule):
    """The toy world's captioned images (its CC3M-layout part), written on first use by
    `write_toy_world` and read by `CaptionDataModule` like any caption TSV.

    Args:
        root: Folder of the generated world (written if missing or of other parameters).
        n_captions: Training image-caption pairs to generate.
        n_stories: Training stories (VIST layout) written beside them.
        n_dialogues: Training dialogues (MMDialog layout) written beside them.
        n_val: Held-out pairs (all captions different, so each names one image).
        image_size: Side of the generated images, in pixels.
        batch_size: Examples per batch, per device.
        num_workers: DataLoader worker processes; 0 loads images in the main process.
        seed: Seed of the generated world; the training shuffle uses it too.
    """

    def __init__(self, root: str = ".cache/mmgen-toy-world", n_captions: int = 4096, n_stories: int = 384,
                 n_dialogues: int = 384, n_val: int = 128, image_size: int = 32, batch_size: int = 32,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(train_tsv=str(Path(root) / "captions" / "train.tsv"),
                         val_tsv=str(Path(root) / "captions" / "val.tsv"),
                         image_dir=str(Path(root) / "captions" / "images"), image_size=image_size,
                         batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.root, self.world = root, dict(n_captions=n_captions, n_stories=n_stories, n_dialogues=n_dialogues,
                                           n_val=n_val, image_size=image_size, seed=seed)

    def prepare_data(self) -> None:
        write_toy_world(Path(self.root), **self.world)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # also without a Trainer; a no-op once the world matches
        super().setup(stage)


# -- the world as MiniGPT-5 samples (stage 1: captions; stage 2: stories) ---------------------------
class ToyWorldCaptionGeneration(CaptionGenerationDataset):
    """MiniGPT-5 stage-1 samples of the toy world's captions (its CC3M-layout part), the world
    written on first use (default size, as `mmgen toy pretrain` writes it).

    Args:
        root: Folder of the generated world.
        split: ``"train"``, or ``"test"`` (the held-out captions built as a test set).
        image_size: Side of the images, for both the input and the output role.
        instruction_every: Every n-th training row is an instruction sample (the reference: 100).
        seed: Seed of the world and of the instruction phrasings.
    """

    def __init__(self, root: str = ".cache/mmgen-toy-world", split: str = "train", image_size: int = 32,
                 instruction_every: int = 10, seed: int = 0):
        folder = Path(root) / "captions"
        super().__init__(str(folder / ("train.tsv" if split == "train" else "val.tsv")), str(folder / "images"), split,
                         image_column="image", instruction_every=instruction_every, seed=seed,
                         input_image_size=image_size, output_image_size=image_size)
        self.root, self.world_seed, self.image_size = root, seed, image_size

    def build(self) -> list[Sample]:
        write_toy_world(Path(self.root), image_size=self.image_size, seed=self.world_seed)
        return super().build()


class ToyWorldStories(VISTDataset):
    """MiniGPT-5 stage-2 samples of the toy world's stories (its VIST SIS-layout part), the world
    written on first use. Arguments as `ToyWorldCaptionGeneration`; ``tasks`` and
    ``last_step_only`` as `VISTDataset`."""

    def __init__(self, root: str = ".cache/mmgen-toy-world", split: str = "train", image_size: int = 32,
                 tasks: list[str] = ("generate", "next", "understand"), last_step_only: bool = False, seed: int = 0):
        folder = Path(root) / "vist"
        super().__init__(str(folder / ("train.json" if split == "train" else "val.json")), str(folder / "images"),
                         split=split, tasks=list(tasks), last_step_only=last_step_only, seed=seed,
                         input_image_size=image_size, output_image_size=image_size)
        self.root, self.world_seed, self.image_size = root, seed, image_size

    def build(self) -> list[Sample]:
        write_toy_world(Path(self.root), image_size=self.image_size, seed=self.world_seed)
        return super().build()
