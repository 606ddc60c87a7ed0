"""Every loss term of every method against a second, straightforward implementation of the
published equations, written here without mmgen's sequence, label or loss code.

Each reference below lays out one example's token sequence by hand (as the methods' papers and
official code describe it), runs the language model on it alone (no padding, no batching), sums
the cross-entropy of the positions the description supervises, and divides by their count over
the whole batch (Hugging Face's token mean). Components (projections, mapper, text encoder,
UNet) are called as plain modules: what is checked is how the method uses them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_clip, tiny_llm
from test_gill import tiny_gill

from mmgen.data.minigpt5_samples import VOKEN_STRING
from mmgen.methods.fromage import FROMAGe
from mmgen.methods.stages import get_stage

RTOL, ATOL = 1e-5, 1e-6


def close(actual, expected, name):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def lm_logits_hidden(llm, embeds: torch.Tensor):
    """One unpadded sequence (t, d) through the LM: logits (t, vocab), last hidden (t, h)."""
    out = llm.model(inputs_embeds=embeds[None], output_hidden_states=True)
    return out.logits[0], out.hidden_states[-1][0]


class TokenMeanCE:
    """Cross-entropy summed over supervised targets of many sequences, divided by their count."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, logits: torch.Tensor, targets: dict[int, int]) -> None:
        """``targets``: {position p: token predicted from position p - 1}."""
        for p, token in targets.items():
            self.total = self.total + F.cross_entropy(logits[p - 1], torch.tensor(token))
            self.count += 1

    @property
    def value(self):
        return self.total / self.count


def contrastive_terms(text, image, logit_scale):
    """Only the image side is scaled by exp(logit_scale); t2i over rows, i2t over columns."""
    logits = text @ (logit_scale.exp() * image).t()
    target = torch.arange(text.shape[0])
    return F.cross_entropy(logits, target), F.cross_entropy(logits.t(), target)


# -- FROMAGe -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fromage():
    torch.manual_seed(0)
    model = FROMAGe(tiny_llm("opt"), tiny_clip())
    model.configure_model()
    return model


def fromage_reference(model, images, captions, pack):
    llm, tok, ret = model.llm, model.llm.tokenizer, model.llm.token_id("[RET]")
    E = llm.model.get_input_embeddings()
    pooled = model.visual_encoder(images)  # (b, 1, f): the CLIP pooled vector
    prefix = model.visual_prefix(pooled)  # (b, k, d)
    k = prefix.shape[1]
    caps = [tok(c).input_ids[:23] for c in captions]  # BOS caption, 24 with [RET]

    # Captioning: [v][BOS caption][RET]; targets BOS..caption; [RET] is never a target here.
    cap_ce = TokenMeanCE()
    groups = [(0, 1), (2, 3)] if pack else [(i,) for i in range(len(caps))]
    for group in groups:
        pieces, targets, at = [], {}, 0
        for i in group:  # packed: [v1][BOS cap1][v2][BOS cap2] then both [RET]s
            pieces += [prefix[i], E(torch.tensor(caps[i]))]
            targets.update({at + k + j: t for j, t in enumerate(caps[i])})
            at += k + len(caps[i])
        pieces += [E(torch.tensor([ret]))] * len(group)
        logits, _ = lm_logits_hidden(llm, torch.cat(pieces))
        cap_ce.add(logits, targets)

    # Retrieval mode: [BOS caption [RET]], [RET] a target, its last hidden state the query.
    ret_ce, h_ret = TokenMeanCE(), []
    for ids in caps:
        seq = ids + [ret]
        logits, hidden = lm_logits_hidden(llm, E(torch.tensor(seq)))
        ret_ce.add(logits, {p: seq[p] for p in range(1, len(seq))})
        h_ret.append(hidden[-1])
    text = F.normalize(model.retrieval_head.text_proj(torch.stack(h_ret)), dim=-1)
    image = F.normalize(model.retrieval_head.image_proj(pooled[:, 0]), dim=-1)
    t2i, i2t = contrastive_terms(text, image, model.retrieval_head.logit_scale)
    total = cap_ce.value + ret_ce.value + (t2i + i2t) / 2
    return {"caption": cap_ce.value, "retmode": ret_ce.value, "t2i": t2i, "i2t": i2t, "loss": total}


