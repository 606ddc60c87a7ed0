"""MiniGPT-5 method: labels, voken alignment, CFG, losses, stages, stage-2 initialisation, decoding."""

from __future__ import annotations

import pytest
import torch

from mmgen.data.interleave import IGNORE, Text, collate
from mmgen.data.minigpt5_samples import VOKEN_STRING, VOKENS
from mmgen.errors import ConfigError
from mmgen.methods.stages import get_stage

STAGE1 = "configs/minigpt5_stage1_tiny.yaml"




def tiny_model(**overrides):
    from mmgen.cli import build_cli

    args = ["--config", STAGE1, "--trainer.logger=false"] + [f"--model.init_args.{k}={v}" for k, v in overrides.items()]
    model = build_cli(args, run=False).model
    model.configure_model()
    return model


@pytest.fixture
def model():
    return tiny_model()


def _batch(model, n=2):
    g = torch.Generator().manual_seed(0)
    return {
        "sources": ["a red circle on a blue background", "###Human: <Img><ImageHere></Img> show me ###Assistant:"][:n],
        "targets": [f"{VOKEN_STRING} ###", f"a green square {VOKEN_STRING} ###"][:n],
        "captions": ["a red circle on a blue background", "a green square"][:n],
        "input_images": torch.rand(n - 1, 3, 32, 32, generator=g),
        "n_input_images": [0, 1][:n],
        "output_images": torch.rand(n, 3, 32, 32, generator=g),
        "n_output_images": [1] * n,
    }


def test_labels_supervise_img0_img7_and_closing_hashes_only(model):
    seq = collate([model.source_segments("a red circle") + model.target_segments(f"{VOKEN_STRING} ###")], 0)
    ids, labels = seq.input_ids[0].tolist(), seq.labels[0].tolist()
    p = ids.index(model.voken_ids[0])
    assert ids[p:p + 8] == model.voken_ids
    assert labels[p] == ids[p] and labels[p + 7] == ids[p + 7]
    assert labels[p + 1:p + 7] == [IGNORE] * 6
    assert labels[:p] == [IGNORE] * p  # the prompt is not supervised
    assert labels[p + 8:] == ids[p + 8:] and len(ids) > p + 8  # closing ### supervised ...
    assert ids[-1] != model.llm.tokenizer.eos_token_id  # ... and no EOS after it


def test_voken_features_are_the_states_that_predict_the_vokens(model):
    segs = [model.source_segments(s) + model.target_segments(t)
            for s, t in [("a red circle", f"{VOKEN_STRING} ###"), ("a big", f"square {VOKEN_STRING} ###")]]
    seq = collate(segs, 0)
    hidden = torch.randn(*seq.input_ids.shape, 5)
    features = model.voken_features(seq.input_ids, hidden)
    assert features.shape == (2, 8, 5)
    for row in range(2):
        p = seq.input_ids[row].tolist().index(model.voken_ids[0])
        torch.testing.assert_close(features[row], hidden[row, p - 1:p + 7])
        # a causal LM's state at position i predicts token i + 1: these predict [IMG0]..[IMG7]
        assert seq.input_ids[row, p:p + 8].tolist() == model.voken_ids


def test_losses_have_reference_weights_and_cfg_targets(model, monkeypatch):
    model.apply_stage(get_stage("uas"))
    model.stage = get_stage("uas")
    seen = {}
    encode = model.generator.encode_captions

    def record(captions, use_attention_mask=False):
        seen["captions"], seen["mask"] = list(captions), use_attention_mask
        return encode(captions, use_attention_mask)

    monkeypatch.setattr(model.generator, "encode_captions", record)
    losses = model.compute_losses(_batch(model))
    torch.testing.assert_close(losses["loss"], 0.01 * losses["text"] + losses["ldm"] + 0.1 * losses["caption"])
    assert seen["mask"] is True and seen["captions"] == _batch(model)["captions"]

    model.mapper.cfg_drop_prob = 1.0  # every output image dropped: zero features, "" as caption target
    inputs = []
    hook = model.mapper.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
    model.compute_losses(_batch(model))
    hook.remove()
    assert seen["captions"] == ["", ""] and torch.count_nonzero(inputs[0]) == 0

    model.stage = get_stage("mls")  # no caption loss in stage 2
    losses = model.compute_losses(_batch(model))
    assert "caption" not in losses
    torch.testing.assert_close(losses["loss"], 0.01 * losses["text"] + losses["ldm"])


def test_gradients_reach_mapper_and_trainable_llm_parts(model):
    model.apply_stage(get_stage("mls"))
    with torch.no_grad():  # LoRA B starts at zero, so A gets no gradient until B moves
        for p in model.parameter_groups()["adapter"]:
            p.add_(0.01 * torch.randn_like(p))
    model.mapper.cfg_drop_prob = 0.0
    model.compute_losses(_batch(model))["loss"].backward()
    for group in ("adapter", "vokens", "transformer"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameter_groups()[group]), group


def _trainable_groups(model):
    groups = model.parameter_groups()
    return {g for g, ps in groups.items() if ps and all(p.requires_grad for p in ps)}, \
           {g for g, ps in groups.items() if ps and not any(p.requires_grad for p in ps)}


