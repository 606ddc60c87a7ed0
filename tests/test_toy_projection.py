"""The toy world's Q-Former trains (its query tokens start where BLIP-2's do), and MiniGPT-4's
first stage, the llama_proj MiniGPT-5 loads, learns through the frozen toy LM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmgen.toy import TOY_WORLD_DIR


def test_qformer_starts_with_distinct_queries_and_finite_gradients():
    """At zero (transformers' default) every query is one vector and the Q-Former's first
    LayerNorm (eps 1e-12) makes the first gradient inf: clipping then erased every update."""
    from mmgen.data.toy_tokenizer import build_world_tokenizer
    from mmgen.toy.qformer import build_qformer, itc_logits

    torch.manual_seed(0)
    tokenizer = build_world_tokenizer()
    model = build_qformer(tokenizer)
    assert model.query_tokens.std() > 0.01
    text = tokenizer(["a big red circle in the top left on a black background",
                      "a small blue cross in the center on a gray background"], padding=True, return_tensors="pt")
    logits = itc_logits(model, torch.randn(2, 3, 32, 32), text)
    logits.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from mmgen.data.toy import write_toy_world
    from mmgen.toy.data import caption_pairs

    world = tmp_path_factory.mktemp("world")
    write_toy_world(world, 256, 4, 4, 32, image_size=32, seed=0)
    return caption_pairs(world, "train"), caption_pairs(world, "val")


def test_projection_learns_through_the_frozen_lm_and_loads_as_minigpt4s(pairs, tmp_path: Path):
    from mmgen.components.qformer import QFormerEncoder
    from mmgen.toy.projection import caption_loss, train_projection

    (images, captions), (val_images, val_captions) = pairs
    qformer, llama = TOY_WORLD_DIR / "qformer", TOY_WORLD_DIR / "llama"
    out = tmp_path / "llama_proj.pth"
    result = train_projection(qformer, llama, images, captions, out, steps=40, batch_size=16, log=lambda *_: None)
    assert result["last_loss"] < result["first_loss"]
    # held-out captions read better through it than through the random projection it started as
    assert caption_loss(qformer, llama, val_images, val_captions, out) < \
        caption_loss(qformer, llama, val_images, val_captions, None) - 0.05

    # MiniGPT-4's file layout, read by the component MiniGPT-5 uses
    saved = torch.load(out, weights_only=True)["model"]
    assert set(saved) == {"llama_proj.weight", "llama_proj.bias"}
    encoder = QFormerEncoder(name_or_path=str(qformer), projection=str(out), dtype="float32")
    encoder.configure(embed_dim=saved["llama_proj.weight"].shape[0])
    assert torch.equal(encoder.llama_proj.weight, saved["llama_proj.weight"])


def test_mmgen_names_resolve_in_projection_and_preflight(tmp_path: Path):
    from mmgen.components.qformer import QFormerEncoder
    from mmgen.preflight import model_problems

    encoder = QFormerEncoder(name_or_path="mmgen:toy_world/qformer", projection="mmgen:toy_world/qformer/none.pth")
    assert encoder.projection_path == str(TOY_WORLD_DIR / "qformer" / "none.pth")
    config = {"class_path": "mmgen.components.qformer.QFormerEncoder",
              "init_args": {"name_or_path": "mmgen:toy_world/qformer", "projection": "mmgen:toy_world/qformer/none.pth"}}
    problems = model_problems(config)
    assert len(problems) == 1 and "projection: mmgen:toy_world/qformer/none.pth not found" in problems[0]
