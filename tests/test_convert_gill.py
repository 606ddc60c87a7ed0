"""The official GILL release layout (and its decision model, saved on a GPU) at a tiny size with
random bf16 values: every tensor lands where it belongs with equal values."""

import json

import pytest
import torch
import yaml

from mmgen.convert import convert
from mmgen.errors import ConfigError
from mmgen.pretrained import load_pretrained

CONFIG = yaml.safe_load(open("configs/gill_tiny.yaml"))["model"]
CONFIG["init_args"]["precomputed_captions"] = True
D, F, E, M, R = 64, 64, 32, 32, 8  # LLM, CLIP, shared, mapper widths; [IMG] tokens
IMG_ROWS = "llm.model.base_model.model.model.decoder.embed_tokens.trainable_tokens_delta.default"


def write_release(folder, decision=True, **extra):
    from mmgen.components.gill_mapper import GILLMapper

    folder.mkdir(parents=True, exist_ok=True)
    shapes = {
        "model.logit_scale": (), "model.visual_embeddings.weight": (4 * D, F), "model.visual_embeddings.bias": (4 * D,),
        "model.visual_fc.weight": (E, F), "model.visual_fc.bias": (E,),
        "model.ret_text_hidden_fcs.0.model.weight": (E, D), "model.ret_text_hidden_fcs.0.model.bias": (E,),
        "model.input_embeddings.weight": (R, D),
    }
    reference = GILLMapper(d_model=M, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128)
    reference.configure(D, 32)  # the reference's module tree gives the gen_text_hidden_fcs.0.* names
    shapes.update({f"model.gen_text_hidden_fcs.0.{k}": tuple(v.shape) for k, v in reference.state_dict().items()})
    state = {k: torch.randn(s).to(torch.bfloat16) for k, s in shapes.items()}
    state.update(extra)
    torch.save({"state_dict": state}, folder / "pretrained_ckpt.pth.tar")
    args = {"opt_version": "facebook/opt-6.7b", "num_tokens": R, "n_visual_tokens": 4, "text_emb_layers": [-1],
            "shared_emb_dim": E, "text_fc_mode": "gill_mapper"}
    (folder / "model_args.json").write_text(json.dumps(args))
    decision_state = {"1.weight": torch.randn(2, D), "1.bias": torch.randn(2)}
    if decision:
        torch.save({"state_dict": decision_state}, folder / "decision_model.pth.tar")
    return state, decision_state


def test_every_tensor_arrives_with_equal_values(tmp_path):
    state, decision_state = write_release(tmp_path / "release")
    with pytest.warns(UserWarning, match="random frozen weights"):
        model, conversion = convert("gill", tmp_path / "release", tmp_path / "out", config=CONFIG)
    params = dict(model.named_parameters())
    mapper_keys = [k for k in state if k.startswith("model.gen_text_hidden_fcs.0.")]
    assert len(mapper_keys) > 20
    for key in mapper_keys:
        assert torch.equal(params["gen_mapper." + key.removeprefix("model.gen_text_hidden_fcs.0.")], state[key].float()), key
    assert torch.equal(params["retrieval_head.text_proj.weight"], state["model.ret_text_hidden_fcs.0.model.weight"].float())
    assert torch.equal(params["visual_prefix.proj.bias"], state["model.visual_embeddings.bias"].float())
    assert torch.equal(params[IMG_ROWS], state["model.input_embeddings.weight"].float())
    assert torch.equal(model.llm.embed(torch.tensor(model.img_ids)), state["model.input_embeddings.weight"].float())
    assert {k for k, _ in conversion.placed} == set(state) | {f"decision_model.pth.tar: {k}" for k in decision_state}
    assert not conversion.reported
    # every trained tensor of the GILL model and its decision module has a source
    assert len(conversion.placed) == len(model.trainable_state_keys()) == len(set(state)) + 2
    assert torch.equal(model.decision_head.head[1].weight, decision_state["1.weight"])

    reloaded = dict(load_pretrained(tmp_path / "out").named_parameters())
    assert torch.equal(reloaded[IMG_ROWS], state["model.input_embeddings.weight"].float())
    assert torch.equal(reloaded["decision_head.head.1.weight"], decision_state["1.weight"])  # one folder
    assert not (tmp_path / "out" / "decision").exists()


def test_release_without_decision_model(tmp_path):
    write_release(tmp_path / "release", decision=False)
    model, conversion = convert("gill", tmp_path / "release", config=CONFIG)
    assert model.decision_head is None and "decision_head" not in model.parameter_groups()


def test_damaged_or_unknown_decision_model_is_refused(tmp_path):
    write_release(tmp_path / "release")
    torch.save({"state_dict": {"2.weight": torch.zeros(2, D)}}, tmp_path / "release" / "decision_model.pth.tar")
    with pytest.raises(ConfigError, match="'2.weight'"):
        convert("gill", tmp_path / "release", config=CONFIG)
    path = tmp_path / "release" / "decision_model.pth.tar"
    torch.save({"state_dict": {"1.weight": torch.zeros(2, D), "1.bias": torch.zeros(2)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="decision_model.pth.tar: cannot be read"):
        convert("gill", tmp_path / "release", config=CONFIG)


def test_wrong_mapper_shape_names_the_key(tmp_path):
    write_release(tmp_path / "release", **{"model.gen_text_hidden_fcs.0.query_embs": torch.zeros(1, 77, M + 1, dtype=torch.bfloat16)})
    with pytest.raises(ConfigError, match=r"query_embs has shape \(1, 77, 33\)"):
        convert("gill", tmp_path / "release", config=CONFIG)


def test_weights_file_and_decision_model_by_path(tmp_path):
    state, decision_state = write_release(tmp_path / "release")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "release" / "decision_model.pth.tar").rename(tmp_path / "elsewhere" / "decision.pth.tar")
    model, conversion = convert("gill", tmp_path / "release" / "pretrained_ckpt.pth.tar", config=CONFIG,
                                decision=tmp_path / "elsewhere" / "decision.pth.tar")
    assert torch.equal(model.decision_head.head[1].weight, decision_state["1.weight"])
    # [IMG0..7] found by token: the rows the LLM reads for them are the release's
    ids = torch.tensor([model.llm.token_id(f"[IMG{i}]") for i in range(R)])
    assert torch.equal(model.llm.embed(ids), state["model.input_embeddings.weight"].float())
    with pytest.raises(ConfigError, match="nowhere.pth.tar: missing"):
        convert("gill", tmp_path / "release", config=CONFIG, decision=tmp_path / "nowhere.pth.tar")


def test_default_config_float32_official_generator():
    from mmgen.convert.gill import default_config

    config = default_config({"opt_version": "facebook/opt-6.7b"})["init_args"]
    assert config["image_generator"]["init_args"] == {"name_or_path": "runwayml/stable-diffusion-v1-5", "dtype": "float32"}
    config = default_config({}, generator="/models/sd15", dtype="float16")["init_args"]
    assert config["image_generator"]["init_args"] == {"name_or_path": "/models/sd15", "dtype": "float16"}
    assert config["llm"]["init_args"]["dtype"] == "float16"
