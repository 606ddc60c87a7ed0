"""The ``fsdp_backbones`` strategy (mmgen.sharding) on two CPU processes (gloo): the frozen
backbones' transformer blocks are sharded, training computes the same gradients as plain DDP
(LoRA weights inside sharded blocks included), checkpoints hold full trainable tensors that load
without the strategy, and a sharded run resumes from its checkpoint."""

from __future__ import annotations

import pytest
import torch
from test_ddp import fit

from mmgen.sharding import clip_grad_norm, transformer_blocks


def test_blocks_are_found_innermost_first():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=32, hidden_size=16, word_embed_proj_dim=16, ffn_dim=32,
                                     num_hidden_layers=2, num_attention_heads=2))
    blocks = transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["OPTDecoderLayer", "OPTDecoderLayer"]
    assert transformer_blocks(torch.nn.Linear(2, 2)) == []


def test_clip_grad_norm_matches_torch_on_plain_gradients():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    a.grad, b.grad = torch.randn(3, 4) * 10, torch.randn(5) * 10
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    a2.grad, b2.grad = a.grad.clone(), b.grad.clone()
    total = clip_grad_norm([a, b], 1.0)
    expected = torch.nn.utils.clip_grad_norm_([a2, b2], 1.0)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-5, atol=1e-6)


def _llm_block_shards(record: dict) -> dict:
    return {n: s for n, s in record["shards"].items() if n.startswith("llm.")}


def _compare(sharded: list[dict], ddp: list[dict]) -> None:
    for rank in range(2):
        assert sharded[rank]["grads"].keys() == ddp[rank]["grads"].keys()
        for name, grad in ddp[rank]["grads"].items():
            torch.testing.assert_close(sharded[rank]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fromage_sharded_matches_ddp_and_checkpoint_loads_without_it(tmp_path):
    data = [f"--data.root={tmp_path / 'toy'}", "--data.n_train=8", "--data.n_val=4", "--data.batch_size=4",
            "--trainer.max_steps=1", "--trainer.max_epochs=1"]
    ddp = fit(tmp_path, "ddp", "configs/fromage_tiny.yaml", *data)
    sharded = fit(tmp_path, "sharded", "configs/fromage_tiny.yaml", *data, "--trainer.strategy=fsdp_backbones")
    shards = _llm_block_shards(sharded[0])
    assert shards and all(local * 2 == full for local, full in shards.values())  # half a block each
    assert any(n.startswith("visual_encoder.") for n in sharded[0]["shards"])
    _compare(sharded, ddp)

    from mmgen.methods.fromage import FROMAGe

    ckpt = next((tmp_path / "sharded").rglob("last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    model = FROMAGe.load_from_checkpoint(ckpt)  # one process, no strategy
    assert set(state) == model.trainable_state_keys()
    own = model.state_dict()
    for name, tensor in state.items():
        assert type(tensor) is torch.Tensor and tensor.shape == own[name].shape, name


@pytest.mark.parametrize("config", ["configs/minigpt5_stage2_tiny.yaml"])
def test_minigpt5_lora_in_sharded_blocks_matches_ddp_and_resumes(tmp_path, config):
    # batches of one: some processes get a sample without input images while others have some
    # with clipping: its norm then spans sharded (LoRA) and replicated gradients (sharding.clip_grad_norm)
    args = [f"--data.train.init_args.root={tmp_path / 'vist'}", "--data.batch_size=1",
            "--model.init_args.init_from=null", "--trainer.gradient_clip_val=1.0", "--trainer.max_steps=2"]
    ddp = fit(tmp_path, "ddp", config, *args)
    sharded = fit(tmp_path, "sharded", config, *args, "--trainer.strategy=fsdp_backbones")
    assert any("lora_" in n for n in sharded[0]["shards"])  # LoRA is sharded with its block
    _compare(sharded, ddp)

    ckpt = next((tmp_path / "sharded").rglob("last.ckpt"))
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert stored["global_step"] == 2
    resumed = fit(tmp_path, "resumed", config, *args[:-1], "--trainer.max_steps=3",
                  "--trainer.strategy=fsdp_backbones", f"--ckpt_path={ckpt}")
    assert all(r["world_size"] == 2 for r in resumed)
