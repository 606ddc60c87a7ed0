"""Every method trains a few steps under each precision users ask Lightning for: fp32,
bf16-mixed (autocast; trainable weights stay fp32) and bf16-true (every weight bf16). Components
cast their own inputs, so no method needs to know which one runs."""

from __future__ import annotations

import math

import pytest
import torch

from mmgen.cli import main

CONFIGS = {
    "fromage": ("configs/fromage_tiny.yaml", ["--data.n_train=16", "--data.n_val=0", "--data.batch_size=8"]),
    "gill": ("configs/gill_tiny.yaml", ["--data.n_train=16", "--data.n_val=0", "--data.batch_size=8"]),
    "minigpt5_stage1": ("configs/minigpt5_stage1_tiny.yaml", ["--data.batch_size=4"]),
    "minigpt5_stage2": ("configs/minigpt5_stage2_tiny.yaml", ["--data.batch_size=2", "--model.init_args.init_from=null"]),
}


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_tiny_fit_under_each_precision(tmp_path, method, precision):
    config, data = CONFIGS[method]
    root = [f"--data.root={tmp_path / 'toy'}"] if not method.startswith("minigpt5") else []
    cli = main([
        "fit", "--config", config, f"--trainer.precision={precision}", "--trainer.max_steps=2",
        "--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]", f"--trainer.default_root_dir={tmp_path}",
        *root, *data,
    ])
    assert cli.trainer.global_step == 2
    loss = float(cli.trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss), loss
    trainable = [p for p in cli.model.parameters() if p.requires_grad]
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {p.dtype for p in trainable} == {expected}  # mixed: fp32 master weights
    # the trainer's precision is the one setting: frozen backbones (dtype: auto) follow it
    frozen = {p.dtype for p in cli.model.llm.parameters() if not p.requires_grad}
    assert frozen == {torch.float32 if precision == "32" else torch.bfloat16}


def test_an_explicit_component_dtype_overrides_the_run_precision():
    from mmgen.components.causal_lm import CausalLM
    from mmgen.precision import run_storage_dtype, storage_dtype

    assert run_storage_dtype("bf16-mixed") == torch.bfloat16 and run_storage_dtype("16-true") == torch.float16
    assert run_storage_dtype("32-true") == torch.float32
    auto, fixed = CausalLM(dtype="auto"), CausalLM(dtype="float16")
    for component in (auto, fixed):
        component.follow_run_precision(torch.bfloat16)
    assert (auto.dtype, fixed.dtype) == (torch.bfloat16, torch.float16)
    with pytest.raises(Exception, match="dtype must be one of"):
        storage_dtype("bf16")


def test_a_checkpoint_resumes_or_evaluates_under_another_storage_dtype():
    # the frozen weights' storage is no part of what a checkpoint holds: "float32" (an older
    # default) and "auto" configs load each other's checkpoints; a changed architecture does not
    from mmgen.lightning_cli import _resumable

    assert _resumable("init_args.llm.init_args.dtype")
    assert _resumable("init_args.image_generator.init_args.dtype")
    assert not _resumable("init_args.llm.init_args.config.hidden_size")
