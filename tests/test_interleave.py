"""Interleaved sequences: layout, labels, image scattering and the reference's packing."""

import pytest
import torch

from mmgen.data.interleave import IGNORE, IMAGE_SLOT, ImageSlot, Text, collate, pack_pairs

BOS, PAD, RET = 1, 0, 9


def test_collate_lays_out_ids_masks_and_labels():
    batch = collate(
        [[ImageSlot(2), Text([BOS, 5, 6]), Text([RET])], [Text([BOS, 7]), Text([8, 8], supervised=False)]],
        pad_id=PAD,
    )
    assert batch.input_ids.tolist() == [[IMAGE_SLOT, IMAGE_SLOT, BOS, 5, 6, RET], [BOS, 7, 8, 8, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE, IGNORE, BOS, 5, 6, RET], [BOS, 7, IGNORE, IGNORE, IGNORE, IGNORE]]


def test_embed_scatters_images_in_order_of_appearance():
    table = torch.nn.Embedding(16, 4)
    batch = collate([[ImageSlot(1), Text([BOS, 5]), ImageSlot(1)], [Text([BOS]), ImageSlot(1)]], pad_id=PAD)
    images = torch.arange(12, dtype=torch.float).view(3, 1, 4) + 100
    embeds = batch.embed(table, images)
    assert torch.equal(embeds[0, 0], images[0, 0])
    assert torch.equal(embeds[0, 3], images[1, 0])
    assert torch.equal(embeds[1, 1], images[2, 0])
    assert torch.equal(embeds[0, 1], table.weight[BOS])
    with pytest.raises(ValueError, match="3 image positions"):
        batch.embed(table, images[:2])


def test_last_position_of_a_token():
    batch = collate([[Text([BOS, RET, 5, RET])], [Text([BOS, RET])]], pad_id=PAD)
    assert batch.last_position_of(RET).tolist() == [3, 1]
    with pytest.raises(ValueError, match="missing"):
        batch.last_position_of(42)


def _heads_and_tails():
    heads = [[ImageSlot(1), Text([BOS, 10 + i, 20 + i])] for i in range(3)]
    tails = [[Text([RET])] for _ in range(3)]
    return heads, tails


def test_fromage_packing_keeps_the_second_bos():
    heads, tails = _heads_and_tails()
    packed = pack_pairs(heads, tails, BOS, keep_second_bos=True)
    assert len(packed) == 2  # (0, 1) packed, 2 alone
    ids = collate(packed, PAD).input_ids[0].tolist()
    assert ids == [IMAGE_SLOT, BOS, 10, 20, IMAGE_SLOT, BOS, 11, 21, RET, RET]
    assert collate(packed, PAD).input_ids[1].tolist()[:5] == [IMAGE_SLOT, BOS, 12, 22, RET]


def test_gill_packing_drops_the_second_bos():
    heads, tails = _heads_and_tails()
    ids = collate(pack_pairs(heads, tails, BOS, keep_second_bos=False), PAD).input_ids[0].tolist()
    assert ids == [IMAGE_SLOT, BOS, 10, 20, IMAGE_SLOT, 11, 21, RET, RET]
