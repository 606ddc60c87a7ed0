"""Interleaved text/image sequences -> LLM inputs (ids, embeddings, attention mask, labels).

A sequence is a list of segments: ``Text`` (token ids, supervised or not) and ``ImageSlot``
(``n_tokens`` positions to be filled with an image's embeddings). ``collate`` lays a batch of them
out right-padded; ``Interleaved.embed`` embeds the text in one call and scatters the image
embeddings, in order of appearance, into the image positions. Every method builds its inputs this
way (captioning, retrieval, generation prompts, MiniGPT-5 dialogues, inference), so the label
rules live in one place: -100 on image positions, padding and unsupervised text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100  # label of positions that carry no loss (Hugging Face's ignore_index)
IMAGE_SLOT = -1  # input id at image positions, replaced by image embeddings


@dataclass
class Text:
    ids: list[int]
    supervised: bool = True  # labels = ids if True, else IGNORE


@dataclass
class ImageSlot:
    n_tokens: int


Segment = Text | ImageSlot


@dataclass
class Interleaved:
    input_ids: torch.Tensor  # (b, t) token ids; IMAGE_SLOT at image positions; pad_id at padding
    attention_mask: torch.Tensor  # (b, t) 1 on content, 0 on padding
    labels: torch.Tensor  # (b, t) ids where supervised, IGNORE elsewhere

    def embed(self, embed_tokens, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(b, t, d) embeddings: text through ``embed_tokens``, images from ``image_embeds``
        ((n_images, k, d) in order of appearance, row-major over the batch)."""
        is_image = self.input_ids == IMAGE_SLOT
        embeds = embed_tokens(self.input_ids.clamp(min=0))  # (b, t, d)
        n_slots = int(is_image.sum())
        if n_slots == 0:
            return embeds
        if image_embeds is None or image_embeds.shape[0] * image_embeds.shape[1] != n_slots:
            got = None if image_embeds is None else tuple(image_embeds.shape)
            raise ValueError(f"{n_slots} image positions but image embeddings of shape {got}")
        image_embeds = image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds)

    def last_position_of(self, token_id: int) -> torch.Tensor:
        """(b,) index of the last occurrence of ``token_id`` in each row (error if absent)."""
        hits = self.input_ids == token_id
        if not bool(hits.any(dim=1).all()):
            raise ValueError(f"token id {token_id} is missing from a row")
        positions = torch.arange(hits.shape[1], device=hits.device).expand_as(hits)
        return torch.where(hits, positions, -1).amax(dim=1)


def collate(sequences: list[list[Segment]], pad_id: int, device=None) -> Interleaved:
    """Right-padded batch of segment lists."""
    rows = []
    for segments in sequences:
        ids, labels = [], []
        for seg in segments:
            if isinstance(seg, ImageSlot):
                ids += [IMAGE_SLOT] * seg.n_tokens
                labels += [IGNORE] * seg.n_tokens
            else:
                ids += seg.ids
                labels += seg.ids if seg.supervised else [IGNORE] * len(seg.ids)
        rows.append((ids, labels))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(ids)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
    return Interleaved(input_ids.to(device), attention_mask.to(device), labels.to(device))


def pack_pairs(
    heads: list[list[Segment]], tails: list[list[Segment]], bos_id: int, keep_second_bos: bool
) -> list[list[Segment]]:
    """The reference's two-example packing: pairs (0, 1), (2, 3), ... become one sequence each,
    ``head_a + head_b + tail_a + tail_b`` (FROMAGe: head = [image][BOS caption], tail = [RET]).
    The second head's leading BOS is dropped unless ``keep_second_bos`` (FROMAGe keeps it, GILL
    drops it). An odd last example stays alone. Images keep their order of appearance."""
    packed = []
    for i in range(0, len(heads) - 1, 2):
        second = heads[i + 1] if keep_second_bos else _drop_first_bos(heads[i + 1], bos_id)
        packed.append(heads[i] + second + tails[i] + tails[i + 1])
    if len(heads) % 2:
        packed.append(heads[-1] + tails[-1])
    return packed


def _drop_first_bos(segments: list[Segment], bos_id: int) -> list[Segment]:
    """The segments with the BOS that opens their first text removed."""
    for j, seg in enumerate(segments):
        if isinstance(seg, Text):
            if seg.ids[:1] == [bos_id]:
                return segments[:j] + [Text(seg.ids[1:], seg.supervised)] + segments[j + 1 :]
            return segments
    return segments
