"""One decoding engine for every method: transformers' ``generate`` with the KV cache, batches of
left-padded prompts, and each method's special tokens as logits processors.

    groups = [TokenGroup(ids=img_ids, states="at", scale_factor=1.3)]
    decoded = decode(llm, inputs_embeds, attention_mask, groups, DecodingOptions(max_new_tokens=32))
    decoded.tokens[row]     the row's new token ids (up to its EOS or stop string)
    decoded.hits[row]       GroupHit(group, start, states (r, hidden)) per completed group, in order

What the methods' special tokens need, and where it is done:

- Greedy or nucleus sampling, temperature, repetition penalty, EOS and stop strings are
  transformers' own processors and stopping criteria (``RepetitionPenaltyLogitsProcessor``,
  ``TemperatureLogitsWarper``, ``TopPLogitsWarper``, ``EosTokenCriteria``,
  ``StopStringCriteria``), run by ``generate``.
- A *token group* (FROMAGe's ``[RET]``, GILL's and MiniGPT-5's ``[IMG0..r-1]``) is handled by
  :class:`SpecialTokenProcessor`: its tokens after the first are never sampled freely; once the
  first is chosen, the rest of the group is forced; the first token's logit gets ``log(factor)``
  added (the reference's ``ret_scale_factor`` / ``gen_scale_factor``, see below). Text goes on
  after a group (the reference implementations stop there).
- The hidden states a method maps to images come from ``generate``'s own outputs
  (``output_hidden_states=True``): the last layer at every step, no second pass over the
  sequence. ``states="at"`` takes the states AT the group's tokens (FROMAGe, GILL: the state of
  a token is computed by the step that feeds it, one step after it was chosen, so a group is only
  started when the token budget leaves that step); ``states="predict"`` takes the states that
  PREDICT them (MiniGPT-5: the position before the first and the group's tokens but the last).
- Prefix tuning: peft's wrapper refuses ``generate(inputs_embeds=...)``. The engine decodes
  through the base model with the adapter's virtual keys/values as the initial cache, and one
  dummy embedding per virtual token in front of the prompt (``generate`` skips as many prompt
  positions as the cache holds, so without them it would drop real prompt tokens); the
  attention mask covers the virtual positions, so positions count on from them as in peft's
  training forward. Tests compare it with a step-by-step decode through peft's own forward.

Scale factors. The reference multiplies the special token's logit by the factor, which makes a
negative logit *less* likely (or takes its absolute value first). Here the factor multiplies the
token's probability instead: ``log(factor)`` is added to its logit, so a factor above 1 always
makes the token more likely and below 1 less likely, whatever the logit's sign (0: never).
It is applied after the temperature and before top-p, i.e. to the distribution that is sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, StopStringCriteria

STATES = ("at", "predict")


@dataclass
class DecodingOptions:
    """How to choose tokens. Defaults: greedy decoding of up to 64 new tokens.

    Args:
        max_new_tokens: Most tokens generated per row, special tokens included.
        do_sample: Sample (with ``temperature`` and ``top_p``) instead of taking the argmax.
        top_p: Nucleus sampling: keep the most likely tokens whose probabilities sum to top_p.
        temperature: Divides the logits before sampling.
        repetition_penalty: Penalises tokens already generated (1.0: off; MiniGPT-5 uses 2.0).
        stop_strings: A row stops once its text ends with one of these (e.g. ``"###"``).
        stop_token_ids: Token ids that end a row besides the tokenizer's EOS.
        seed: Seed of the sampling (None: the global random state).
        logits_processors: Further ``transformers.LogitsProcessor`` objects, applied first
            (before the repetition penalty and the special-token rules), e.g. a bias.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logits_processors: list = field(default_factory=list)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (use do_sample=False for greedy), got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)


