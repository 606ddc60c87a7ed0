"""The memory plan against what training really keeps, at tiny sizes on the CPU.

Activations are checked with autograd's saved-tensor hooks (deterministic: every tensor kept for
backward, by storage); gradients and AdamW state after a real optimizer step; the full-size plan
of a shipped config for its structure (FSDP sharding, checkpointing, precision)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmgen.cli import build_cli, main
from mmgen.memory import (
    GiB, LLMPass, LLMShape, SavedTensors, Setting, fused_attention_stand_in, llm_pass_bytes, memory_plan,
    setting_from_config,
)
from mmgen.summary import dry_run, prepare_as_in_fit
from tests.conftest import TOY_TOKENIZER

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FACTOR = 1.1  # the estimate of what is kept for backward is within this factor of the measured (1-2% at tiny sizes)


def _saved_estimate(plan) -> float:
    return sum(i.bytes for i in plan.items if i.group == "activations")


def _item(plan, name) -> float:
    return sum(i.bytes for i in plan.items if i.name == name)


@pytest.mark.parametrize("family", ["opt", "llama", "llama+lora"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llm_layer_factor_matches_what_autograd_saves(family, dtype):
    from mmgen.components.base import NewToken
    from mmgen.components.causal_lm import CausalLM
    from mmgen.components.lora import LoRA

    width = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128,
                 pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if family == "opt":
        config = dict(model_type="opt", vocab_size=64, word_embed_proj_dim=64, ffn_dim=256, **width)
    else:
        config = dict(model_type="llama", vocab_size=64, intermediate_size=172, num_key_value_heads=4,
                      tie_word_embeddings=False, **width)
    torch.manual_seed(0)
    adapter = LoRA(r=8, alpha=16, dropout=0.05) if family == "llama+lora" else None
    llm = CausalLM(config=config, tokenizer=TOY_TOKENIZER, dtype=dtype, adapter=adapter)
    llm.configure(new_tokens=[NewToken("[X]")])
    llm.train()  # LoRA dropout on
    b, t = 4, 40
    vocab = llm.model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(2, vocab, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    with SavedTensors(llm.parameters()) as saved:
        out = llm(llm.embed(ids), mask, ids)
    out.loss.backward()  # the graph is complete (the new row gets its gradient)
    shape = LLMShape.of(llm)
    assert shape.gated_mlp == family.startswith("llama") and shape.trainable_token_heads == 1
    assert shape.lora_modules_per_layer == (2 if adapter else 0)
    part = llm_pass_bytes(shape, LLMPass("lm", b, t), Setting(precision="32", device="cpu"))
    estimate = part["layers"] + part["head"]
    assert 1 / FACTOR < estimate / saved.bytes < FACTOR, (estimate, saved.bytes)


def _built(config: str, meta: bool):
    cli = build_cli(["--config", str(CONFIGS / config), "--trainer.logger=false"], run=False)
    if meta:
        dry_run(cli.model, cli.trainer)
    else:
        prepare_as_in_fit(cli.model, cli.trainer)
        cli.model.configure_model()
    return cli


def _long_captions(n: int) -> list[str]:  # cut at max_text_length: the plan's (worst) case
    return [" ".join(["a red circle on a blue background"] * 6)] * n


def _step(model, run):
    """One training step as fit runs it, counting what autograd keeps; returns the saved bytes
    and the optimizer (after its step)."""
    from mmgen.methods.optim import build_optimizer

    optimizer = build_optimizer(model, model.optim, 100)["optimizer"]
    model.train()
    with SavedTensors(model.parameters()) as saved:
        loss = run()
    loss.backward()
    optimizer.step()
    return saved.bytes, optimizer


def _check_state(plan, model, optimizer):
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items()
                if k != "step")
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert _item(plan, "gradients") == grads == trainable
    assert _item(plan, "AdamW state") == state == 2 * trainable


def test_fromage_and_gill_plans_match_a_tiny_training_step():
    torch.manual_seed(0)
    for config in ("gill_tiny.yaml", "fromage_tiny.yaml"):
        planned = _built(config, meta=True).model
        model = _built(config, meta=False).model
        b = 6
        images = torch.rand(b, 3, 32, 32)
        captions = _long_captions(b)
        if type(model).__name__ == "GILL":
            run = lambda: model.compute_losses(images, captions, share_text_forward=False)[0]["loss"]  # noqa: E731
        else:
            run = lambda: model.compute_losses(images, captions)[0]["loss"]  # noqa: E731
        saved, optimizer = _step(model, run)
        plan = memory_plan(planned, Setting(precision="32", micro_batch=b, device="cpu"))
        assert 1 / FACTOR < _saved_estimate(plan) / saved < FACTOR, (config, _saved_estimate(plan), saved)
        _check_state(plan, model, optimizer)


@pytest.mark.parametrize("config", ["minigpt5_stage1_tiny.yaml", "minigpt5_stage2_tiny.yaml"])
def test_minigpt5_plan_matches_a_tiny_training_step(config):
    from mmgen.data.interleave import collate
    from mmgen.data.minigpt5_samples import IMAGE_IN_PROMPT, VOKEN_STRING

    torch.manual_seed(0)
    planned = _built(config, meta=True).model
    model = _built(config, meta=False).model
    b, side = 4, model.generator.image_size
    history = f"a red circle {IMAGE_IN_PROMPT} " if model.visual_encoder is not None else "a red circle "
    batch = {
        "sources": [f"###Human: {history}Tell me the next scene with image. ###Assistant:"] * b,
        "targets": [f"a green cross {VOKEN_STRING} ###"] * b, "captions": ["a green cross"] * b,
        "input_images": torch.rand(b if model.visual_encoder is not None else 0, 3, 32, 32),
        "n_input_images": [1 if model.visual_encoder is not None else 0] * b,
        "output_images": torch.rand(b, 3, side, side), "n_output_images": [1] * b,
    }
    sequences = [model.source_segments(s) + model.target_segments(t) for s, t in zip(batch["sources"], batch["targets"])]
    tokens = collate(sequences, 0, "cpu").input_ids.shape[1]
    saved, optimizer = _step(model, lambda: model.compute_losses(batch)["loss"])
    plan = memory_plan(planned, Setting(precision="32", micro_batch=b, tokens=tokens, device="cpu"))
    assert _item(plan, "UNet (LDM loss, gradient to the mapper)") > 0
    assert 1 / FACTOR < _saved_estimate(plan) / saved < FACTOR, (_saved_estimate(plan), saved)
    _check_state(plan, model, optimizer)


def test_full_size_plan_of_a_shipped_config(capsys):
    plan = main(["params", "--config", str(CONFIGS / "gill.yaml"), "--memory"])
    out = capsys.readouterr().out
    assert "Memory plan (estimate)" in out and "estimated peak" in out
    s = plan.setting  # from the config: bf16-mixed, 2 devices (DDP), 100 per device
    assert (s.precision, s.devices, s.strategy, s.micro_batch) == ("bf16-mixed", 2, "ddp", 100)
    frozen = _item(plan, "frozen weights")
    assert abs(frozen - 6.96e9 * 2) < 0.05e9 * 2  # OPT-6.7B + CLIP ViT-L in bf16, read from the model
    assert abs(_item(plan, "AdamW state") - 50.1e6 * 8) < 0.1e6 * 8  # 2 x fp32 per trainable parameter
    assert 20 * GiB < _item(plan, "LLM layers (3 forwards)") < 40 * GiB
    assert 35 * GiB < plan.total < 70 * GiB

    # the same built model under other settings: FSDP shards, checkpointing keeps layer inputs,
    # bf16-true has no fp32 master copies
    cli = build_cli(["--config", str(CONFIGS / "gill.yaml"), "--trainer.logger=false"], run=False)
    dry_run(cli.model, cli.trainer)
    base = setting_from_config(cli.config, cli.datamodule)
    fsdp = memory_plan(cli.model, setting_from_config(cli.config, cli.datamodule, strategy="fsdp", devices=4))
    assert abs(_item(fsdp, "frozen weights") * 4 - frozen) < 1e6
    assert _item(fsdp, "FSDP gathered layers") > 0 and _item(fsdp, "DDP gradient buckets") == 0
    # fsdp_backbones: the LLM's and CLIP's blocks (nearly all frozen weights) shard, the
    # embeddings and everything that trains stay replicated
    blocks = memory_plan(cli.model, setting_from_config(cli.config, cli.datamodule, strategy="fsdp_backbones", devices=4))
    assert frozen / 4 < _item(blocks, "frozen weights") < frozen / 3
    assert _item(blocks, "AdamW state") == pytest.approx(_item(plan, "AdamW state"), rel=1e-3)
    assert _item(blocks, "DDP gradient buckets") > 0
    ckpt = memory_plan(cli.model, setting_from_config(cli.config, cli.datamodule, activation_checkpointing=True))
    assert _item(ckpt, "LLM layers (3 forwards)") < _item(plan, "LLM layers (3 forwards)") / 5
    true = memory_plan(cli.model, setting_from_config(cli.config, cli.datamodule, precision="bf16-true"))
    assert _item(true, "AdamW state") == pytest.approx(_item(plan, "AdamW state") / 2, rel=1e-3)
    assert _item(true, "16-bit working copies (autocast)") == 0
    assert base.micro_batch == 100

    # at full size, the formula against what autograd keeps in an OPT-6.7B forward on the meta
    # device (fused attention stood in, as on a GPU; no autocast: precision 32 with bf16 weights)
    llm = cli.model.llm
    ids = torch.zeros(8, 40, dtype=torch.long, device="meta")
    with fused_attention_stand_in(), SavedTensors(cli.model.parameters()) as saved:
        llm(llm.embed(ids), None, ids)
    part = llm_pass_bytes(LLMShape.of(llm), LLMPass("text", 8, 40), Setting(precision="32"))
    assert 1 / FACTOR < (part["layers"] + part["head"]) / saved.bytes < FACTOR
