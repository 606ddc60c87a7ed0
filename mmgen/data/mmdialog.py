"""MMDialog for MiniGPT-5 stage 2: multi-turn conversations with images.

JSONL, one conversation per line: ``{"conversation_id": ..., "conversation": [{"turn":
[{"__TEXT__": "..."}, {"__MEDIA__": "<media id>"}, ...]}, ...]}``; media ids name image files
``{media id}.jpg`` (or .png/.jpeg/.gif) in the image folder. Turns alternate ``###Human:`` and
``###Assistant:``, the human first (REFERENCE.md sec. 4). Every assistant turn is one sample:

    source  ###Human: {text} <Img><ImageHere></Img> ###Assistant: {text} ... ###Human: {text} ###Assistant:
    target  {text} [IMG0..7] ###      (one voken group per image of the turn; no image: {text} ###)

Images of earlier turns are input images; images of the target turn are the ones to generate.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmgen.data.minigpt5_samples import ASSISTANT, END, HUMAN, IMAGE_IN_PROMPT, VOKEN_STRING, Sample, SampleDataset
from mmgen.data.vist import IMAGE_EXTENSIONS
from mmgen.errors import DataError


def parse_turn(turn: object, where: str) -> tuple[str, list[str]]:
    """(text, media ids) of one turn record."""
    if not isinstance(turn, dict) or not isinstance(turn.get("turn"), list):
        raise DataError(f"{where}: expected {{'turn': [...]}}")
    texts, media = [], []
    for j, item in enumerate(turn["turn"]):
        if isinstance(item, dict) and "__TEXT__" in item:
            texts.append(str(item["__TEXT__"]).strip())
        elif isinstance(item, dict) and "__MEDIA__" in item:
            media.append(str(item["__MEDIA__"]))
        else:
            raise DataError(f"{where}, item {j}: expected {{'__TEXT__': ...}} or {{'__MEDIA__': ...}}, got {item!r}")
    text = " ".join(t for t in texts if t)
    if not text and not media:
        raise DataError(f"{where}: empty turn (no text, no media)")
    return text, media


def conversation_samples(turns: list[tuple[str, list[Path]]], origin: str = "") -> list[Sample]:
    """One sample per assistant turn (odd index) of ``turns`` = [(text, image paths)]."""
    samples = []
    history, seen = "", []
    for t, (text, images) in enumerate(turns):
        role = HUMAN if t % 2 == 0 else ASSISTANT
        if role == ASSISTANT:
            target = " ".join([text] * bool(text) + [VOKEN_STRING] * len(images) + [END])
            samples.append(Sample(f"{history} {ASSISTANT}".strip(), target, list(seen), list(images),
                                  text or None, f"{origin}, turn {t}"))
        parts = [role] + [text] * bool(text) + [IMAGE_IN_PROMPT] * len(images)
        history = f"{history} {' '.join(parts)}".strip()
        seen += images
    return samples


class MMDialogDataset(SampleDataset):
    """MMDialog conversations as MiniGPT-5 stage-2 samples.

    Args:
        jsonl_path: Conversations, one JSON object per line.
        image_dir: Folder of ``{media id}.jpg`` images.
        image_size: Side of the loaded images.
        check_images: Check at start-up that every image exists.
    """

    def __init__(self, jsonl_path: str, image_dir: str, image_size: int = 224, check_images: bool = True):
        super().__init__(image_size, check_images)
        self.jsonl_path, self.image_dir = Path(jsonl_path), Path(image_dir)

    def _image_path(self, media_id: str) -> Path:
        for ext in IMAGE_EXTENSIONS:
            path = self.image_dir / f"{media_id}{ext}"
            if path.is_file():
                return path
        return self.image_dir / f"{media_id}.jpg"  # missing: reported by the image check

    def build(self) -> list[Sample]:
        if not self.jsonl_path.is_file():
            raise DataError(f"MMDialog file not found: {self.jsonl_path}")
        samples = []
        for line_number, line in enumerate(self.jsonl_path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{self.jsonl_path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON: {error}") from error
            if not isinstance(record, dict) or not isinstance(record.get("conversation"), list):
                raise DataError(f"{where}: expected an object with a 'conversation' list")
            where = f"{where} (conversation {record.get('conversation_id', '?')})"
            turns = []
            for t, turn in enumerate(record["conversation"]):
                text, media = parse_turn(turn, f"{where}, turn {t}")
                turns.append((text, [self._image_path(m) for m in media]))
            samples += conversation_samples(turns, where)
        return samples