@dataclass(frozen=True)
class TokenGroup:
    """Special tokens that stand for one image: the first is chosen by the LLM, the rest forced.

    Args:
        ids: The group's token ids in order (``[RET]``: one; ``[IMG0..7]``: eight).
        states: Which last-layer hidden states to capture: ``"at"`` the tokens (FROMAGe, GILL)
            or ``"predict"`` the tokens (MiniGPT-5).
        scale_factor: Multiplies the probability of the first token (log(factor) added to its
            logit); 1.0 leaves it alone, 0.0 forbids it.
    """

    ids: tuple[int, ...]
    states: str = "at"
    scale_factor: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))
        if not self.ids or len(set(self.ids)) != len(self.ids):
            raise ValueError(f"a token group needs distinct token ids, got {self.ids}")
        if self.states not in STATES:
            raise ValueError(f"states must be one of {STATES}, not {self.states!r}")
        if self.scale_factor < 0:
            raise ValueError(f"scale_factor must be >= 0, got {self.scale_factor}")


@dataclass
class GroupHit:
    """A completed token group in a row's new tokens (or in its prompt)."""

    group: int  # index into the groups given to decode
    start: int  # position of its first token in the row's new tokens (prompt: in the padded prompt)
    states: torch.Tensor  # (r, hidden) last-layer hidden states (see TokenGroup.states)
    in_prompt: bool = False  # the group was given in the prompt (e.g. "a caption [RET]")


@dataclass
class Decoded:
    tokens: list[list[int]]  # per row: the new tokens, up to and including what stopped it
    hits: list[list[GroupHit]]  # per row: completed groups in order
    stopped: list[str]  # per row: "eos", "stop_string" or "length"
    prompt_hits: list[list[GroupHit]] = field(default_factory=list)  # per row: groups in the prompt


class SpecialTokenProcessor(LogitsProcessor):
    """The token-group rules as a ``transformers.LogitsProcessor`` (nothing in transformers forces
    a token depending on the previous one, or scales a probability by a factor).

    ``input_ids`` (b, n) are the tokens generated so far (``generate`` from ``inputs_embeds``
    passes only those); ``scores`` (b, vocab).
    """

    def __init__(self, groups: Sequence[TokenGroup], max_new_tokens: int):
        self.groups = list(groups)
        self.max_new_tokens = max_new_tokens
        firsts = [g.ids[0] for g in self.groups]
        inner = [i for g in self.groups for i in g.ids[1:]]
        if len(set(firsts + inner)) != len(firsts) + len(inner):
            raise ValueError("token groups must not share token ids")
        self.inner = inner
        # token -> the token forced after it, inside a group
        self.follower = {a: b for g in self.groups for a, b in zip(g.ids[:-1], g.ids[1:])}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        n = input_ids.shape[1]
        if self.inner:
            scores[:, self.inner] = float("-inf")  # never sampled freely
        for g in self.groups:
            first = g.ids[0]
            if g.scale_factor != 1.0:  # multiply its probability: + log(factor) on the logit
                scores[:, first] += math.log(g.scale_factor) if g.scale_factor > 0 else float("-inf")
            # Room for the whole group and the step that computes the states at its last token.
            if n + len(g.ids) + 1 > self.max_new_tokens:
                scores[:, first] = float("-inf")
        if n and self.follower:
            last = input_ids[:, -1]  # (b,)
            for token, forced in self.follower.items():
                rows = last == token  # (b,)
                if bool(rows.any()):
                    scores[rows] = float("-inf")
                    scores[rows, forced] = 0.0
        return scores


class _FinishRecorder(StoppingCriteria):
    """Runs the stopping criteria and records, per row, how many tokens it had when it stopped
    (``generate`` pads finished rows but does not say where they ended). Its ``eos_token_id``
    tells ``generate`` to pad finished rows."""

    def __init__(self, criteria: StoppingCriteriaList, eos_token_id: list[int], kinds: list[str]):
        self.criteria = criteria
        self.kinds = kinds
        self.eos_token_id = eos_token_id
        self.finished_at: torch.Tensor | None = None  # (b,) token count at the stop; -1: running
        self.reason: list[str] | None = None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        b, n = input_ids.shape
        if self.finished_at is None:
            self.finished_at = torch.full((b,), -1, dtype=torch.long)
            self.reason = ["length"] * b
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for criterion, kind in zip(self.criteria, self.kinds):
            hit = criterion(input_ids, scores, **kwargs)  # (b,) bool
            new = (hit.cpu() & (self.finished_at < 0)).nonzero().flatten().tolist()
            for row in new:
                self.finished_at[row] = n
                self.reason[row] = kind
            done |= hit
        return done


