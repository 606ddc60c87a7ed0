"""The benchmarks' items: what the model reads (its context), and what it should show.

An :class:`Item` is one test case; a *setting* is one column group of a paper's table (VIST's
"1 caption", "5 captions", "5 captions + 4 images"; VisDial's "1 round", ...), a list of items.

- VIST (SIS json or MiniGPT-5's cleaned json, read by ``mmgen.data.vist``): the last step of each
  story is the target; the context is its caption alone, all the captions, or all the captions
  with every image but the last, in story order. Candidates for retrieval: every image of the
  split; context images are excluded from the ranking.
- VisDial (``mmgen.data.visdial``): the first r question-answer rounds are the context and the
  dialog's image the target; candidates: every dialog image of the split.
- CC3M (a caption TSV, ``mmgen.data.captions``): the caption asks for an image (FID, IS); the
  image asks for its caption (BLEU, CIDEr).
- MMDialog (``mmgen.data.mmdialog``, test split): each turn after the first, given the history
  window MiniGPT-5 uses, is the target text (and image, where the turn has one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmgen.errors import DataError
from mmgen.inference.types import ImageRef


@dataclass
class Item:
    id: str
    context: list  # conversation parts (str / ImageRef) before the image or answer is asked for
    target_image: Path | None = None
    target_text: str | None = None
    caption: str | None = None  # the text-to-image baseline's prompt: the context's text (None: it has images)
    origin: str = ""  # file and record, for error messages

    @property
    def shown(self) -> set[str]:
        """Images the context shows (never a retrieval answer)."""
        return {part.path for part in self.context if isinstance(part, ImageRef)}


def require_images(items: list[Item]) -> None:
    """DataError naming the record and file of the first missing image (all counted)."""
    missing = []
    for item in items:
        for path in [p.path for p in item.context if isinstance(p, ImageRef)] + [item.target_image]:
            if path is not None and not Path(path).is_file():
                missing.append((item.origin, path))
    if missing:
        origin, path = missing[0]
        raise DataError(f"{origin}: image not found: {path} ({len(missing)} missing image references in all)")


# -- VIST ----------------------------------------------------------------------------------------
VIST_SETTINGS = ("1 caption", "5 captions", "5 captions + 4 images")


def vist_settings(json_path: str, image_dir: str | None = None, image_mapping: str | None = None,
                  limit: int | None = None, steps: int = 5) -> tuple[dict[str, list[Item]], list[Path]]:
    """({setting: items}, candidate images) for VIST's contextual retrieval and generation.
    Stories with fewer than ``steps`` steps are refused; longer ones use their last ``steps``."""
    from mmgen.data.vist import VISTDataset

    dataset = VISTDataset(json_path, image_dir=image_dir, image_mapping=image_mapping)
    stories = dataset.stories()
    candidates = sorted({str(path) for _, story in stories for _, path in story})
    settings: dict[str, list[Item]] = {name: [] for name in VIST_SETTINGS}
    for story_id, story in stories[:limit]:
        origin = f"{json_path}, story {story_id}"
        if len(story) < steps:
            raise DataError(f"{origin}: {len(story)} steps, the VIST protocols need {steps}")
        story = story[-steps:]
        captions = [caption for caption, _ in story]
        images = [ImageRef(str(path)) for _, path in story]
        last, target = captions[-1], story[-1][1]
        interleaved = [part for c, i in zip(captions[:-1], images[:-1]) for part in (c, i)] + [last]
        contexts = ([last], [" ".join(captions)], interleaved)
        for name, context, prompt in zip(VIST_SETTINGS, contexts, (last, " ".join(captions), None)):
            settings[name].append(Item(story_id, context, target, caption=prompt, origin=origin))
    for items in settings.values():
        require_images(items)
    return settings, [Path(c) for c in candidates]


# -- VisDial -------------------------------------------------------------------------------------
VISDIAL_ROUNDS = (1, 5, 10)


def visdial_settings(json_path: str, image_dir: str | None = None, limit: int | None = None,
                     rounds: tuple[int, ...] = VISDIAL_ROUNDS) -> tuple[dict[str, list[Item]], list[Path]]:
    """({"r rounds": items}, candidate images): the first r rounds of each dialog -> its image."""
    from mmgen.data.visdial import dialog_text, read_visdial

    dialogs = read_visdial(json_path, image_dir)
    candidates = sorted({str(d.image) for d in dialogs})
    settings = {}
    for r in rounds:
        name = f"{r} round" + ("s" if r > 1 else "")
        settings[name] = [Item(d.image_id, [dialog_text(d, r)], d.image, caption=dialog_text(d, r), origin=d.origin)
                          for d in dialogs[:limit]]
    return settings, [Path(c) for c in candidates]


# -- CC3M ----------------------------------------------------------------------------------------
def caption_items(tsv: str, image_dir: str | None = None, caption_column: str = "caption",
                  image_column: str = "image", limit: int | None = None) -> list[Item]:
    """One item per TSV row: the caption (``caption`` and ``target_text``) and its image."""
    from mmgen.data.captions import read_caption_tsv

    tsv_path = Path(tsv)
    records = read_caption_tsv(tsv_path, Path(image_dir) if image_dir else tsv_path.parent, caption_column,
                               image_column)[:limit]
    items = [Item(f"row{r.line}", [r.caption], r.image_path, target_text=r.caption, caption=r.caption,
                  origin=f"{tsv_path}, line {r.line}") for r in records]
    require_images(items)
    return items


# -- MMDialog ------------------------------------------------------------------------------------
def mmdialog_items(jsonl: str, image_dir: str | None = None, limit: int | None = None) -> list[Item]:
    """MMDialog's test samples as MiniGPT-5 builds them: the source (history window, its images
    as ImageRef parts) is the context; the target's text (vokens and "###" removed) and image
    are what the answer is compared with. A missing image is an error."""
    from mmgen.data.minigpt5_samples import END, IMAGE_IN_PROMPT, VOKEN_STRING
    from mmgen.data.mmdialog import MMDialogDataset

    samples = MMDialogDataset(jsonl, image_dir=image_dir, split="test", max_turn_tokens=None,
                              missing_images="error").build()[:limit]
    items = []
    for n, sample in enumerate(samples):
        pieces = sample.source.split(IMAGE_IN_PROMPT)
        context: list = []
        for i, piece in enumerate(pieces):
            context.append(piece)
            if i < len(sample.input_images):
                context.append(ImageRef(str(sample.input_images[i])))
        text = sample.target.replace(VOKEN_STRING, " ").removesuffix(END).strip()
        text = text.removesuffix(END).strip()
        image = sample.output_images[0] if sample.output_images else None
        items.append(Item(f"turn{n:05d}", [p for p in context if p != ""], image, target_text=text,
                          origin=sample.origin))
    require_images(items)
    return items
