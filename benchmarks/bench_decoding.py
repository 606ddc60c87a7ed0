"""Decoding benchmark: mmgen's engine (transformers' generate, KV cache, batches) against the
reference implementations' loop, which runs the WHOLE sequence through the LLM again for every
new token (no cache, batch size 1).

    python benchmarks/bench_decoding.py                      # OPT-125M architecture, random weights
    python benchmarks/bench_decoding.py --new-tokens 32 --prompt 16 --repeats 1   # quick

Greedy decoding of ``--new-tokens`` tokens after a ``--prompt``-token prompt given as embeddings
(as every method decodes), EOS suppressed so every row runs to the end, an 8-token [IMG]-like
group registered (hidden states captured, as the methods run it). Prints tokens/s per variant
and the ratios measured in the same run: engine vs re-run loop at batch 1, and engine batch 8
vs engine batch 1 (throughput: new tokens of all rows per second).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import mmgen  # noqa: E402,F401


def build_llm(name: str, dtype: str, device: str):
    from mmgen.components.causal_lm import CausalLM

    llm = CausalLM(name_or_path=name, random_weights=True, dtype=dtype)
    llm.configure()
    return llm.to(device).eval()


class NoEOS:
    """A logits processor that keeps EOS from ending a row (random weights emit it anywhere)."""

    def __init__(self, eos: int):
        self.eos = eos

    def __call__(self, input_ids, scores):
        scores[:, self.eos] = float("-inf")
        return scores


@torch.no_grad()
def rerun_loop(model, embeds: torch.Tensor, new_tokens: int, eos: int) -> list[int]:
    """The references' decoding: every step feeds the whole sequence, no cache; last-layer
    hidden states kept as they keep them."""
    out, states = [], []
    for _ in range(new_tokens):
        result = model(inputs_embeds=embeds, use_cache=False, output_hidden_states=True)
        states.append(result.hidden_states[-1])
        logits = result.logits[:, -1]
        logits[:, eos] = float("-inf")
        token = logits.argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(token))
        embeds = torch.cat([embeds, model.get_input_embeddings()(token)], dim=1)
    return out


def timed(fn, repeats: int, device: str, warm_up: bool = True) -> float:
    """Best wall time of ``repeats`` runs (after one warm-up run)."""
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="facebook/opt-125m", help="bundled architecture (random weights)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmgen.inference.engine import DecodingOptions, TokenGroup, base_model, decode

    torch.manual_seed(0)
    llm = build_llm(args.model, args.dtype, args.device)
    model = base_model(llm)
    eos = model.config.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    group = TokenGroup(tuple(range(vocab - 8, vocab)))  # 8 rarely chosen ids, captured like [IMG0..7]
    options = DecodingOptions(max_new_tokens=args.new_tokens, logits_processors=[NoEOS(eos)])

    ids = torch.randint(3, vocab - 8, (args.batch, args.prompt), device=args.device)
    embeds = llm.embed(ids)  # (B, t, d)
    mask = torch.ones(ids.shape, dtype=torch.long, device=args.device)

    def engine(b):
        return lambda: decode(llm, embeds[:b], mask[:b], [group], options)

    check = decode(llm, embeds[:1], mask[:1], [group], options).tokens[0]
    reference = []

    def rerun():
        reference[:] = rerun_loop(model, embeds[:1], args.new_tokens, eos)

    # The re-run loop is slow (quadratic in length) and runs long enough to need no warm-up: one run.
    t_rerun = timed(rerun, 1, args.device, warm_up=False)
    same = check == reference
    t_one = timed(engine(1), args.repeats, args.device)
    t_batch = timed(engine(args.batch), args.repeats, args.device)
    rows = [
        ("re-run loop (references), batch 1", args.new_tokens / t_rerun),
        ("mmgen engine, batch 1", args.new_tokens / t_one),
        (f"mmgen engine, batch {args.batch}", args.batch * args.new_tokens / t_batch),
    ]
    print(f"{args.model} architecture, random weights ({n_params / 1e6:.0f}M parameters), {args.device}, "
          f"{args.dtype}, {torch.get_num_threads()} threads; prompt {args.prompt} tokens, "
          f"{args.new_tokens} new tokens, greedy")
    print(f"{'variant':<40} {'tokens/s':>10}")
    for name, rate in rows:
        print(f"{name:<40} {rate:>10.1f}")
    print(f"engine / re-run loop (batch 1):          {rows[1][1] / rows[0][1]:>6.1f}x   (goal >= 10x)")
    print(f"engine batch {args.batch} / batch 1 throughput:      {rows[2][1] / rows[1][1]:>6.1f}x   (goal >= 5x)")
    print(f"same greedy tokens as the re-run loop:   {same}")
    return rows, same


if __name__ == "__main__":
    main()
