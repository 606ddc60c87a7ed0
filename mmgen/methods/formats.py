"""Sequence formats: what each method's LLM sequences look like, in one place per method.

A format turns an interleaved input (a training sample, or a conversation to answer) into
``Text`` / ``ImageSlot`` segments (``mmgen.data.interleave``) and a batch of them into LLM inputs
(ids, attention mask, labels), right-padded for training or left-padded for decoding. Training,
inference and evaluation build their sequences through it, so where BOS goes, how an image
enters and which tokens carry a loss are written once.

A format holds a tokenizer and a few integers, nothing of the model, so it pickles into
DataLoader workers; images are handed back as they were given, in order, for the model's visual
encoder.

    fmt = model.sequence_format()                     # after configure_model()
    segments, images = fmt.prompt(["Look:", ImageRef("cat.png"), "What is it?"])
    batch = fmt.collate([segments], padding_side="left")   # decoding: new tokens go at the end
    embeds = batch.embed(model.llm.embed, image_embeddings)  # (b, t, d)
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from mmgen.data.interleave import ImageSlot, Interleaved, Segment, Text, collate, pack_pairs
from mmgen.errors import ConfigError, DataError

PADDING_SIDES = ("right", "left")


def left_pad(seq: Interleaved) -> Interleaved:
    """The same batch with each row's padding moved to the left, so that tokens appended while
    decoding follow every row's last real token."""
    lengths = seq.attention_mask.sum(1)  # (b,)
    t = seq.attention_mask.shape[1]
    # Row i takes its columns rotated right by its padding length: (b, t) gather indices.
    index = (torch.arange(t, device=lengths.device)[None, :] - (t - lengths)[:, None]) % t
    return Interleaved(seq.input_ids.gather(1, index), seq.attention_mask.gather(1, index), seq.labels.gather(1, index))


def is_image(part) -> bool:
    """Whether a conversation part is an image (a PIL image or an ``ImageRef``)."""
    from mmgen.inference.types import ImageRef

    return isinstance(part, (Image.Image, ImageRef))


class SequenceFormat:
    """What every method's format shares: tokenising, image slots, conversations, collating.

    Args:
        tokenizer: The LLM's tokenizer (with the method's special tokens added).
        n_image_tokens: LLM positions one input image fills (0: the model reads no images).
    """

    def __init__(self, tokenizer, n_image_tokens: int):
        if tokenizer is None:
            raise ConfigError("a sequence format needs the LLM's tokenizer (configure_model() first)")
        self.tokenizer = tokenizer
        self.n_image_tokens = n_image_tokens

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def tokenize(self, text: str, bos: bool) -> list[int]:
        """Token ids of ``text``, opened by BOS when ``bos`` (and the tokenizer adds one)."""
        return self.tokenizer(text, add_special_tokens=bos).input_ids

    def image_segments(self) -> list[Segment]:
        """The segments one input image becomes (subclasses add delimiters)."""
        if self.n_image_tokens <= 0:
            raise DataError(f"{type(self).__name__}: the conversation has an image but this model reads none")
        return [ImageSlot(self.n_image_tokens)]

    def prompt(self, conversation: Sequence) -> tuple[list[Segment], list]:
        """A conversation as an unsupervised decoding prompt: (segments, its images in order).

        Text parts are tokenised one by one; only the first text part gets BOS (the official
        FROMAGe and GILL inference does the same); each image becomes :meth:`image_segments`.
        """
        if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
            raise DataError(f"a conversation is a list of text and image parts, not {type(conversation).__name__}")
        if len(conversation) == 0:
            raise DataError("a conversation needs at least one part")
        segments: list[Segment] = []
        images = []
        first_text = True
        for part in conversation:
            if isinstance(part, str):
                segments.append(Text(self.tokenize(part, bos=first_text), supervised=False))
                first_text = False
            elif is_image(part):
                segments.extend(self.image_segments())
                images.append(part)
            else:
                raise DataError(f"a conversation part must be str, ImageRef or PIL image, not {type(part).__name__}")
        return segments, images

    def collate(self, sequences: list[list[Segment]], padding_side: str = "right", device=None) -> Interleaved:
        """A batch of segment lists as LLM inputs; ``padding_side="left"`` for decoding."""
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, not {padding_side!r}")
        seq = collate(sequences, self.pad_id, device)
        return left_pad(seq) if padding_side == "left" else seq


