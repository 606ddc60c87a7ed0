"""The official FROMAGe release layout, built at a tiny size with random bf16 values, converted:
every tensor lands where it belongs with equal values; nothing is dropped silently; damaged
files give clear errors and no model."""

import json

import pytest
import torch
import yaml

from conftest import TINY_CLIP_VISION, TINY_OPT, TOY_TOKENIZER
from mmgen.cli import main
from mmgen.convert import convert
from mmgen.errors import ConfigError
from mmgen.pretrained import load_pretrained

D, F, E = TINY_OPT["hidden_size"], TINY_CLIP_VISION["hidden_size"], 16  # LLM, CLIP, shared widths

CONFIG = {
    "class_path": "mmgen.methods.fromage.FROMAGe",
    "init_args": {
        "llm": {"class_path": "mmgen.components.causal_lm.CausalLM",
                "init_args": {"config": dict(TINY_OPT), "tokenizer": TOY_TOKENIZER}},
        "visual_encoder": {"class_path": "mmgen.components.clip_vision.CLIPVisionEncoder",
                           "init_args": {"config": dict(TINY_CLIP_VISION)}},
        "retrieval_head": {"class_path": "mmgen.components.retrieval_head.RetrievalHead", "init_args": {"embed_dim": E}},
    },
}

#: release key -> (shape, mmgen parameter)
LAYOUT = {
    "model.logit_scale": ((), "retrieval_head.logit_scale"),
    "model.visual_embeddings.weight": ((D, F), "visual_prefix.proj.weight"),
    "model.visual_embeddings.bias": ((D,), "visual_prefix.proj.bias"),
    "model.visual_fc.weight": ((E, F), "retrieval_head.image_proj.weight"),
    "model.visual_fc.bias": ((E,), "retrieval_head.image_proj.bias"),
    "model.text_hidden_fcs.0.0.weight": ((E, D), "retrieval_head.text_proj.weight"),
    "model.text_hidden_fcs.0.0.bias": ((E,), "retrieval_head.text_proj.bias"),
}
RET_ROW = "llm.model.base_model.model.model.decoder.embed_tokens.trainable_tokens_delta.default"


def write_release(folder, full_matrix=False, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: torch.randn(shape).to(torch.bfloat16) for key, (shape, _) in LAYOUT.items()}
    if full_matrix:  # the prune script's variant: the whole matrix, [RET] at retrieval_token_idx
        state["model.input_embeddings.weight"] = torch.randn(50, D).to(torch.bfloat16)
    else:
        state["ret_input_embeddings.weight"] = torch.randn(1, D).to(torch.bfloat16)
    state.update(extra)
    torch.save({"state_dict": state}, folder / "pretrained_ckpt.pth.tar")
    args = {"opt_version": "facebook/opt-6.7b", "visual_encoder": "openai/clip-vit-large-patch14",
            "n_visual_tokens": 1, "text_emb_layers": [-1], "shared_emb_dim": E, "retrieval_token_idx": 47}
    (folder / "model_args.json").write_text(json.dumps(args))
    return state


def test_every_tensor_arrives_with_equal_values(tmp_path):
    state = write_release(tmp_path / "release")
    model, conversion = convert("fromage", tmp_path / "release", config=CONFIG)
    params = dict(model.named_parameters())
    for key, (_, target) in LAYOUT.items():
        assert torch.equal(params[target], state[key].float()), key
    assert torch.equal(params[RET_ROW], state["ret_input_embeddings.weight"].float())
    ret = model.llm.embed(torch.tensor([model.ret_id]))  # the row the LLM actually reads
    assert torch.equal(ret, state["ret_input_embeddings.weight"].float())
    assert {k for k, _ in conversion.placed} == set(state) and not conversion.reported