@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
def test_fromage_losses_match_the_published_equations(fromage, captions, pack):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    losses, _, _ = fromage.compute_losses(images, captions, pack=pack)
    expected = fromage_reference(fromage, images, captions, pack)
    for name, value in expected.items():
        close(losses[name], value, name)


def test_fromage_uses_the_official_vocabulary(fromage):
    tok = fromage.llm.tokenizer
    base = len(tok) - 2
    assert tok.convert_tokens_to_ids(["<|image|>", "[RET]"]) == [base, base + 1]
    assert fromage.llm.new_token_ids == [base + 1]  # only [RET] trains
    assert fromage.llm.model.get_input_embeddings().weight.shape[0] == len(tok)  # softmax rows


# -- GILL ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gill():
    torch.manual_seed(0)
    return tiny_gill(pack_probability=0.0)


def gill_text_mode(model, caps, pack):
    """[BOS caption IMG0..7]: targets caption + [IMG0]; packed pairs (reference): the second
    caption loses its BOS and carries no target at all. Returns CE and, per example in order,
    the hidden states and input embeddings at its 8 [IMG] tokens."""
    llm, img = model.llm, model.img_ids
    E = llm.model.get_input_embeddings()
    ce, states = TokenMeanCE(), []
    groups = [(0, 1), (2, 3)] if pack else [(i,) for i in range(len(caps))]
    for group in groups:
        seq, starts, targets = [], [], {}
        for n, i in enumerate(group):
            text = caps[i] if n == 0 else caps[i][1:]
            if n == 0:
                targets.update({p: text[p] for p in range(1, len(text))})
                targets[len(text)] = img[0]
            seq += text
            starts.append(len(seq))
            seq += img
        embeds = E(torch.tensor(seq))
        logits, hidden = lm_logits_hidden(llm, embeds)
        ce.add(logits, targets)
        states += [(hidden[s : s + 8], embeds[s : s + 8]) for s in starts]
    return ce.value, states


def gill_reference(model, images, captions, pack_caption, pack_ret, pack_gen):
    llm, tok, img = model.llm, model.llm.tokenizer, model.img_ids
    E = llm.model.get_input_embeddings()
    pooled = model.visual_encoder(images)
    prefix = model.visual_prefix(pooled)  # (b, 4, d)
    caps = [tok(c).input_ids[:24] for c in captions]  # 32 with the 8 [IMG] tokens

    # Captioning: [v][BOS caption][IMG0..7], targets BOS..caption; packed: second BOS dropped.
    cap_ce = TokenMeanCE()
    groups = [(0, 1), (2, 3)] if pack_caption else [(i,) for i in range(len(caps))]
    for group in groups:
        pieces, targets, at = [], {}, 0
        for n, i in enumerate(group):
            text = caps[i] if n == 0 else caps[i][1:]
            pieces += [prefix[i], E(torch.tensor(text))]
            targets.update({at + 4 + j: t for j, t in enumerate(text)})
            at += 4 + len(text)
        pieces += [E(torch.tensor(img))] * len(group)
        logits, _ = lm_logits_hidden(llm, torch.cat(pieces))
        cap_ce.add(logits, targets)

    ret_ce, ret_states = gill_text_mode(model, caps, pack_ret)
    gen_ce, gen_states = gill_text_mode(model, caps, pack_gen)
    text = F.normalize(model.retrieval_head.text_proj(torch.stack([h[0] for h, _ in ret_states])), dim=-1)
    image = F.normalize(model.retrieval_head.image_proj(pooled[:, 0]), dim=-1)
    t2i, i2t = contrastive_terms(text, image, model.retrieval_head.logit_scale)
    # Generation: mapper(h[IMG] + e[IMG]) vs SD's caption embedding, per-token L2 (not squared).
    mapped = model.gen_mapper(torch.stack([h for h, _ in gen_states]), torch.stack([e for _, e in gen_states]))
    target = model.image_generator.encode_captions(captions)
    gen = (mapped - target).pow(2).sum(-1).sqrt().mean()
    total = cap_ce.value + 0.5 * ret_ce + 0.5 * gen_ce + (t2i + i2t) / 2 + gen
    return {"caption": cap_ce.value, "ret_lm": ret_ce, "gen_lm": gen_ce, "t2i": t2i,
            "i2t": i2t, "gen": gen, "loss": total}