class FROMAGeFormat(SequenceFormat):
    """FROMAGe: ``[prefix][BOS caption][RET]`` (captioning; BOS is a target, everything from
    ``[RET]`` on is masked) and ``[BOS caption [RET]]`` (retrieval; ``[RET]`` is a target). A
    caption is cut so that with ``[RET]`` it has ``max_text_length`` tokens."""

    def __init__(self, tokenizer, n_image_tokens: int, ret_id: int, max_text_length: int = 24):
        super().__init__(tokenizer, n_image_tokens)
        self.ret_id = ret_id
        self.max_text_length = max_text_length

    def caption_ids(self, caption: str) -> list[int]:
        """BOS + caption tokens, cut so that with [RET] appended there are max_text_length."""
        return self.tokenize(caption, bos=True)[: self.max_text_length - 1]

    def caption_sequences(self, ids: list[list[int]], pack: bool = False) -> list[list[Segment]]:
        """[prefix][BOS caption][RET] with [RET] masked, as in the reference; packed:
        [img1][BOS cap1][img2][BOS cap2][RET][RET]."""
        heads = [[ImageSlot(self.n_image_tokens), Text(i)] for i in ids]
        tails = [[Text([self.ret_id], supervised=False)] for _ in ids]
        if pack:
            return pack_pairs(heads, tails, self.bos_id, keep_second_bos=True)
        return [h + t for h, t in zip(heads, tails)]

    def retrieval_sequences(self, ids: list[list[int]]) -> list[list[Segment]]:
        """[BOS caption [RET]], every token a target: its [RET] state is the text embedding."""
        return [[Text(i + [self.ret_id])] for i in ids]


class GILLFormat(SequenceFormat):
    """GILL: ``[prefix][BOS caption][IMG0..r-1]`` (captioning; the [IMG] tokens masked) and
    ``[BOS caption IMG0][IMG1..r-1]`` (retrieval and generation: caption and [IMG0] targets).
    A caption is cut so that with the r [IMG] tokens it has ``max_text_length`` tokens."""

    def __init__(self, tokenizer, n_image_tokens: int, img_ids: list[int], max_text_length: int = 32):
        super().__init__(tokenizer, n_image_tokens)
        self.img_ids = list(img_ids)
        self.max_text_length = max_text_length

    def caption_ids(self, caption: str) -> list[int]:
        """BOS + caption tokens, cut so that with the r [IMG] tokens there are max_text_length."""
        return self.tokenize(caption, bos=True)[: self.max_text_length - len(self.img_ids)]

    def caption_sequences(self, ids: list[list[int]], pack: bool = False) -> list[list[Segment]]:
        """[prefix][BOS caption][IMG0..r-1]: BOS and caption are targets (BOS predicted from the
        last visual token), the [IMG] tokens are masked. Packed: [v1][BOS cap1][v2][cap2][IMG..][IMG..]."""
        heads = [[ImageSlot(self.n_image_tokens), Text(i)] for i in ids]
        tails = [[Text(self.img_ids, supervised=False)] for _ in ids]
        if pack:
            return pack_pairs(heads, tails, self.bos_id, keep_second_bos=False)
        return [h + t for h, t in zip(heads, tails)]

    def text_sequences(self, ids: list[list[int]], pack: bool = False) -> list[list[Segment]]:
        """[BOS caption IMG0][IMG1..r-1]: caption and [IMG0] are targets. Packed (reference):
        [BOS cap1 IMG0 | IMG1..r-1 cap2 IMG0..r-1] where the second caption (BOS dropped) and its
        [IMG] tokens carry no labels at all."""
        img0, rest = self.img_ids[:1], self.img_ids[1:]
        single = [[Text(i + img0), Text(rest, supervised=False)] for i in ids]
        if not pack:
            return single
        packed = []
        for a in range(0, len(ids) - 1, 2):
            second = ids[a + 1][1:] if ids[a + 1][:1] == [self.bos_id] else ids[a + 1]
            packed.append(single[a] + [Text(second + self.img_ids, supervised=False)])
        if len(ids) % 2:
            packed.append(single[-1])
        return packed