def test_the_full_matrix_variant_gives_its_ret_row(tmp_path):
    state = write_release(tmp_path / "release", full_matrix=True)
    model, conversion = convert("fromage", tmp_path / "release", config=CONFIG)
    matrix = state["model.input_embeddings.weight"]
    assert torch.equal(dict(model.named_parameters())[RET_ROW], matrix[47:48].float())
    assert [k for k, _ in conversion.reported] == ["model.input_embeddings.weight"]  # the other rows: reported


def test_cli_writes_a_pretrained_folder_that_reloads(tmp_path):
    state = write_release(tmp_path / "release")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": CONFIG}))
    with pytest.warns(UserWarning, match="random frozen weights"):  # tiny backbones have no source
        main(["convert", "fromage", "--release", str(tmp_path / "release"), "--config", str(tmp_path / "tiny.yaml"),
              "--out", str(tmp_path / "out")])
    assert "pretrained_ckpt.pth.tar" in (tmp_path / "out" / "README.md").read_text()
    reloaded = dict(load_pretrained(tmp_path / "out").named_parameters())
    for key, (_, target) in LAYOUT.items():
        assert torch.equal(reloaded[target], state[key].float()), key


def test_default_config_comes_from_model_args(tmp_path):
    from mmgen.convert.fromage import default_config, read_model_args

    write_release(tmp_path / "release")
    config = default_config(read_model_args(tmp_path / "release"))
    assert config["init_args"]["llm"]["init_args"]["name_or_path"] == "facebook/opt-6.7b"
    assert config["init_args"]["retrieval_head"]["init_args"]["embed_dim"] == E


