"""What trains is declared once, in a method's ``parameter_groups()``: requires_grad, the
optimizer, the checkpoint key set and the exported folder all follow that one declaration."""

from __future__ import annotations

import torch
from conftest import tiny_clip, tiny_llm

from mmgen.methods.fromage import FROMAGe
from mmgen.methods.optim import Optim, param_groups
from mmgen.methods.trainability import ParamGroup
from mmgen.pretrained import trained_state


class _FROMAGeFixedTemperature(FROMAGe):
    """A research variant: the temperature stays at log(1/0.07), and the visual prefix is
    kept as initialised this run (but still part of the trained model)."""

    def parameter_groups(self):
        groups = super().parameter_groups()
        head = self.retrieval_head
        groups["retrieval_head"] = ParamGroup([p for p in head.parameters() if p is not head.logit_scale])
        groups["visual_prefix"].train = False
        return groups


def _build(cls):
    model = cls(tiny_llm("opt"), tiny_clip(), optim=Optim(weight_decay=0.1))
    model.configure_model()
    return model


def test_one_declaration_drives_grad_optimizer_checkpoint_and_export():
    base, variant = _build(FROMAGe), _build(_FROMAGeFixedTemperature)
    temperature, prefix = "retrieval_head.logit_scale", "visual_prefix.proj.weight"

    # requires_grad
    grads = {n for n, p in variant.named_parameters() if p.requires_grad}
    assert temperature not in grads and prefix not in grads
    assert {temperature, prefix} <= {n for n, p in base.named_parameters() if p.requires_grad}

    # the optimizer
    def optimized(model):
        ids = {id(p) for g in model.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    assert optimized(base) - optimized(variant) == {temperature, prefix, "visual_prefix.proj.bias"}

    # the checkpoint key set: the frozen-this-run prefix is still stored, the temperature is not
    checkpoint = {"state_dict": variant.state_dict(), "hyper_parameters": {}}
    variant.on_save_checkpoint(checkpoint)
    assert prefix in checkpoint["state_dict"] and temperature not in checkpoint["state_dict"]
    assert set(checkpoint["state_dict"]) == variant.trainable_state_keys()

    # the exported folder's tensors (mmgen export / save_pretrained write trained_state)
    assert set(trained_state(variant)) == variant.trainable_state_keys()


def test_weight_decay_only_on_matrices_of_decayed_groups():
    model = _build(FROMAGe)
    decayed = {id(p) for g in param_groups(model.parameter_groups(), Optim(weight_decay=0.1))
               if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"visual_prefix.proj.weight", "retrieval_head.text_proj.weight", "retrieval_head.image_proj.weight"}


def test_a_linear_schedule_without_a_run_length_is_refused():
    import pytest

    from mmgen.errors import ConfigError
    from mmgen.methods.optim import build_optimizer

    model = _build(FROMAGe)
    with pytest.raises(ConfigError, match="total_steps"):
        build_optimizer(model.parameter_groups(), Optim(schedule="linear", warmup_steps=2), 0)


def test_activation_checkpointing_of_the_frozen_llm_keeps_gradients(captions):
    """Recomputing the frozen LLM's activations in the backward pass saves memory; the prefix,
    [RET] row and projections still get the same gradients through it."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = FROMAGe(tiny_llm("opt", gradient_checkpointing=checkpointing), tiny_clip())
        model.configure_model()
        model.train()
        calls = []
        layer = model.llm.model.get_base_model().model.decoder.layers[0].fc1  # inside the checkpoint
        layer.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        losses, _, _ = model.compute_losses(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), captions)
        n_forward = len(calls)
        losses["loss"].backward()
        assert (len(calls) > n_forward) == checkpointing  # recomputed in the backward pass
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, msg=name)
