"""The decoding engine: cached = uncached, batch = one by one, adapters, special-token rules,
captured hidden states, stop strings, scale factors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_LLAMA, TINY_OPT, TOY_TOKENIZER, Script
from transformers import LogitsProcessor

from mmgen.inference.engine import (
    DecodingOptions,
    SpecialTokenProcessor,
    TokenGroup,
    decode,
    split_text,
)
from mmgen.methods.formats import GILLFormat, left_pad

IMG = [f"[IMG{i}]" for i in range(3)]


def make_llm(family="opt", adapter=None, seed=0):
    from mmgen.components.causal_lm import CausalLM

    torch.manual_seed(seed)
    llm = CausalLM(config=dict(TINY_OPT if family == "opt" else TINY_LLAMA), tokenizer=TOY_TOKENIZER, adapter=adapter)
    llm.configure(new_tokens=IMG, new_token_init="mean")
    with torch.no_grad():  # trained-looking new rows: generate must feed them, not the originals
        for p in llm.parameter_groups()["tokens"]:
            p.add_(torch.randn_like(p))
    if adapter is not None:  # a trained-looking adapter: its effect must show in the tokens
        with torch.no_grad():
            for p in llm.parameter_groups()["adapter"]:
                p.add_(0.5 * torch.randn_like(p))
    return llm.eval()



def rerun_greedy(llm, ids: torch.Tensor, steps: int) -> list[int]:
    """The references' way: the whole sequence through the training forward at every step
    (peft's own forward: LoRA and prefix tuning included), no cache, one sequence."""
    out = []
    for _ in range(steps):
        embeds = llm.embed(ids)
        logits = llm(embeds, torch.ones_like(ids)).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


PROMPTS = [[1, 5, 9], [1, 7, 8, 12, 20, 3], [1, 11]]


def batch_of(prompts, pad=0):
    t = max(map(len, prompts))
    ids = torch.tensor([[pad] * (t - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_cached_decoding_equals_rerunning_the_sequence(family):
    llm = make_llm(family)
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        decoded = decode(llm, llm.embed(ids), torch.ones_like(ids), options=DecodingOptions(max_new_tokens=8))
        with torch.no_grad():
            assert decoded.tokens[0] == rerun_greedy(llm, ids, 8)[: len(decoded.tokens[0])]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_left_padded_batch_decodes_as_one_by_one(family):
    llm = make_llm(family)
    ids, mask = batch_of(PROMPTS)
    batch = decode(llm, llm.embed(ids), mask, options=DecodingOptions(max_new_tokens=8))
    for row, prompt in enumerate(PROMPTS):
        one = torch.tensor([prompt])
        alone = decode(llm, llm.embed(one), torch.ones_like(one), options=DecodingOptions(max_new_tokens=8))
        assert batch.tokens[row] == alone.tokens[0]


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_adapters_decode_like_a_step_by_step_decode(kind):
    from mmgen.components.lora import LoRA
    from mmgen.components.prefix_tuning import PrefixTuning

    adapter = LoRA(r=4, alpha=8, dropout=0.05) if kind == "lora" else PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=16)
    llm = make_llm("llama", adapter, seed=2)
    ids, mask = batch_of(PROMPTS)
    batch = decode(llm, llm.embed(ids), mask, options=DecodingOptions(max_new_tokens=6))
    base = make_llm("llama", seed=2)  # the same LLM without the adapter
    differs = False
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            reference = rerun_greedy(llm, torch.tensor([prompt]), 6)
            differs |= reference != rerun_greedy(base, torch.tensor([prompt]), 6)
        assert batch.tokens[row] == reference[: len(batch.tokens[row])]
    assert differs  # the adapter changes the tokens, so the equality says something


def test_a_group_is_forced_once_started_and_its_inner_tokens_never_sampled():
    llm = make_llm()
    img = [llm.token_id(t) for t in IMG]
    red = llm.tokenizer.convert_tokens_to_ids("red")

    class PreferImg1(LogitsProcessor):  # the model would pick [IMG1] every step
        def __call__(self, input_ids, scores):
            scores[:, img[1]] += 1e3
            return scores

    ids = torch.tensor([[1, 5, 9]])
    options = DecodingOptions(max_new_tokens=10, logits_processors=[PreferImg1()])
    free = decode(llm, llm.embed(ids), torch.ones_like(ids), [TokenGroup(img)], options)
    tokens = free.tokens[0]
    for i, t in enumerate(tokens):  # [IMG1] / [IMG2] only ever inside a group
        if t in img[1:]:
            assert i > 0 and tokens[i - 1] == img[img.index(t) - 1]

    script = [red, img[0], red, red, red, img[0]]  # the forced [IMG1], [IMG2] override the script
    options = DecodingOptions(max_new_tokens=10, logits_processors=[Script(script)])
    decoded = decode(llm, llm.embed(ids), torch.ones_like(ids), [TokenGroup(img)], options)
    tokens = decoded.tokens[0]
    assert tokens[:6] == [red, *img, red, img[0]][:6]
    assert tokens[5:8] == img  # text continued after the first image, then a second group
    assert [h.start for h in decoded.hits[0]] == [1, 5]


def test_a_group_starts_only_with_room_to_finish_and_capture_it():
    llm = make_llm()
    img = [llm.token_id(t) for t in IMG]
    ids = torch.tensor([[1, 5, 9]])
    group = TokenGroup(img, scale_factor=1e30)  # [IMG0] whenever allowed
    for budget in (3, 4, 5, 9):
        decoded = decode(llm, llm.embed(ids), torch.ones_like(ids), [group], DecodingOptions(max_new_tokens=budget))
        tokens = decoded.tokens[0]
        starts = [i for i, t in enumerate(tokens) if t == img[0]]
        assert all(tokens[s:s + 3] == img and s + 3 < budget for s in starts)  # complete, one step left
        assert len(decoded.hits[0]) == len(starts) == max(0, (budget - 1) // 3)


@pytest.mark.parametrize("kind", [None, "prefix"])
def test_captured_states_are_the_full_forward_states_at_or_before_the_group(kind):
    from mmgen.components.prefix_tuning import PrefixTuning

    adapter = PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=16) if kind else None
    llm = make_llm("llama", adapter)
    img = [llm.token_id(t) for t in IMG]
    red = llm.tokenizer.convert_tokens_to_ids("red")
    prompts = [[1, 5, 9], [1, 7, 8, 12, 20]]
    ids, mask = batch_of(prompts)
    script = [red, red, img[0], None, None, red, red]
    for states in ("at", "predict"):
        decoded = decode(llm, llm.embed(ids), mask, [TokenGroup(img, states=states)],
                         DecodingOptions(max_new_tokens=7, logits_processors=[Script(script)]))
        for row, prompt in enumerate(prompts):
            full = torch.tensor([prompt + decoded.tokens[row]])
            with torch.no_grad():
                hidden = llm(llm.embed(full), torch.ones_like(full)).hidden[0]  # (t, h)
            (hit,) = decoded.hits[row]
            first = len(prompt) + hit.start  # position of [IMG0] in the full sequence
            lo = first if states == "at" else first - 1
            torch.testing.assert_close(hit.states, hidden[lo:lo + 3], atol=1e-5, rtol=1e-4)


def test_scale_factor_multiplies_the_probability_even_for_negative_logits():
    scores = torch.tensor([[-3.0, 1.0, 0.5, -1.0]])  # token 0 opens a group; its logit is negative
    p = scores.softmax(-1)
    for factor in (0.5, 2.0, 10.0):
        scaled = SpecialTokenProcessor([TokenGroup((0,), scale_factor=factor)], 100)(torch.zeros(1, 0, dtype=torch.long), scores)
        q = scaled.softmax(-1)
        # odds against every other token are multiplied by exactly the factor
        torch.testing.assert_close(q[0, 0] / q[0, 1], factor * p[0, 0] / p[0, 1])
        assert (q[0, 0] > p[0, 0]) == (factor > 1)
    # the reference's logit * factor would make this negative logit LESS likely for factor 2:
    assert (scores * torch.tensor([2.0, 1, 1, 1])).softmax(-1)[0, 0] < p[0, 0]
    never = SpecialTokenProcessor([TokenGroup((0,), scale_factor=0.0)], 100)(torch.zeros(1, 0, dtype=torch.long), scores)
    assert never[0, 0] == -math.inf


def test_stop_strings_end_a_row_and_are_left_out_of_the_text():
    llm = make_llm()
    tok = llm.tokenizer
    red, human = tok.convert_tokens_to_ids("red"), tok.convert_tokens_to_ids("###Human:")
    ids, mask = batch_of([[1, 5, 9], [1, 7]])
    script = [red, red, human, red, red, red]
    decoded = decode(llm, llm.embed(ids), mask, options=DecodingOptions(
        max_new_tokens=6, stop_strings=("###Human:",), logits_processors=[Script(script)]))
    assert decoded.tokens == [[red, red, human]] * 2 and decoded.stopped == ["stop_string"] * 2
    assert split_text(tok, decoded.tokens[0], [], [], ("###Human:",)) == ["red red"]
    eos = decode(llm, llm.embed(ids), mask, options=DecodingOptions(
        max_new_tokens=6, logits_processors=[Script([red, tok.eos_token_id, red])]))
    assert eos.tokens == [[red, tok.eos_token_id]] * 2 and eos.stopped == ["eos"] * 2


def test_sampling_is_reproducible_with_a_seed():
    llm = make_llm()
    ids, mask = batch_of(PROMPTS)
    options = dict(max_new_tokens=8, do_sample=True, top_p=0.9, temperature=1.5, repetition_penalty=2.0)
    a = decode(llm, llm.embed(ids), mask, options=DecodingOptions(**options, seed=3))
    b = decode(llm, llm.embed(ids), mask, options=DecodingOptions(**options, seed=3))
    c = decode(llm, llm.embed(ids), mask, options=DecodingOptions(**options, seed=4))
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_bad_inputs_are_refused():
    llm = make_llm()
    ids = torch.tensor([[1, 5, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        decode(llm, llm.embed(ids), torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="top_p"):
        decode(llm, llm.embed(ids), torch.ones_like(ids), options=DecodingOptions(top_p=0))
    with pytest.raises(ValueError, match="distinct"):
        TokenGroup((4, 4))


def test_format_left_padding_keeps_each_row_in_order():
    llm = make_llm()
    fmt = GILLFormat(llm.tokenizer, n_image_tokens=2, img_ids=[llm.token_id(t) for t in IMG])
    segments, images = fmt.prompt(["a red circle", "PIL-free text"])
    assert images == [] and segments[0].ids[0] == llm.tokenizer.bos_token_id
    assert segments[1].ids[:1] != [llm.tokenizer.bos_token_id]  # BOS only before the first text
    right = fmt.collate([[s] for s in segments])
    left = fmt.collate([[s] for s in segments], padding_side="left")
    for r in range(2):
        n = int(right.attention_mask[r].sum())
        assert left.input_ids[r, -n:].tolist() == right.input_ids[r, :n].tolist()
        assert left.attention_mask[r, -n:].all() and not left.attention_mask[r, :-n].any()
    torch.testing.assert_close(left_pad(left).input_ids, left.input_ids)