class _DecodedTailStop(StoppingCriteria):
    """Stop strings for vocabularies transformers' ``StopStringCriteria`` cannot analyse (it
    needs a tokenizer that can spell any string; a word-level vocabulary cannot): decodes the
    last few tokens of each row and compares the text's end."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.window = max(len(s) for s in self.stop_strings)  # every token spells >= 1 character

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        tails = self.tokenizer.batch_decode(input_ids[:, -self.window:].tolist())
        done = [any(t.endswith(s) or (s.strip() and t.rstrip().endswith(s.strip())) for s in self.stop_strings)
                for t in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def stop_string_criteria(tokenizer, stop_strings: list[str]) -> StoppingCriteria:
    """transformers' ``StopStringCriteria`` where it can read the vocabulary, else a decoding one."""
    try:
        return StopStringCriteria(tokenizer, stop_strings)
    except ValueError:  # a vocabulary that cannot spell its probe string (word-level)
        return _DecodedTailStop(tokenizer, stop_strings)


def base_model(llm):
    """The transformers model to call ``generate`` on: the model inside peft's wrapper (LoRA
    layers and trainable token rows are injected into it; prefix tuning's keys come separately)."""
    model = llm.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logits_processors(options: DecodingOptions, groups: Sequence[TokenGroup]) -> LogitsProcessorList:
    """The processors in the order they run: the caller's, repetition penalty, temperature, the
    special-token rules, top-p."""
    processors = LogitsProcessorList(list(options.logits_processors))
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.do_sample and options.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(options.temperature))
    if groups:
        processors.append(SpecialTokenProcessor(groups, options.max_new_tokens))
    if options.do_sample and options.top_p < 1.0:
        processors.append(TopPLogitsWarper(options.top_p))
    return processors


@torch.no_grad()
def decode(
    llm,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    groups: Sequence[TokenGroup] = (),
    options: DecodingOptions | None = None,
    prompt_ids: torch.Tensor | None = None,
) -> Decoded:
    """Continue each left-padded prompt with ``llm`` (an mmgen ``CausalLM``).

    inputs_embeds: (b, t, d) prompt embeddings, padding on the left; attention_mask: (b, t).
    prompt_ids: (b, t) the prompt's token ids (anything negative at image positions): groups
    written in the prompt (FROMAGe's "a caption [RET]") are found there too, with their states
    from the prompt's own forward (``Decoded.prompt_hits``).
    """
    options = options or DecodingOptions()
    options.check()
    if inputs_embeds.ndim != 3 or attention_mask.shape != inputs_embeds.shape[:2]:
        raise ValueError(f"inputs_embeds (b, t, d) and attention_mask (b, t) expected, got "
                         f"{tuple(inputs_embeds.shape)} and {tuple(attention_mask.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (attention_mask[:, -1] all ones): "
                         "SequenceFormat.collate(..., padding_side='left')")
    tokenizer = llm.tokenizer
    model = base_model(llm)
    b = inputs_embeds.shape[0]
    embeds = inputs_embeds.to(model.dtype)
    mask = attention_mask.long()

    # ids from the tokenizer, or from the model's config where it has none (random builds)
    source = tokenizer if tokenizer is not None else model.config
    eos = [t for t in [source.eos_token_id, *options.stop_token_ids] if t is not None]
    criteria, kinds = StoppingCriteriaList(), []
    if eos:
        criteria.append(EosTokenCriteria(eos))
        kinds.append("eos")
    if options.stop_strings:
        if tokenizer is None:
            raise ValueError("stop strings need the LLM's tokenizer")
        criteria.append(stop_string_criteria(tokenizer, list(options.stop_strings)))
        kinds.append("stop_string")
    recorder = _FinishRecorder(criteria, eos, kinds)
    pad_id = source.pad_token_id if source.pad_token_id is not None else (eos[0] if eos else 0)

    extra = {}
    adapter = getattr(llm, "adapter", None)
    prefix = adapter.prefix_cache(llm.model, b) if adapter is not None else None
    if prefix is not None:
        n_virtual = prefix.get_seq_length()
        embeds = torch.cat([embeds.new_zeros(b, n_virtual, embeds.shape[-1]), embeds], dim=1)  # (b, v + t, d)
        mask = torch.cat([mask.new_ones(b, n_virtual), mask], dim=1)  # (b, v + t)
        extra["cache"] = prefix

    if options.do_sample:  # transformers' own warpers off: ours run in logits_processors' order
        extra.update(temperature=1.0, top_p=1.0, top_k=0)
    devices = [embeds.device] if embeds.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=options.seed is not None):
        if options.seed is not None:
            torch.manual_seed(options.seed)
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            repetition_penalty=1.0,
            logits_processor=logits_processors(options, groups),
            stopping_criteria=StoppingCriteriaList([recorder]),
            eos_token_id=eos or None,
            pad_token_id=pad_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_hidden_states=bool(groups),
            **extra,
        )
    sequences = out.sequences  # (b, n) new tokens only (generate from embeddings)
    n = sequences.shape[1]
    states = None
    if groups:
        steps = out.hidden_states  # per step: per layer (b, t_step, hidden); step 0 is the prompt
        # states[:, j]: the last-layer state that predicts new token j (and is AT token j - 1).
        states = torch.cat([steps[0][-1][:, -1:]] + [s[-1] for s in steps[1:]], dim=1)  # (b, n_steps, hidden)

    prompt_hits = [[] for _ in range(b)]
    if groups and prompt_ids is not None:
        prompt_states = steps[0][-1]  # (b, t, hidden): the state AT each prompt position
        for row in range(b):
            prompt_hits[row] = [GroupHit(h.group, h.start, h.states, in_prompt=True) for h in
                                _find_groups(prompt_ids[row].tolist(), groups, prompt_states[row], shift=0)]

    tokens, hits, stopped = [], [], []
    for row in range(b):
        finished = int(recorder.finished_at[row]) if recorder.finished_at is not None else -1
        end = finished if finished >= 0 else n
        row_tokens = sequences[row, :end].tolist()
        tokens.append(row_tokens)
        stopped.append(recorder.reason[row] if finished >= 0 else "length")
        hits.append(_find_groups(row_tokens, groups, states[row] if states is not None else None))
    return Decoded(tokens, hits, stopped, prompt_hits)