@pytest.mark.parametrize("coins", [(0, 0, 0), (1, 1, 1), (1, 0, 1), (0, 1, 0)],
                         ids=["unpacked", "packed", "caption+gen", "ret-only"])
def test_gill_losses_match_the_published_equations(gill, captions, coins):
    pack_caption, pack_ret, pack_gen = map(bool, coins)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    losses, _, _ = gill.compute_losses(images, captions, pack_caption=pack_caption, pack_ret=pack_ret,
                                       pack_gen=pack_gen)
    expected = gill_reference(gill, images, captions, pack_caption, pack_ret, pack_gen)
    for name, value in expected.items():
        close(losses[name], value, name)


def test_gill_draws_one_packing_coin_per_mode(captions, monkeypatch):
    model = tiny_gill(pack_probability=0.5)
    seen = []
    monkeypatch.setattr(model, "compute_losses", lambda *a, **kw: (seen.append(kw), ({"loss": torch.zeros(())}, 0, 0))[1])
    monkeypatch.setattr(model, "log_losses", lambda *a, **kw: None)
    batch = {"images": torch.rand(4, 3, 32, 32), "captions": captions}
    for _ in range(64):
        model.training_step(batch, 0)
    draws = {(kw["pack_caption"], kw["pack_ret"], kw["pack_gen"]) for kw in seen}
    assert len(draws) == 8  # the three coins are independent: every combination occurs


def test_gill_uses_the_official_vocabulary(gill):
    tok = gill.llm.tokenizer
    base = len(tok) - 9
    assert tok.convert_tokens_to_ids("<|image|>") == base
    assert gill.img_ids == list(range(base + 1, base + 9))
    assert gill.llm.new_token_ids == gill.img_ids  # <|image|> keeps its frozen row


# -- MiniGPT-5 -----------------------------------------------------------------------------------
def minigpt5(stage: str, adapter=None, with_images: bool = False):
    """A tiny MiniGPT-5 (LLaMA w32, SD w16, Q-Former with 4 queries) in ``stage``."""
    from test_gill import tiny_sd
    from test_minigpt5_components import TINY_BLIP2

    from mmgen.components.qformer import QFormerEncoder
    from mmgen.components.voken_mapper import VokenMapper
    from mmgen.methods.minigpt5 import MiniGPT5

    torch.manual_seed(0)
    model = MiniGPT5(
        llm=tiny_llm("llama", adapter=adapter), generator=tiny_sd(),
        visual_encoder=QFormerEncoder(config=TINY_BLIP2) if with_images else None,
        mapper=VokenMapper(num_heads=2, num_encoder_layers=1, num_decoder_layers=1),
    )
    model.configure_model()
    model.stage = get_stage(stage)
    model.apply_stage(model.stage)
    with torch.no_grad():  # stage 2 starts LoRA at identity: give B weights so the adapter acts
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.eval()  # LoRA dropout off: the only stochastic module of the forward


