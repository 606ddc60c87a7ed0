"""VisDial (Visual Dialog) v1.0 dialogs with their images, for text-to-image evaluation.

The file is VisDial's own json (``visdial_1.0_val.json``)::

    {"split": "val2018", "data": {"questions": [str], "answers": [str],
      "dialogs": [{"image_id": int, "caption": str,
                   "dialog": [{"question": index, "answer": index, ...}, ...]}]}}

Questions and answers are indices into the shared lists. Images are
``VisualDialog_{split}_{image_id:012d}.jpg`` in ``image_dir`` (default: the json's folder), as the
release unpacks them; ``image_pattern`` names another layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mmgen.errors import DataError
from mmgen.files import inside_root, read_text, require_fields

IMAGE_PATTERN = "VisualDialog_{split}_{image_id:012d}.jpg"


@dataclass(frozen=True)
class Dialog:
    image_id: str
    image: Path
    caption: str
    rounds: list[tuple[str, str]]  # (question, answer) in order
    origin: str  # file and dialog index, for error messages


def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value.strip()


def _pick(table: list, index, where: str, key: str) -> str:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(table):
        raise DataError(f"{where}: {key!r} {index!r} is not an index into the {len(table)} {key}s")
    return _text(table[index], where, key)


def read_visdial(json_path: str | Path, image_dir: str | Path | None = None, image_pattern: str = IMAGE_PATTERN,
                 check_images: bool = True, allow_outside_paths: bool = False) -> list[Dialog]:
    """The dialogs of a VisDial json, in file order; DataError naming the file and dialog for a
    malformed record and (``check_images``) for an image that is missing."""
    json_path = Path(json_path)
    image_dir = Path(image_dir) if image_dir is not None else json_path.parent
    try:
        document = json.loads(read_text(json_path, "VisDial file"))
    except json.JSONDecodeError as error:
        raise DataError(f"{json_path}: not valid JSON: {error}") from error
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("questions", "answers", "dialogs")):
        raise DataError(f"{json_path}: expected VisDial's {{'data': {{'questions', 'answers', 'dialogs'}}}} lists")
    split = str(document.get("split", "val2018"))
    dialogs = []
    for i, record in enumerate(data["dialogs"]):
        where = f"{json_path}, dialogs[{i}]"
        require_fields(record, ("image_id", "caption", "dialog"), where, "a dialog object")
        image_id = record["image_id"]
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise DataError(f"{where}: 'image_id' must be an integer, got {image_id!r:.60}")
        if not isinstance(record["dialog"], list):
            raise DataError(f"{where}: 'dialog' must be a list of rounds")
        rounds = []
        for r, turn in enumerate(record["dialog"]):
            at = f"{where}, round {r}"
            if not isinstance(turn, dict) or "question" not in turn or "answer" not in turn:
                raise DataError(f"{at}: expected {{'question': index, 'answer': index}}")
            rounds.append((_pick(data["questions"], turn["question"], at, "question"),
                           _pick(data["answers"], turn["answer"], at, "answer")))
        name = image_pattern.format(split=split, image_id=image_id)
        image = inside_root(Path(name), image_dir, where, "image", allow_outside_paths)
        if check_images and not image.is_file():
            raise DataError(f"{where} (image_id {image_id}): image not found: {image}")
        dialogs.append(Dialog(str(image_id), image, _text(record["caption"], where, "caption"), rounds, where))
    if not dialogs:
        raise DataError(f"{json_path}: no dialogs (empty split)")
    return dialogs


def dialog_text(dialog: Dialog, rounds: int) -> str:
    """The first ``rounds`` question-answer rounds as the official FROMAGe evaluation writes them:
    ``"Q: {question}? A: {answer}."`` joined by spaces (the caption is not included)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    return " ".join(f"Q: {q.rstrip('?')}? A: {a.rstrip('.')}." for q, a in dialog.rounds[:rounds])
