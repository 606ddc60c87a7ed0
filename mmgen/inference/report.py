"""Answers written to a folder a person can look at.

    write_report(answers, conversations, "out/answers", ids=["q1", "q2"])

writes::

    out/answers/
      index.html      one self-contained page: each conversation and its answer in order, every
                      image embedded as a data: URI (opens from disk, no server, no network)
      answers.json    the same, as data (format below)
      images/         the generated images as PNG (and input images given as PIL objects)

``answers.json``::

    {"format": "mmgen-answers", "version": 1, "title": str, "metadata": {...},
     "conversations": [
       {"id": str, "mode": str | null,
        "input":  [{"type": "text", "text": str} | {"type": "image", "path": str}, ...],
        "answer": [{"type": "text", "text": str}
                   | {"type": "retrieved", "path": str, "score": float, "rank": int}
                   | {"type": "generated", "file": "images/....png", "seed": int | null,
                      "decision": str}, ...],
        "text": str}]}                       # the answer's text, images left out

Input and retrieved images are referenced where they are (``path``, as given); files the
report writes (``file``) are relative to the folder. Every piece of text is HTML-escaped, and the
page forbids scripts and remote loads (Content-Security-Policy), so a prompt or an answer cannot
inject markup.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Sequence

from PIL import Image

from mmgen.inference.types import (
    Answer, Conversation, GeneratedImage, ImageRef, RetrievedImage, TextPart,
)

FORMAT = "mmgen-answers"
FORMAT_VERSION = 1
HTML_FILE = "index.html"
JSON_FILE = "answers.json"
IMAGES_DIR = "images"

EMBED_AS_IS = 256 * 1024  # image files up to this size are embedded byte for byte
THUMBNAIL = 512  # larger ones are embedded as a JPEG of at most this side
SMALL = 160  # images narrower than this are shown enlarged (pixelated), e.g. 32 px toy images
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe form of an id (no separators, no '..')."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return cleaned[:limit] or "item"


class Report:
    """Writes a report folder one conversation at a time (images at once, the page at the end),
    so a long prediction run does not hold every generated image in memory.

    ``add`` saves the conversation's images and returns its JSON record; ``finish`` writes
    ``answers.json`` and ``index.html`` from the records (all of them, or those given, e.g.
    gathered from several processes) and returns the page's path.
    """

    def __init__(self, out_dir: str | Path, title: str = "mmgen answers", metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.title = title
        self.metadata = dict(metadata or {})
        self.records: list[dict] = []
        self._count = 0

    def add(self, conversation_id: str, conversation: Conversation, answer: Answer, mode: str | None = None,
            number: int | None = None) -> dict:
        """``number``: the conversation's position in the whole run, which names its image files
        (default: the count of those added so far; processes of one run pass the dataset index)."""
        name = f"{self._count if number is None else number:05d}_{slug(conversation_id)}"
        self._count += 1
        record = {
            "id": conversation_id,
            "mode": mode,
            "input": [self._input_part(part, name, j) for j, part in enumerate(conversation)],
            "answer": [self._answer_part(part, name, j) for j, part in enumerate(answer.parts)],
            "text": answer.text,
        }
        self.records.append(record)
        return record

    def _save(self, image: Image.Image, file_name: str) -> str:
        folder = self.out_dir / IMAGES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / file_name, format="PNG")
        return f"{IMAGES_DIR}/{file_name}"

    def _input_part(self, part, name: str, j: int) -> dict:
        if isinstance(part, str):
            return {"type": "text", "text": part}
        if isinstance(part, ImageRef):
            return {"type": "image", "path": str(part.path)}
        if isinstance(part, Image.Image):
            return {"type": "image", "file": self._save(part.convert("RGB"), f"{name}_input{j}.png")}
        raise TypeError(f"a conversation part must be str, ImageRef or PIL image, not {type(part).__name__}")

    def _answer_part(self, part, name: str, j: int) -> dict:
        if isinstance(part, TextPart):
            return {"type": "text", "text": part.text}
        if isinstance(part, RetrievedImage):
            return {"type": "retrieved", "path": str(part.path), "score": float(part.score), "rank": int(part.rank)}
        if isinstance(part, GeneratedImage):
            return {"type": "generated", "file": self._save(part.image, f"{name}_gen{j}.png"),
                    "seed": part.seed, "decision": part.decision}
        raise TypeError(f"an answer part must be TextPart, RetrievedImage or GeneratedImage, not {type(part).__name__}")

    def finish(self, records: Sequence[dict] | None = None) -> Path:
        records = list(self.records if records is None else records)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        document = {"format": FORMAT, "version": FORMAT_VERSION, "title": self.title,
                    "metadata": self.metadata, "conversations": records}
        (self.out_dir / JSON_FILE).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
        page = self.out_dir / HTML_FILE
        page.write_text(render_html(records, self.out_dir, self.title, self.metadata), encoding="utf-8")
        return page


def write_report(
    answers: Sequence[Answer],
    conversations: Sequence[Conversation],
    out_dir: str | Path,
    ids: Sequence[str] | None = None,
    modes: Sequence[str | None] | None = None,
    title: str = "mmgen answers",
    metadata: dict | None = None,
) -> Path:
    """Write ``answers`` to their ``conversations`` (same order) into ``out_dir``: generated
    images as PNG, ``answers.json`` and a self-contained ``index.html``; returns the page's path.
    ``ids`` name the conversations (default "0", "1", ...)."""
    if len(answers) != len(conversations):
        raise ValueError(f"{len(answers)} answers for {len(conversations)} conversations")
    ids = [str(i) for i in range(len(answers))] if ids is None else [str(i) for i in ids]
    modes = [None] * len(answers) if modes is None else list(modes)
    if len(ids) != len(answers) or len(modes) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(ids)} ids and {len(modes)} modes")
    report = Report(out_dir, title, metadata)
    for conversation_id, conversation, answer, mode in zip(ids, conversations, answers, modes):
        report.add(conversation_id, conversation, answer, mode)
    return report.finish()


# -- the page -----------------------------------------------------------------------------------
_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
main { max-width: 980px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
.meta { color: #5b6475; font-size: 13px; margin: 0 0 20px; }
.meta code { background: #e6e8ee; padding: 1px 4px; border-radius: 3px; }
section.conv { background: #fff; border: 1px solid #dde1e8; border-radius: 10px; margin: 0 0 18px; padding: 14px 18px; }
section.conv h2 { font-size: 15px; margin: 0 0 10px; color: #39414f; }
.mode { font-weight: normal; font-size: 12px; color: #fff; background: #6b7689; border-radius: 9px; padding: 1px 8px; margin-left: 6px; }
.turn { display: grid; grid-template-columns: 76px 1fr; gap: 10px; padding: 8px 0; border-top: 1px solid #eef0f4; }
.who { font-size: 12px; font-weight: 600; text-transform: uppercase; letter-spacing: .04em; color: #7a8394; padding-top: 3px; }
.answer .who { color: #2a6ad6; }
.parts > * { margin: 0 0 8px; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0 0 8px; }
.empty { color: #9aa2b1; font-style: italic; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; padding: 6px; background: #f7f8fa; border: 1px solid #e3e6ec; border-radius: 8px; width: min-content; }
figure.retrieved { border-color: #9cc2f5; }
figure.generated { border-color: #a7dcb2; }
figure img { display: block; max-width: 266px; height: auto; border-radius: 4px; outline: 1px solid #d5d9e0; }
figure img.small { image-rendering: pixelated; }
figcaption { font-size: 12px; color: #4d5666; margin-top: 5px; overflow-wrap: anywhere; min-width: 150px; }
figcaption .what { white-space: nowrap; }
.tag { font-weight: 600; }
.retrieved .tag { color: #1f5fbf; }
.generated .tag { color: #237a39; }
.missing { width: 128px; height: 96px; display: flex; align-items: center; justify-content: center; text-align: center;
           font-size: 12px; color: #a33; background: #fbeaea; border-radius: 4px; }
"""