def _find_groups(tokens: list[int], groups: Sequence[TokenGroup], states: torch.Tensor | None,
                 shift: int = 1) -> list[GroupHit]:
    """Completed groups in ``tokens`` with their states. ``states`` (n, hidden): with
    ``shift=1`` states[j] is the state AT token j - 1 (generated tokens: it predicts token j);
    with ``shift=0`` the state AT token j (a prompt's forward)."""
    hits, i = [], 0
    while i < len(tokens):
        for g_index, g in enumerate(groups):
            r = len(g.ids)
            if tokens[i] == g.ids[0] and tuple(tokens[i:i + r]) == g.ids:
                lo = i + shift if g.states == "at" else i + shift - 1
                if states is not None and 0 <= lo and lo + r <= states.shape[0]:
                    hits.append(GroupHit(g_index, i, states[lo:lo + r]))
                i += r - 1
                break
        i += 1
    return hits


def split_text(tokenizer, tokens: list[int], hits: list[GroupHit], groups: Sequence[TokenGroup],
               stop_strings: Sequence[str] = ()) -> list[str | GroupHit]:
    """A row's answer in reading order: text pieces (special tokens and EOS dropped, stripped,
    empty ones left out, a trailing stop string removed) and its group hits."""
    pieces: list[str | GroupHit] = []
    last = 0

    def add_text(ids):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if text:
            pieces.append(text)

    for hit in hits:
        add_text(tokens[last:hit.start])
        pieces.append(hit)
        last = hit.start + len(groups[hit.group].ids)
    add_text(tokens[last:])
    if pieces and isinstance(pieces[-1], str):
        text = pieces[-1]
        for stop in stop_strings:
            if stop and text.endswith(stop.strip() or stop):
                text = text[: len(text) - len(stop.strip() or stop)].rstrip()
                break
        if text:
            pieces[-1] = text
        else:
            pieces.pop()
    return pieces