def test_unknown_keys_are_an_error_not_dropped(tmp_path):
    write_release(tmp_path / "release", **{"model.surprise": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.raises(ConfigError, match="model.surprise"):
        convert("fromage", tmp_path / "release", config=CONFIG)


def test_backbone_weights_of_an_unpruned_file_are_reported(tmp_path):
    write_release(tmp_path / "release", **{"model.lm.lm_head.weight": torch.zeros(4, D, dtype=torch.bfloat16)})
    _, conversion = convert("fromage", tmp_path / "release", config=CONFIG)
    assert [k for k, _ in conversion.reported] == ["model.lm.lm_head.weight"]


def test_wrong_shape_dtype_or_missing_tensor_names_the_key(tmp_path):
    write_release(tmp_path / "a", **{"model.visual_fc.bias": torch.zeros(E + 1, dtype=torch.bfloat16)})
    with pytest.raises(ConfigError, match=r"model.visual_fc.bias has shape \(17,\)"):
        convert("fromage", tmp_path / "a", config=CONFIG)
    write_release(tmp_path / "b", **{"model.visual_fc.bias": torch.zeros(E, dtype=torch.int64)})
    with pytest.raises(ConfigError, match="model.visual_fc.bias has dtype torch.int64"):
        convert("fromage", tmp_path / "b", config=CONFIG)
    state = write_release(tmp_path / "c")
    state.pop("model.logit_scale")
    torch.save({"state_dict": state}, tmp_path / "c" / "pretrained_ckpt.pth.tar")
    with pytest.raises(ConfigError, match="no value for .*retrieval_head.logit_scale"):
        convert("fromage", tmp_path / "c", config=CONFIG)


def test_a_truncated_file_is_named(tmp_path):
    write_release(tmp_path / "release")
    path = tmp_path / "release" / "pretrained_ckpt.pth.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="pretrained_ckpt.pth.tar: cannot be read"):
        convert("fromage", tmp_path / "release", config=CONFIG)
    (tmp_path / "release" / "model_args.json").write_text('{"opt_version": ')
    with pytest.raises(ConfigError, match="model_args.json: not valid JSON"):
        convert("fromage", tmp_path / "release", config=CONFIG)


# -- the files users have, and the default build ------------------------------------------------------
def test_the_prune_scripts_output_by_file_path(tmp_path):
    """fromage/prune_model_ckpt.py's ckpt_pruned.pth.tar: DataParallel's ``module.`` prefix, the
    whole matrix kept, [RET] as a (d,) vector; --release names the file, --model_args its args."""
    state = write_release(tmp_path / "release", full_matrix=True)
    ret = torch.randn(D).to(torch.bfloat16)
    pruned = {f"module.{k}": v for k, v in state.items()} | {"ret_input_embeddings.weight": ret}
    (tmp_path / "weights").mkdir()
    torch.save({"state_dict": pruned}, tmp_path / "weights" / "ckpt_pruned.pth.tar")
    model, conversion = convert("fromage", tmp_path / "weights" / "ckpt_pruned.pth.tar", config=CONFIG,
                                model_args=tmp_path / "release" / "model_args.json")
    params = dict(model.named_parameters())
    for key, (_, target) in LAYOUT.items():
        assert torch.equal(params[target], state[key].float()), key
    assert torch.equal(model.llm.embed(torch.tensor([model.ret_id])), ret.float().view(1, -1))
    assert [k for k, _ in conversion.reported] == ["model.input_embeddings.weight"]
    # a folder holding only the pruned file finds it by its official name
    (tmp_path / "release" / "pretrained_ckpt.pth.tar").unlink()
    (tmp_path / "weights" / "ckpt_pruned.pth.tar").rename(tmp_path / "release" / "ckpt_pruned.pth.tar")
    _, conversion = convert("fromage", tmp_path / "release", config=CONFIG)
    assert conversion.name.endswith("ckpt_pruned.pth.tar")
    (tmp_path / "release" / "ckpt_pruned.pth.tar").unlink()
    with pytest.raises(ConfigError, match="no weights file .pretrained_ckpt.pth.tar or ckpt_pruned.pth.tar."):
        convert("fromage", tmp_path / "release", config=CONFIG)


def test_the_ret_row_is_found_by_token_not_position(tmp_path):
    """mmgen's vocabulary, like the official one, adds <|image|> (frozen) before [RET]: the
    release's [RET] row lands on the row the LLM reads for [RET]."""
    state = write_release(tmp_path / "release")
    model, _ = convert("fromage", tmp_path / "release", config=CONFIG)
    ret = state["ret_input_embeddings.weight"].float()
    assert torch.equal(model.llm.embed(torch.tensor([model.llm.token_id("[RET]")])), ret)
    image_id = model.llm.token_id("<|image|>")
    assert image_id + 1 == model.llm.token_id("[RET]")  # the official order: <|image|> first
    assert not torch.equal(model.llm.embed(torch.tensor([image_id])), ret)  # keeps its own, frozen row


def test_without_config_float32_and_backbones_from_options():
    from mmgen.convert.fromage import default_config

    args = {"opt_version": "facebook/opt-6.7b", "visual_encoder": "openai/clip-vit-large-patch14"}
    config = default_config(args)["init_args"]
    assert config["llm"]["init_args"] == {"name_or_path": "facebook/opt-6.7b", "dtype": "float32"}
    assert config["visual_encoder"]["init_args"]["dtype"] == "float32"
    config = default_config({}, llm="/models/opt", dtype="bfloat16")["init_args"]
    assert config["llm"]["init_args"] == {"name_or_path": "/models/opt", "dtype": "bfloat16"}
    assert config["visual_encoder"]["init_args"]["name_or_path"] == "openai/clip-vit-large-patch14"


def test_cli_options_override_the_config(tmp_path):
    write_release(tmp_path / "release")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": CONFIG}))
    with pytest.warns(UserWarning, match="random frozen weights"):
        main(["convert", "fromage", "--release", str(tmp_path / "release" / "pretrained_ckpt.pth.tar"), "--config",
              str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "out"), "--dtype", "bfloat16"])
    written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["init_args"]
    assert written["llm"]["init_args"]["dtype"] == "bfloat16" == written["visual_encoder"]["init_args"]["dtype"]
    with pytest.raises(ConfigError, match="fromage: the converter takes no stage1 option"):
        main(["convert", "fromage", "--release", str(tmp_path / "release"), "--out", str(tmp_path / "x"),
              "--stage1", "a.ckpt"])