def render_html(records: Sequence[dict], out_dir: str | Path, title: str = "mmgen answers",
                metadata: dict | None = None) -> str:
    """The self-contained page of ``records`` (answers.json's conversations); files the records
    name relative to the report are read from ``out_dir``."""
    out_dir = Path(out_dir)
    esc = _escape
    meta_items = "".join(
        f" · {esc(str(k))}: <code>{esc(str(v))}</code>" for k, v in (metadata or {}).items() if v is not None
    )
    sections = [_render_conversation(i, record, out_dir) for i, record in enumerate(records)]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        # no scripts, no remote loads: the page shows only what is in it
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{esc(title)}</h1>\n<p class=\"meta\">{len(records)} conversation{'s' if len(records) != 1 else ''}"
        f"{meta_items}</p>\n" + "\n".join(sections) + "\n</main>\n</body>\n</html>\n"
    )


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


def _render_conversation(i: int, record: dict, out_dir: Path) -> str:
    esc = _escape
    mode = f"<span class=\"mode\">{esc(str(record['mode']))}</span>" if record.get("mode") else ""
    return (
        f"<section class=\"conv\" id=\"c{i}\">\n<h2>{esc(str(record.get('id', i)))}{mode}</h2>\n"
        f"<div class=\"turn input\"><div class=\"who\">Input</div><div class=\"parts\">"
        f"{_render_parts(record.get('input', []), out_dir)}</div></div>\n"
        f"<div class=\"turn answer\"><div class=\"who\">Answer</div><div class=\"parts\">"
        f"{_render_parts(record.get('answer', []), out_dir)}</div></div>\n</section>"
    )


