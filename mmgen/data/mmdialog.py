"""MMDialog for MiniGPT-5 stage 2: multi-turn conversations with images.

The file is read as MiniGPT-5 distributes it (``test_conversations.txt``): one JSON object per line,
``{"conversation_id": ..., "conversation": [{"turn": [{"__TEXT__": "..."}, {"__MEDIA__": "<id>"}]},
...]}``, with the images as ``{media id}.jpg`` next to the file. A turn is its first item's text
and, if it has a second item, that item's image (further items are ignored, as in the reference).

Samples, as MiniGPT-5 builds them. Turn i is spoken by ``###Human:`` when i is even and by
``###Assistant:`` when odd; every turn after the first is one sample (human turns too):

    source  {system} ###Human: {text} <Img><ImageHere></Img> ###Assistant: {text} ... {role of turn i}
    target  {text} [IMG0..7] ###       (the turn has an image; without: {text} ###)

The history is a window: the previous full exchange and the current one, i.e. turns
``2 * (i // 2) - 2`` to ``i - 1``. Images in the history are input images, the turn's image is the
output image. A conversation is used up to (not including) its first turn that

- has empty text, or text ending in ``.jpg``;
- (training split, with a tokenizer) has more than ``max_turn_tokens`` tokens;
- names an image that is missing or one of ``BROKEN_MEDIA`` (``missing_images="stop"``);

and conversations with fewer than two turns give nothing. No MMDialog sample carries a caption
for the caption loss (as in the reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from mmgen.data.minigpt5_samples import (
    ASSISTANT, END, HUMAN, IMAGE_IN_PROMPT, VOKEN_STRING, ImagePreprocessing, Sample, SampleDataset, Split,
)
from mmgen.errors import ConfigError, DataError
from mmgen.files import inside_root, jsonl_records

MMDIALOG_SYSTEM_PROMPT = (
    "Give the following images in <Img>ImageContent</Img> format. "
    "You will be able to see the images once I provide it to you. Please generate conversations with appropriate images."
)
# Media the reference stops at: images of the MMDialog release that cannot be decoded.
BROKEN_MEDIA = ("-3872362534310063124", "3713630103994725971")

Turn = tuple[str, Path | None]  # (text, image path or None)


def parse_turn(turn: object, where: str) -> tuple[str, str | None]:
    """(text, media id or None) of one turn record; a DataError naming ``where`` if the record
    is not ``{"turn": [{"__TEXT__": str}, {"__MEDIA__": id}?, ...]}``."""
    if not isinstance(turn, dict) or not isinstance(turn.get("turn"), list) or not turn["turn"]:
        raise DataError(f"{where}: expected {{'turn': [{{'__TEXT__': ...}}, ...]}}, got {turn!r:.120}")
    items = turn["turn"]
    first = items[0]
    if not isinstance(first, dict) or "__TEXT__" not in first:
        raise DataError(f"{where}, item 0: expected {{'__TEXT__': ...}}, got {first!r:.120}")
    text = first["__TEXT__"]
    if not isinstance(text, str):
        raise DataError(f"{where}, item 0: '__TEXT__' must be a string, got {type(text).__name__} {text!r:.80}")
    if len(items) < 2:
        return text, None
    second = items[1]
    if not isinstance(second, dict) or "__MEDIA__" not in second:
        raise DataError(f"{where}, item 1: expected {{'__MEDIA__': ...}}, got {second!r:.120}")
    media = second["__MEDIA__"]
    if not isinstance(media, (str, int)) or isinstance(media, bool) or str(media) == "":
        raise DataError(f"{where}, item 1: '__MEDIA__' must be a media id string, got {media!r}")
    return text, str(media)


def history_start(i: int) -> int:
    """First turn kept in the prompt of turn i: the previous full exchange onward."""
    return max(0, 2 * (i // 2) - 2)


def conversation_samples(turns: list[Turn], system_prompt: str = MMDIALOG_SYSTEM_PROMPT,
                         origin: str = "") -> list[Sample]:
    """One sample per turn after the first, ``turns`` = [(text, image path or None)], all usable."""
    entries: list[list[str | Path]] = []  # per turn: its text with the role, then its image
    samples = []
    for i, (text, image) in enumerate(turns):
        role = HUMAN if i % 2 == 0 else ASSISTANT
        if i > 0:
            history = [e for turn in entries[history_start(i):i] for e in turn]
            words = [system_prompt] * bool(system_prompt)
            words += [IMAGE_IN_PROMPT if isinstance(e, Path) else e for e in history] + [role]
            target = f"{text} {VOKEN_STRING} {END}" if image is not None else f"{text} {END}"
            samples.append(Sample(" ".join(words), target, [e for e in history if isinstance(e, Path)],
                                  [image] if image is not None else [], None, f"{origin}, turn {i}"))
        entries.append([f"{role} {text}"] + ([image] if image is not None else []))
    return samples


class MMDialogDataset(SampleDataset):
    """MMDialog conversations as MiniGPT-5 stage-2 samples (see the module docstring).

    Args:
        jsonl_path: Conversations, one JSON object per line (MiniGPT-5's ``*_conversations.txt``).
        image_dir: Folder of the ``{media id}.jpg`` images. Default: the file's folder.
        split: ``"train"`` or ``"test"`` (no token limit).
        tokenizer: The LLM's tokenizer (hub id, folder or ``mmgen:NAME``), to count a turn's
            tokens for ``max_turn_tokens``; give it the LLM's ``tokenizer_kwargs`` too (the
            reference counts with the slow LLaMA tokenizer, without special tokens).
        tokenizer_kwargs: Arguments for ``AutoTokenizer.from_pretrained``.
        max_turn_tokens: In the training split a conversation stops before a longer turn (the
            reference: 50). None: no limit (then no tokenizer is needed).
        missing_images: ``"stop"``: a conversation stops before a turn whose image is missing
            or in ``broken_media``, as the reference does (MMDialog's image set is incomplete);
            ``"error"``: a DataError naming the file, line and turn.
        broken_media: Media ids treated as missing.
        system_prompt: Prefix of every source.
        input_image_size, output_image_size, image_preprocessing, random_flip, check_images,
        allow_outside_paths: see :class:`~mmgen.data.minigpt5_samples.SampleDataset`.
    """

    def __init__(self, jsonl_path: str, image_dir: str | None = None, split: Split = "train",
                 tokenizer: str | None = None, tokenizer_kwargs: dict | None = None,
                 max_turn_tokens: int | None = 50, missing_images: Literal["stop", "error"] = "stop",
                 broken_media: list[str] = BROKEN_MEDIA, system_prompt: str = MMDIALOG_SYSTEM_PROMPT,
                 input_image_size: int = 224, output_image_size: int = 512,
                 image_preprocessing: ImagePreprocessing = "minigpt5", random_flip: bool | None = None,
                 check_images: bool = True, allow_outside_paths: bool = False):
        super().__init__(split, input_image_size, output_image_size, image_preprocessing, random_flip, check_images,
                         allow_outside_paths)
        if missing_images not in ("stop", "error"):
            raise ConfigError(f"missing_images must be 'stop' or 'error', got {missing_images!r}")
        if split == "train" and max_turn_tokens is not None and tokenizer is None:
            raise ConfigError(
                f"{jsonl_path}: max_turn_tokens={max_turn_tokens} needs the LLM's `tokenizer` to count "
                "tokens; give it, or set max_turn_tokens: null for no limit"
            )
        self.jsonl_path = Path(jsonl_path)
        self.image_dir = Path(image_dir) if image_dir is not None else self.jsonl_path.parent
        self.tokenizer_name, self.tokenizer_kwargs = tokenizer, dict(tokenizer_kwargs or {})
        self.max_turn_tokens = max_turn_tokens if split == "train" else None
        self.missing_images, self.broken_media = missing_images, {str(m) for m in broken_media}
        self.system_prompt = system_prompt

    def _token_counter(self):
        """Number of tokens of a text (no special tokens), or None without a limit."""
        if self.max_turn_tokens is None:
            return None
        from mmgen.components.tokenizers import load_tokenizer

        from mmgen.components.hub import resolve_name

        tokenizer = load_tokenizer(resolve_name(self.tokenizer_name), **self.tokenizer_kwargs)
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _usable_turns(self, conversation: list, where: str, count_tokens) -> list[Turn]:
        """The turns before the first one that stops the conversation (module docstring)."""
        turns = []
        for t, record in enumerate(conversation):
            text, media = parse_turn(record, f"{where}, turn {t}")
            if not text or text.endswith(".jpg"):
                break
            if count_tokens is not None and count_tokens(text) > self.max_turn_tokens:
                break
            image = None
            if media is not None:
                image = inside_root(Path(f"{media}.jpg"), self.image_dir, f"{where}, turn {t}", "'__MEDIA__' id",
                                    self.allow_outside_paths)
                if media in self.broken_media or not image.is_file():
                    if self.missing_images == "error":
                        why = "a known broken image" if media in self.broken_media else "image not found"
                        raise DataError(f"{where}, turn {t}: {why}: {image}")
                    break
            turns.append((text, image))
        return turns

    def build(self) -> list[Sample]:
        if not self.jsonl_path.exists():
            raise DataError(f"MMDialog file not found: {self.jsonl_path}")
        count_tokens = self._token_counter()
        samples = []
        for _, where, record in jsonl_records(self.jsonl_path, "MMDialog file"):
            if not isinstance(record.get("conversation"), list):
                raise DataError(f"{where}: expected an object with a 'conversation' list")
            where = f"{where} (conversation {record.get('conversation_id', '?')})"
            if len(record["conversation"]) < 2:
                continue
            turns = self._usable_turns(record["conversation"], where, count_tokens)
            samples += conversation_samples(turns, self.system_prompt, where)
        return samples
