"""GILL: the mapper, the image generator, the sequences, the loss forms and the shared forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOY_TOKENIZER, tiny_clip, tiny_llm

from mmgen.components.gill_mapper import GILLMapper
from mmgen.components.retrieval_head import RetrievalHead
from mmgen.components.stable_diffusion import StableDiffusion, tiny_sd_config
from mmgen.components.visual_prefix import LinearVisualPrefix
from mmgen.data.interleave import IGNORE
from mmgen.errors import DataError
from mmgen.methods.gill import GILL, per_token_l2

SD_DIM = 16  # the tiny generator's text-embedding width


def tiny_sd():
    return StableDiffusion(config=tiny_sd_config(text_embed_dim=SD_DIM), tokenizer=TOY_TOKENIZER)


def tiny_mapper():
    return GILLMapper(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32)


def tiny_gill(**kwargs) -> GILL:
    model = GILL(
        llm=tiny_llm(), visual_encoder=tiny_clip(), image_generator=tiny_sd(),
        visual_prefix=LinearVisualPrefix(n_tokens=4), retrieval_head=RetrievalHead(embed_dim=16),
        gen_mapper=tiny_mapper(), **kwargs,
    )
    model.configure_model()
    return model


@pytest.fixture(scope="module")
def gill():
    torch.manual_seed(0)
    return tiny_gill(pack_probability=0.0)


# -- GILLMapper --------------------------------------------------------------------------------
def test_mapper_full_size_structure_and_count():
    mapper = GILLMapper()
    with torch.device("meta"):
        mapper.configure(hidden_dim=4096, out_dim=768)
    assert sum(p.numel() for p in mapper.parameters()) == 31_958_784  # the paper: about 31.96M
    assert mapper.fc.in_features == 4096 and mapper.fc.out_features == 512
    assert mapper.query_embs.shape == (1, 77, 512)
    assert len(mapper.tfm.encoder.layers) == 4 and len(mapper.tfm.decoder.layers) == 4
    layer = mapper.tfm.encoder.layers[0]
    assert layer.self_attn.num_heads == 4 and layer.norm_first and layer.linear1.out_features == 2048
    assert (mapper.model.in_features, mapper.model.out_features) == (512, 768)

    sd2 = GILLMapper()  # SD 2.x: 1024-d targets (the reference asserts 768 and fails)
    with torch.device("meta"):
        sd2.configure(hidden_dim=4096, out_dim=1024)
    assert sd2.model.out_features == 1024


def test_mapper_shapes_and_residual():
    mapper = tiny_mapper()
    mapper.configure(hidden_dim=32, out_dim=24)
    mapper.eval()
    hidden, embeds = torch.randn(3, 8, 32), torch.randn(3, 8, 32)
    out = mapper(hidden, embeds)
    assert out.shape == (3, 77, 24)

    # Residual: the input embeddings are added before fc, exactly.
    with torch.no_grad():
        x = mapper.fc(hidden + embeds)
        expected = mapper.model(mapper.tfm(x, mapper.query_embs.expand(3, -1, -1)))
    torch.testing.assert_close(out, expected)
    mapper.residual_input_embeddings = False
    torch.testing.assert_close(mapper(hidden + embeds, None), out)
    assert not torch.allclose(mapper(hidden, None), out)


# -- the image generator -----------------------------------------------------------------------
def test_stable_diffusion_tiny(captions):
    sd = tiny_sd()
    sd.configure(parts=("text_encoder",))
    assert sd.unet is None and sd.vae is None  # only what was asked for
    emb = sd.encode_captions(captions)
    assert emb.shape == (4, 77, SD_DIM) and sd.text_embed_dim == SD_DIM
    masked = sd.encode_captions(captions, use_attention_mask=True)
    assert not torch.allclose(emb, masked)  # pads are attended to without the mask

    sd.configure()  # adds UNet and VAE
    cond = torch.randn(2, 77, SD_DIM, requires_grad=True)
    loss = sd.ldm_loss(torch.rand(2, 3, 32, 32), cond)
    loss.backward()
    assert loss.ndim == 0 and cond.grad.abs().sum() > 0  # through the frozen UNet
    assert all(p.grad is None and not p.requires_grad for p in sd.parameters())

    images = sd.generate(emb[:2], emb[2:], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize(
    "name, dim", [("runwayml/stable-diffusion-v1-5", 768), ("stabilityai/stable-diffusion-2-1-base", 1024)]
)
def test_stable_diffusion_full_size_on_meta(name, dim):
    from mmgen.components.hub import random_weights_only

    sd = StableDiffusion(name)
    with random_weights_only(), torch.device("meta"):
        sd.configure(parts=("text_encoder",))
    assert sd.text_embed_dim == dim
    assert sum(p.numel() for p in sd.text_encoder.parameters()) == {768: 123_060_480, 1024: 340_387_840}[dim]


# -- sequences ---------------------------------------------------------------------------------
def test_sequences_labels_and_truncation(gill):
    tok, img = gill.llm.tokenizer, gill.img_ids
    ids = [gill.caption_ids("a red circle on a blue background")]
    assert ids[0][0] == tok.bos_token_id

    from mmgen.data.interleave import collate

    cap = collate(gill.caption_sequences(ids, pack=False), 0)
    n = len(ids[0])
    assert cap.labels[0, :4].eq(IGNORE).all()  # visual tokens
    assert cap.labels[0, 4:4 + n].tolist() == ids[0]  # BOS is a target
    assert cap.input_ids[0, 4 + n:].tolist() == img and cap.labels[0, 4 + n:].eq(IGNORE).all()

    txt = collate(gill.text_sequences(ids, pack=False), 0)
    assert txt.input_ids[0].tolist() == ids[0] + img
    assert txt.labels[0].tolist() == ids[0] + img[:1] + [IGNORE] * 7  # [IMG1..7] masked

    long = gill.caption_ids(" ".join(["red"] * 40))
    seq = collate(gill.text_sequences([long], pack=False), 0)
    assert seq.input_ids.shape[1] == 32 and seq.input_ids[0, -8:].tolist() == img


def test_packed_text_sequences(gill, captions):
    from mmgen.data.interleave import collate

    ids = [gill.caption_ids(c) for c in captions[:2]]
    packed = collate(gill.text_sequences(ids, pack=True), 0)
    a, b = ids
    assert packed.input_ids[0].tolist() == a + gill.img_ids + b[1:] + gill.img_ids  # second BOS dropped
    assert packed.labels[0].tolist() == a + gill.img_ids[:1] + [IGNORE] * (7 + len(b) - 1 + 8)

    # Causal attention: the first example's [IMG] states are the same packed or not.
    single = collate(gill.text_sequences(ids, pack=False), 0)
    with torch.no_grad():
        states = {}
        for name, seq in (("single", single), ("packed", packed)):
            embeds = seq.embed(gill.llm.embed)
            states[name] = gill.img_states(seq, gill.llm(embeds, seq.attention_mask).hidden, embeds)
    assert states["packed"][0].shape == (2, 8, 32)
    torch.testing.assert_close(states["packed"][0][0], states["single"][0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states["packed"][1][1], states["single"][1][1])  # input embeddings


# -- losses ------------------------------------------------------------------------------------
def test_per_token_l2_by_hand():
    pred = torch.zeros(2, 3, 2)
    target = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]], [[6.0, 8.0], [1.0, 0.0], [0.0, 2.0]]])
    # distances: 5, 1, 0 and 10, 1, 2 -> mean 19 / 6; NOT the squared MSE (25+1+0+100+1+4)/12
    torch.testing.assert_close(per_token_l2(pred, target), torch.tensor(19 / 6))
    assert not math.isclose(float(per_token_l2(pred, target)), float(F.mse_loss(pred, target)))


def test_losses_by_hand(gill, captions):
    images = torch.rand(4, 3, 32, 32)
    losses, text_emb, image_emb = gill.compute_losses(images, captions)
    # contrastive: only the image side scaled by exp(logit_scale); mean of t2i and i2t
    logits = text_emb @ (gill.retrieval_head.logit_scale.exp() * image_emb).t()
    target = torch.arange(4)
    by_hand = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(losses["contrastive"], by_hand)
    total = losses["caption"] + 0.5 * losses["ret_lm"] + 0.5 * losses["gen_lm"] + losses["contrastive"] + losses["gen"]
    torch.testing.assert_close(losses["loss"], total)
    # the generation target is the SD text encoder's caption embedding, per-token L2 distance
    h, e = gill.prompt_img_states(captions)
    mapped = gill.gen_mapper(h, e)
    torch.testing.assert_close(losses["gen"], per_token_l2(mapped, gill.image_generator.encode_captions(captions)))


def test_shared_forward_equals_two_forwards(captions):
    torch.manual_seed(0)
    model = tiny_gill(pack_probability=0.0)
    images = torch.rand(4, 3, 32, 32)
    trainable = [p for p in model.parameters() if p.requires_grad]

    shared, _, _ = model.compute_losses(images, captions)
    shared["loss"].backward()
    shared_grads = [p.grad.clone() for p in trainable]
    model.zero_grad()
    two, _, _ = model.compute_losses(images, captions, share_text_forward=False)
    two["loss"].backward()
    for name in shared:
        torch.testing.assert_close(shared[name], two[name], msg=name)
    for a, p in zip(shared_grads, trainable):
        torch.testing.assert_close(a, p.grad)


def test_trainable_parameters(gill):
    keys = gill.trainable_state_keys()
    assert any("trainable_tokens" in k for k in keys)  # the [IMG] rows, through peft
    assert not any(k.startswith(("image_generator.", "visual_encoder.")) for k in keys)
    assert {k.split(".")[0] for k in keys} == {"llm", "visual_prefix", "retrieval_head", "gen_mapper"}
    rows = [p for n, p in gill.named_parameters() if "trainable_tokens" in n]
    assert sum(p.numel() for p in rows) == 8 * 32


def test_cached_embeddings_of_the_wrong_width_fail(gill, captions):
    with pytest.raises(DataError, match="my_cache"):
        gill.compute_losses(torch.rand(4, 3, 32, 32), captions, torch.zeros(4, 77, SD_DIM + 1), cache_name="my_cache")


def test_generate_images(gill):
    images = gill.generate_images(["a red circle on a blue background"], num_inference_steps=2)
    assert images.shape == (1, 3, 32, 32)