def _render_parts(parts: list[dict], out_dir: Path) -> str:
    """Text parts as paragraphs; consecutive images side by side in one row."""
    pieces, row = [], []
    for part in parts:
        if part["type"] == "text":
            if row:
                pieces.append("<div class=\"row\">" + "".join(row) + "</div>")
                row = []
            if part["text"].strip():
                pieces.append(f"<p class=\"text\">{_escape(part['text'])}</p>")
        else:
            row.append(_render_image(part, out_dir))
    if row:
        pieces.append("<div class=\"row\">" + "".join(row) + "</div>")
    if not pieces:
        return "<p class=\"text empty\">(nothing)</p>"
    return "".join(pieces)


def _render_image(part: dict, out_dir: Path) -> str:
    esc = _escape
    kind = part["type"]
    location = part.get("path") or part.get("file")
    path = Path(part["path"]) if "path" in part else out_dir / part["file"]
    name = Path(location).name
    if kind == "retrieved":
        caption = (f"<span class=\"what\"><span class=\"tag\">retrieved #{part['rank'] + 1}</span> · "
                   f"score {part['score']:.3f}</span><br>{esc(name)}")
    elif kind == "generated":
        seed = "unseeded" if part.get("seed") is None else f"seed {part['seed']}"
        caption = f"<span class=\"what\"><span class=\"tag\">generated</span> · {esc(seed)}</span>"
    else:
        caption = esc(name)
    embedded = _data_uri(path)
    if embedded is None:
        body = f"<div class=\"missing\">image not found<br>{esc(name)}</div>"
    else:
        uri, width = embedded
        small = width < SMALL
        size = f" width=\"{min(4 * width, 160) if small else min(width, 266)}\""
        body = (f"<img src=\"{uri}\"{size} class=\"{'small' if small else ''}\" alt=\"{esc(location)}\" "
                f"title=\"{esc(location)}\">")
    return f"<figure class=\"{esc(kind)}\">{body}<figcaption>{caption}</figcaption></figure>"


def _data_uri(path: Path) -> tuple[str, int] | None:
    """(data: URI, pixel width) of an image file, or None if it cannot be read. Small PNG, JPEG,
    GIF and WebP files are embedded as they are; others as a JPEG thumbnail."""
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            fmt, width = image.format, image.width
            if fmt in _MIME and len(raw) <= EMBED_AS_IS:
                data, mime = raw, _MIME[fmt]
            else:
                thumb = image.convert("RGB")
                thumb.thumbnail((THUMBNAIL, THUMBNAIL))
                buffer = io.BytesIO()
                thumb.save(buffer, format="JPEG", quality=88)
                data, mime, width = buffer.getvalue(), "image/jpeg", thumb.width
    except (OSError, ValueError):  # missing, unreadable or not an image: the page says so
        return None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", width