def test_what_trains_in_each_stage(model):
    from mmgen.methods.optim import build_optimizer

    model.apply_stage(get_stage("uas"))
    assert _trainable_groups(model) == ({"vokens", "fc", "transformer", "queries"}, {"adapter"})
    optimizer = build_optimizer(model.parameter_groups(), model.optim, 100)["optimizer"]
    lr_of = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}  # lr is 0 in warmup
    groups = model.parameter_groups()
    assert {lr_of[id(p)] for g in ("fc", "transformer", "queries") for p in groups[g]} == {10 * model.optim.lr}
    assert {lr_of[id(p)] for p in groups["vokens"]} == {model.optim.lr}

    model.apply_stage(get_stage("mls"))
    assert _trainable_groups(model) == ({"adapter", "vokens", "transformer"}, {"fc", "queries"})
    optimizer = build_optimizer(model.parameter_groups(), model.optim, 100)["optimizer"]
    assert {g["initial_lr"] for g in optimizer.param_groups} == {model.optim.lr}
    # LoRA is the whole adapter group: r=8 on q and v of 2 layers of width 32
    assert sum(p.numel() for p in groups["adapter"]) == 2 * 2 * (8 * 32 + 32 * 8)
    # checkpoints keep every group, so a stage-2 checkpoint still has stage 1's fc and queries
    keys = model.trainable_state_keys()
    assert any(k.startswith("mapper.fc.") for k in keys) and "mapper.queries.weight" in keys


def test_stage2_initialises_from_stage1_checkpoint(model, tmp_path):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    state = {k: v for k, v in model.state_dict().items() if k in model.trainable_state_keys()}
    torch.save({"state_dict": state, "epoch": 0}, tmp_path / "stage1.ckpt")
    fresh = tiny_model()
    stage2 = tiny_model(init_from=str(tmp_path / "stage1.ckpt"))
    adapter = {id(p) for p in stage2.parameter_groups()["adapter"]}
    fresh_state = fresh.state_dict()
    for name, p in stage2.named_parameters():
        if name not in state:
            continue
        expected = fresh_state[name] if id(p) in adapter else state[name]  # fresh LoRA, stage-1 rest
        torch.testing.assert_close(p.detach(), expected, msg=name)

    del state["mapper.queries.weight"]
    torch.save({"state_dict": state}, tmp_path / "incomplete.ckpt")
    with pytest.raises(ConfigError, match="missing.*mapper.queries.weight"):
        tiny_model(init_from=str(tmp_path / "incomplete.ckpt"))


def test_decode_feeds_all_vokens_and_matches_training_features(model, monkeypatch):
    from transformers import LogitsProcessor

    from mmgen.inference.engine import DecodingOptions, decode

    tok = model.llm.tokenizer
    word, eos = tok.convert_tokens_to_ids("red"), tok.eos_token_id
    script = [word, model.voken_ids[0]] + [word] * 7 + [eos]  # the forced [IMG1..7] override the 7 words

    class Script(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = torch.full_like(scores, -1e4)
            scores[:, script[min(input_ids.shape[1], len(script) - 1)]] = 0.0
            return scores

    model.eval()
    segments, _ = model.sequence_format().prompt(["a blue square"])
    embeds, mask = model.prompt_inputs([["a blue square"]])
    decoded = decode(model.llm, embeds, mask, model.token_groups(1.0, 1.0),
                     DecodingOptions(max_new_tokens=20, logits_processors=[Script()]))
    ids = decoded.tokens[0]
    assert ids == [word] + model.voken_ids + [eos] and len(decoded.hits[0]) == 1
    features = torch.stack([hit.states for hit in decoded.hits[0]])  # (1, 8, d)
    seq = collate([segments + [Text(ids)]], 0)
    with torch.no_grad():
        out = model.llm(seq.embed(model.llm.embed), seq.attention_mask)
    torch.testing.assert_close(features, model.voken_features(seq.input_ids, out.hidden), atol=1e-5, rtol=1e-4)

    answer = model.answer([["a blue square"]], num_inference_steps=2, seed=0, logits_processors=[Script()])[0]
    assert [type(p).__name__ for p in answer.parts] == ["TextPart", "GeneratedImage"]
    assert answer.images[0].image.size == (32, 32)
    assert all(v not in answer.text for v in VOKENS)


def test_unknown_stage_and_groups_are_errors(model):
    from mmgen.methods.stages import Stage, TrainingStages

    with pytest.raises(ConfigError, match="unknown training stage"):
        TrainingStages(stages=["stage3"])
    with pytest.raises(ConfigError, match="switch_steps"):
        TrainingStages(stages=["uas", "mls"])
    before = model.stage
    with pytest.raises(ConfigError, match=r"names groups \['lm_head'\]"):
        model.apply_stage(Stage("x", ("lm_head",)))
    assert model.stage is before


def test_a_batch_without_output_images_still_reaches_every_trainable_parameter(model):
    """DDP needs a gradient for every trainable parameter in every step, also when no sample of
    the batch asks for an image (the mapper is then unused)."""
    model.apply_stage(get_stage("uas"))
    batch = _batch(model, n=1)
    batch.update(targets=["a red circle ###"], output_images=torch.zeros(0, 3, 32, 32), n_output_images=[0])
    losses = model.compute_losses(batch, train=True)
    losses["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert all(float(p.grad.abs().sum()) == 0 for n, p in trainable if n.startswith("mapper."))
    torch.testing.assert_close(losses["loss"], 0.01 * losses["text"])