class MiniGPT5Format(SequenceFormat):
    """MiniGPT-5: ``###Human: ... <Img><ImageHere></Img> ... ###Assistant:`` prompts (nothing
    supervised; each ``<ImageHere>`` is an image's ``n_image_tokens`` positions) followed by the
    target (supervised except ``[IMG1..6]``; the reference supervises ``[IMG0]``, ``[IMG7]`` and
    the closing ``###``, with no EOS)."""

    def __init__(self, tokenizer, n_image_tokens: int, voken_ids: list[int]):
        super().__init__(tokenizer, n_image_tokens)
        self.voken_ids = list(voken_ids)

    def source_segments(self, source: str) -> list[Segment]:
        """BOS + prompt, ``<ImageHere>`` replaced by image slots; nothing supervised."""
        from mmgen.data.minigpt5_samples import IMAGE_PLACEHOLDER

        segments: list[Segment] = []
        pieces = source.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            segments.append(Text(self.tokenize(piece, bos=i == 0), supervised=False))
            if i < len(pieces) - 1:
                if self.n_image_tokens <= 0:
                    raise ConfigError(f"a prompt has {IMAGE_PLACEHOLDER} but the model has no visual_encoder")
                segments.append(ImageSlot(self.n_image_tokens))
        return segments

    def target_segments(self, target: str) -> list[Segment]:
        """The target, supervised except [IMG1..6]."""
        masked = set(self.voken_ids[1:-1])
        return [Text([i], supervised=i not in masked) for i in self.tokenize(target, bos=False)]

    def source_of(self, conversation: Sequence) -> tuple[str, list]:
        """A conversation as MiniGPT-5's prompt string and its images: images become
        ``<Img><ImageHere></Img>``; text that does not already hold ``###Human:`` turns is
        wrapped as one turn, and ``###Assistant:`` closes the prompt unless it already does:
        ``###Human: ... ###Assistant:``."""
        from mmgen.data.minigpt5_samples import ASSISTANT, HUMAN, IMAGE_IN_PROMPT

        if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence) or not conversation:
            raise DataError("a conversation is a non-empty list of text and image parts")
        pieces, images = [], []
        for part in conversation:
            if isinstance(part, str):
                pieces.append(part)
            elif is_image(part):
                pieces.append(IMAGE_IN_PROMPT)
                images.append(part)
            else:
                raise DataError(f"a conversation part must be str, ImageRef or PIL image, not {type(part).__name__}")
        text = " ".join(p.strip() for p in pieces if p.strip())
        if HUMAN not in text:
            text = f"{HUMAN} {text}"
        if not text.endswith(ASSISTANT):  # the model answers the last human turn
            text = f"{text} {ASSISTANT}"
        return text, images

    def prompt(self, conversation: Sequence) -> tuple[list[Segment], list]:
        source, images = self.source_of(conversation)
        return self.source_segments(source), images


def pixels_of(images: Sequence, size: int) -> torch.Tensor:
    """Conversation images (PIL or ``ImageRef``) as float RGB in [0, 1], (n, 3, size, size):
    shorter side to ``size`` (bicubic, antialiased), centre crop, as the visual encoders were
    trained (``mmgen.data.images.load_image``)."""
    from mmgen.data.images import center_crop, resize_shorter, to_tensor
    from mmgen.inference.types import ImageRef, image_of

    tensors = []
    for part in images:
        try:
            rgb = image_of(part)
        except (OSError, ValueError) as error:
            where = part.path if isinstance(part, ImageRef) else type(part).__name__
            raise DataError(f"cannot read the conversation image {where}: {error}") from error
        rgb = center_crop(resize_shorter(rgb, size, "bicubic"), size)
        tensors.append(to_tensor(rgb))  # (3, S, S)
    return torch.stack(tensors) if tensors else torch.zeros(0, 3, size, size)
