"""The GPU benchmark script runs (tiny size, CPU, in-process) and reports every column."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_gpu  # noqa: E402


def test_tiny_run_on_cpu_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench_gpu.main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0",
                           "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| method | variant | micro-batch | step s | samples/s | TFLOP/step | MFU | peak GiB |" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["preset"] == "tiny" and len(data["rows"]) == len(rows)
    by = {(r["method"], r["variant"]): r for r in rows}
    methods = ["fromage", "gill"] + (["minigpt5"] if "minigpt5" not in {r["method"] for r in rows if "skipped" in r} else [])
    for method in methods:
        mmgen, reference = by[method, "mmgen"], by[method, "reference"]
        assert mmgen["step_s"] > 0 and mmgen["samples_per_s"] > 0 and mmgen["flops"] > 0
        assert mmgen["planned_bytes"] > 0  # the memory plan of the same model and batch
        # the reference's whole-matrix masks: AdamW state for every row of the token matrices
        assert reference["optimizer_state_bytes"] > mmgen["optimizer_state_bytes"]
        assert mmgen["mfu"] is None and mmgen["peak_bytes"] is None  # no GPU: not made up
    # GILL's reference runs three LLM forwards per example: more counted work than mmgen's step
    assert by["gill", "reference"]["flops"] > by["gill", "mmgen"]["flops"]


def test_reference_way_is_undone():
    """The reference variant runs on the same model after mmgen's: it leaves the model as it was."""
    model = bench_gpu.build("fromage", "tiny")
    bench_gpu.configure_on(model, "cpu")
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    way = bench_gpu.ReferenceWay(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} > before
    way.close()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before
    assert torch.is_grad_enabled()


def test_frozen_llm_backward_costs_what_its_forward_does():
    """The FLOPs formula of docs/performance.md: a frozen layer's backward computes the gradient
    of its input only, 2 x params x tokens like its forward (not 4, as if its weights trained)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen.components.base import NewToken
    from mmgen.components.causal_lm import CausalLM

    h, f, layers = 64, 256, 2
    llm = CausalLM(config=dict(bench_gpu.TINY_OPT, hidden_size=h, word_embed_proj_dim=h, ffn_dim=f,
                               num_hidden_layers=layers, num_attention_heads=4), tokenizer="mmgen:toy_tokenizer")
    llm.configure(new_tokens=[NewToken("[X]")])
    vocab = llm.model.get_output_embeddings().weight.shape[0]
    b, t = 4, 32
    ids = torch.randint(2, vocab, (b, t))
    with FlopCounterMode(display=False) as forward:
        out = llm(llm.embed(ids), torch.ones(b, t, dtype=torch.long), ids)
    with FlopCounterMode(display=False) as backward:
        out.loss.backward()
    params = layers * (4 * h * h + 2 * h * f) + vocab * h  # the matrix products' weights, LM head included
    attention = 2 * 4 * layers * t * h * b * t  # forward and backward, if the kernel is counted
    # (PyTorch 2.13 has no FLOP formula for the CPU's fused attention: then it counts nothing)
    assert 2 * params * b * t <= forward.get_total_flops() <= 2 * params * b * t + attention
    # backward: 2 x params x tokens for the input gradients, plus the dense gradient of the LM
    # head's merged matrix (the new row trains through it)
    matrix = 2 * vocab * h * b * t
    assert 2 * params * b * t + matrix <= backward.get_total_flops() <= 2 * params * b * t + matrix + 2 * attention
