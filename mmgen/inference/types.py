"""What goes into a model's answer and what comes out of it.

A *conversation* is a list of parts in reading order: ``str`` parts are text, images are
``PIL.Image.Image`` objects or ``ImageRef`` (a file path). An *answer* is the model's reply in
the same order: ``TextPart``, ``RetrievedImage`` (from a retrieval index, with its score and the
file it came from) and ``GeneratedImage`` (from the image generator, with the seed that made it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from PIL import Image


@dataclass(frozen=True)
class ImageRef:
    """An input image given by path (read when the conversation is formatted)."""

    path: str


ConversationPart = Union[str, ImageRef, Image.Image]
Conversation = list[ConversationPart]


@dataclass
class TextPart:
    text: str


@dataclass
class RetrievedImage:
    path: str  # the image file the index points to
    score: float  # cosine similarity of the query and the image embedding
    rank: int = 0  # 0 = best match


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int | None = None  # the generator seed; None: not seeded (not reproducible)
    decision: str = "generate"  # what chose to generate: "generate", "both", "auto"


AnswerPart = Union[TextPart, RetrievedImage, GeneratedImage]


@dataclass
class Answer:
    parts: list[AnswerPart] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The text of the answer, images left out: its text parts joined by one space (an
        image stood between them)."""
        return " ".join(p.text.strip() for p in self.parts if isinstance(p, TextPart) and p.text.strip())

    @property
    def images(self) -> list[AnswerPart]:
        return [p for p in self.parts if not isinstance(p, TextPart)]


def image_of(part: ConversationPart) -> Image.Image | None:
    """The RGB image a conversation part stands for, or None for text."""
    if isinstance(part, str):
        return None
    if isinstance(part, ImageRef):
        with Image.open(Path(part.path)) as image:
            return image.convert("RGB")
    if isinstance(part, Image.Image):
        return part.convert("RGB")
    raise TypeError(f"a conversation part must be str, ImageRef or PIL image, not {type(part).__name__}")