def minigpt5_reference(model, batch, caption_loss: bool):
    """0.01 * L_text + L_LDM (+ 0.1 * L_cap): the prompt and [IMG1..6] unsupervised, images at
    <ImageHere>, the mapper fed the 8 states that PREDICT [IMG0..7], Min-SNR(5) epsilon loss."""
    llm, tok, gen = model.llm, model.llm.tokenizer, model.generator
    E = llm.model.get_input_embeddings()
    vokens = [tok.convert_tokens_to_ids(f"[IMG{i}]") for i in range(8)]
    here = tok.convert_tokens_to_ids("<ImageHere>")
    input_images = iter(model.visual_encoder(batch["input_images"])) if batch["input_images"].shape[0] else iter(())
    ce, features = TokenMeanCE(), []
    for source, target in zip(batch["sources"], batch["targets"]):
        src = tok(source).input_ids  # the whole prompt tokenised, then split at <ImageHere>
        tgt = tok(target, add_special_tokens=False).input_ids
        pieces, length = [], 0
        for token in src:
            piece = next(input_images) if token == here else E(torch.tensor([token]))
            pieces.append(piece)
            length += piece.shape[0]
        pieces.append(E(torch.tensor(tgt)))
        logits, hidden = lm_logits_hidden(llm, torch.cat(pieces))
        ce.add(logits, {length + j: t for j, t in enumerate(tgt) if t not in vokens[1:7]})
        for j, t in enumerate(tgt):
            if t == vokens[0]:
                features.append(hidden[length + j - 1 : length + j + 7])
    mapped = model.mapper(torch.stack(features))  # (n, 77, d), no CFG dropout in this check

    # The latent diffusion loss, drawing the same random numbers in the same order.
    pixels = batch["output_images"] * 2 - 1
    latents = gen.vae.encode(pixels).latent_dist.sample() * gen.vae.config.scaling_factor
    noise = torch.randn(latents.shape)  # as mmgen draws it: independent of the memory layout
    t = torch.randint(0, gen.scheduler.config.num_train_timesteps, (latents.shape[0],))
    alpha_bar = gen.scheduler.alphas_cumprod[t].float()
    noisy = alpha_bar.sqrt()[:, None, None, None] * latents + (1 - alpha_bar).sqrt()[:, None, None, None] * noise
    pred = gen.unet(noisy, t, encoder_hidden_states=mapped).sample
    snr = alpha_bar / (1 - alpha_bar)
    ldm = (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / snr).mean()
    losses = {"text": ce.value, "ldm": ldm, "loss": 0.01 * ce.value + ldm}
    if caption_loss:
        target = gen.encode_captions(batch["captions"], use_attention_mask=True)
        losses["caption"] = ((mapped - target) ** 2).mean()
        losses["loss"] = losses["loss"] + 0.1 * losses["caption"]
    return losses


def check_minigpt5(model, batch, caption_loss: bool) -> None:
    """Every term of ``model.compute_losses`` against the reference, both drawing the same noise."""
    torch.manual_seed(7)
    losses = model.compute_losses(batch, train=False)
    torch.manual_seed(7)
    expected = minigpt5_reference(model, batch, caption_loss)
    assert set(losses) == set(expected)
    for name, value in expected.items():
        close(losses[name], value, name)


def _images(n, seed):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_minigpt5_stage1_losses_match_the_published_equations():
    model = minigpt5("uas")
    captions = ["a red circle on a blue background", "a green square on a red background"]
    batch = {
        "sources": [captions[0], f"###Human: generate image with caption: {captions[1]} ###Assistant:"],
        "targets": [f"{VOKEN_STRING} ###"] * 2, "captions": captions,
        "input_images": torch.zeros(0, 3, 32, 32), "n_input_images": [0, 0],
        "output_images": _images(2, 2), "n_output_images": [1, 1],
    }
    check_minigpt5(model, batch, caption_loss=True)


def test_minigpt5_stage2_losses_match_the_published_equations():
    from mmgen.components.lora import LoRA

    model = minigpt5("mls", adapter=LoRA(r=8, alpha=16, dropout=0.05), with_images=True)
    story = "###Human: a red circle <Img><ImageHere></Img> a green square <Img><ImageHere></Img>"
    batch = {
        "sources": [f"{story} Tell me the next scene with image. ###Assistant:",
                    f"{story} Tell me the next scene description by this image: <Img><ImageHere></Img> ###Assistant:"],
        "targets": [f"a blue cross on a yellow background . {VOKEN_STRING} ###", "a blue cross . ###"],
        "captions": ["a blue cross on a yellow background", "a blue cross"],
        "input_images": _images(5, 3), "n_input_images": [2, 3],
        "output_images": _images(1, 4), "n_output_images": [1, 0],
    }
    check_minigpt5(model, batch, caption_loss=False)
