"""The official MiniGPT-5 release layout (fp32 Lightning checkpoints pruned to the trained tensors,
stage 2 with peft LoRA and modules_to_save) at a tiny size with random values: every tensor lands
where it belongs with equal values, and damaged or foreign files are refused by name."""

import pytest
import torch
import yaml

from mmgen.cli import main
from mmgen.convert import convert
from mmgen.data.minigpt5_samples import IMAGE_PLACEHOLDER, VOKENS
from mmgen.errors import ConfigError
from mmgen.pretrained import load_pretrained

CONFIG = yaml.safe_load(open("configs/minigpt5_stage1_tiny.yaml"))["model"]
H, D, LAYERS, R = 32, 32, 2, 8  # LLM width, generator text width, LLM layers, LoRA rank
V = 56  # the toy tokenizer's 47 tokens + [IMG0..7] + <ImageHere>: the reference's new rows are the last 9
LLM = "model.llama_model."
PEFT = LLM + "base_model.model."
ROWS = {"input": "llm.model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default",
        "output": "llm.model.base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models, shared 2-core machine
    yield
    torch.set_num_threads(threads)


def mapper_shapes() -> dict[str, tuple]:
    """The reference's fc / nn.Transformer names at the tiny config's size."""
    from mmgen.components.voken_mapper import VokenMapper

    mapper = VokenMapper(**CONFIG["init_args"]["mapper"]["init_args"])
    mapper.configure(H, D)
    shapes = {f"fc.{k}": tuple(v.shape) for k, v in mapper.fc.state_dict().items()}
    shapes.update({f"llm_to_t2i_mapping.{k}": tuple(v.shape) for k, v in mapper.transformer.state_dict().items()})
    return shapes


def lora_keys(default: bool = True, prefix: str = PEFT) -> dict[str, tuple]:
    name = ".default" if default else ""
    return {f"{prefix}model.layers.{i}.self_attn.{m}_proj.lora_{ab}{name}.weight": (R, H) if ab == "A" else (H, R)
            for i in range(LAYERS) for m in "qv" for ab in "AB"}


def save_ckpt(path, state):
    torch.save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.1.0", "state_dict": state,
                "hyper_parameters": {"learning_rate": 2e-5}}, path)


def write_release(folder, stage2="stage2_vist", default=True, prefix="model.", projection=True, **extra):
    """stage1_cc3m.ckpt (and a stage-2 file): what the reference's on_save_checkpoint keeps."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = mapper_shapes()
    stage1 = {k: torch.randn(s) for k, s in shapes.items()}
    stage1["t2i_decoder_prompt"] = torch.randn(1, 77, D)
    stage1[LLM + "model.embed_tokens.weight"] = torch.randn(V, H)
    stage1[LLM + "lm_head.weight"] = torch.randn(V, H)
    stage1.update(extra)
    save_ckpt(folder / "stage1_cc3m.ckpt", stage1)
    name, stage2 = stage2, None
    if name:
        # fc and t2i_decoder_prompt were frozen in stage 2: not in its file
        peft = prefix + "llama_model.base_model.model."
        stage2 = {k: torch.randn(s) for k, s in shapes.items() if k.startswith("llm_to_t2i_mapping.")}
        stage2[peft + "model.embed_tokens.modules_to_save.default.weight"] = torch.randn(V, H)
        stage2[peft + "lm_head.modules_to_save.default.weight"] = torch.randn(V, H)
        stage2.update({k: torch.randn(s) for k, s in lora_keys(default, peft).items()})
        save_ckpt(folder / f"{name}.ckpt", stage2)
    proj = None
    if projection:  # MiniGPT-4's file, as released (sic)
        proj = {"llama_proj.weight": torch.randn(H, 32), "llama_proj.bias": torch.randn(H)}
        torch.save({"model": proj}, folder / "prerained_minigpt4_7b.pth")
    return stage1, stage2, proj


def new_ids(model):
    return torch.tensor([model.llm.token_id(t) for t in VOKENS + [IMAGE_PLACEHOLDER]])


def test_stage1_every_tensor_arrives_with_equal_values(tmp_path):
    stage1, _, proj = write_release(tmp_path / "release", stage2=None)
    with pytest.warns(UserWarning, match="random frozen weights"):
        model, conversion = convert("minigpt5", tmp_path / "release", tmp_path / "out", config=CONFIG)
    params = dict(model.named_parameters())
    for key, value in stage1.items():
        if key.startswith("fc."):
            assert torch.equal(params["mapper." + key], value), key
        elif key.startswith("llm_to_t2i_mapping."):
            assert torch.equal(params["mapper.transformer." + key.removeprefix("llm_to_t2i_mapping.")], value), key
    assert len([k for k in stage1 if k.startswith("llm_to_t2i_mapping.")]) > 20
    assert torch.equal(params["mapper.queries.weight"], stage1["t2i_decoder_prompt"])
    embed, head = stage1[LLM + "model.embed_tokens.weight"], stage1[LLM + "lm_head.weight"]
    assert torch.equal(params[ROWS["input"]], embed[-9:]) and torch.equal(params[ROWS["output"]], head[-9:])
    assert torch.equal(model.llm.embed(new_ids(model)), embed[-9:])  # the rows the LLM actually reads
    assert {k.split(":", 1)[1] for k, _ in conversion.placed} == set(stage1)
    assert all(n.startswith("llm.") and "lora" in n for n in conversion.fresh) and len(conversion.fresh) == 8
    assert all(not p.any() for n, p in params.items() if "lora_B" in n)  # fresh LoRA: the identity
    # MiniGPT-4's projection: loaded by the Q-Former encoder itself, named in the config
    assert torch.equal(model.visual_encoder.llama_proj.weight, proj["llama_proj.weight"])
    assert "llama_proj.weight" in " ".join(k for k, _ in conversion.reported)

    reloaded = load_pretrained(tmp_path / "out")
    again = dict(reloaded.named_parameters())
    assert torch.equal(again[ROWS["output"]], head[-9:])
    assert torch.equal(again["mapper.queries.weight"], stage1["t2i_decoder_prompt"])
    assert torch.equal(reloaded.visual_encoder.llama_proj.bias, proj["llama_proj.bias"])
    assert "stage1_cc3m.ckpt:fc.0.weight -> mapper.fc.0.weight" in (tmp_path / "out" / "README.md").read_text()


def test_stage2_takes_fc_and_queries_from_stage1_and_the_rest_from_stage2(tmp_path):
    stage1, stage2, _ = write_release(tmp_path / "release", projection=False)
    model, conversion = convert("minigpt5", tmp_path / "release", config=CONFIG, stage="stage2_vist")
    params = dict(model.named_parameters())
    assert torch.equal(params["mapper.fc.2.weight"], stage1["fc.2.weight"])
    assert torch.equal(params["mapper.queries.weight"], stage1["t2i_decoder_prompt"])
    for key, value in stage2.items():
        if key.startswith("llm_to_t2i_mapping."):
            assert torch.equal(params["mapper.transformer." + key.removeprefix("llm_to_t2i_mapping.")], value), key
        elif ".lora_" in key:
            assert torch.equal(params["llm.model." + key.removeprefix(LLM)], value), key
    assert torch.equal(params[ROWS["input"]], stage2[PEFT + "model.embed_tokens.modules_to_save.default.weight"][-9:])
    assert torch.equal(params[ROWS["output"]], stage2[PEFT + "lm_head.modules_to_save.default.weight"][-9:])
    assert not conversion.fresh  # every trained tensor has a source
    placed = {k for k, _ in conversion.placed}
    assert {"stage2_vist.ckpt:" + k for k in stage2} <= placed
    superseded = {k for k, why in conversion.reported if why.startswith("superseded by stage2_vist.ckpt")}
    assert superseded == {"stage1_cc3m.ckpt:" + k for k in stage1 if not k.startswith(("fc.", "t2i_"))}


def test_cli_stage2_with_other_peft_names_and_a_training_config(tmp_path):
    """LoRA names without peft's ``.default``, keys without the Lightning ``model.`` prefix, and
    the stage-2 training config (its init_from is dropped: the release is the initialisation)."""
    _, stage2, proj = write_release(tmp_path / "release", default=False, prefix="")
    with pytest.warns(UserWarning, match="random frozen weights"):
        model, conversion = main(["convert", "minigpt5", "--release", str(tmp_path / "release"), "--out",
                                  str(tmp_path / "out"), "--config", "configs/minigpt5_stage2_tiny.yaml",
                                  "--stage", "stage2_vist"])
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config["init_args"]["init_from"] is None
    assert config["init_args"]["visual_encoder"]["init_args"]["projection"].endswith("prerained_minigpt4_7b.pth")
    reloaded = dict(load_pretrained(tmp_path / "out").named_parameters())
    key = "llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert torch.equal(reloaded["llm.model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"],
                       stage2[key])


def test_unknown_keys_are_an_error_not_dropped(tmp_path):
    write_release(tmp_path / "release", stage2=None, projection=False,
                  **{"model.prefix_encoder.embedding.weight": torch.zeros(5, H), "surprise": torch.zeros(2)})
    with pytest.raises(ConfigError, match="prefix_encoder.*surprise|surprise.*prefix_encoder"):
        convert("minigpt5", tmp_path / "release", config=CONFIG)


def test_wrong_shapes_name_the_key(tmp_path):
    write_release(tmp_path / "release", stage2=None, projection=False, **{"fc.0.weight": torch.zeros(D, H + 1)})
    with pytest.raises(ConfigError, match=r"fc.0.weight has shape \(32, 33\)"):
        convert("minigpt5", tmp_path / "release", config=CONFIG)


def test_a_vocabulary_of_another_tokenizer_is_refused(tmp_path):
    write_release(tmp_path / "release", stage2=None, projection=False,
                  **{LLM + "lm_head.weight": torch.zeros(V + 1, H)})
    with pytest.raises(ConfigError, match=r"lm_head.weight has shape \(57, 32\).*different LLM or tokenizer"):
        convert("minigpt5", tmp_path / "release", config=CONFIG)


def test_truncated_and_missing_files_are_named(tmp_path):
    write_release(tmp_path / "release", projection=False)
    path = tmp_path / "release" / "stage2_vist.ckpt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ConfigError, match="stage2_vist.ckpt: cannot be read"):
        convert("minigpt5", tmp_path / "release", config=CONFIG, stage="stage2_vist")
    with pytest.raises(ConfigError, match="stage2_mmdialog.ckpt: missing"):
        convert("minigpt5", tmp_path / "release", config=CONFIG, stage="stage2_mmdialog")
    with pytest.raises(ConfigError, match="stages are stage1, stage2_mmdialog, stage2_vist"):
        convert("minigpt5", tmp_path / "release", config=CONFIG, stage="stage3")
    (tmp_path / "release" / "stage1_cc3m.ckpt").unlink()
    with pytest.raises(ConfigError, match="stage1_cc3m.ckpt: missing"):
        convert("minigpt5", tmp_path / "release", config=CONFIG, stage="stage2_vist")


def test_projection_file_is_checked_before_building(tmp_path):
    write_release(tmp_path / "release", stage2=None)
    path = tmp_path / "release" / "prerained_minigpt4_7b.pth"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ConfigError, match="prerained_minigpt4_7b.pth: cannot be read"):
        convert("minigpt5", tmp_path / "release", config=CONFIG)
    torch.save({"model": {"other.weight": torch.zeros(1)}}, path)
    with pytest.raises(ConfigError, match="prerained_minigpt4_7b.pth: no llama_proj.weight"):
        convert("minigpt5", tmp_path / "release", config=CONFIG)


class _Scheduler:  # stands for the scheduler object a training checkpoint pickles
    pass


def test_pickled_objects_are_refused_with_an_explanation(tmp_path):
    write_release(tmp_path / "release", stage2=None, projection=False)
    path = tmp_path / "release" / "stage1_cc3m.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "lr_schedulers": [_Scheduler()]}, path)
    with pytest.raises(ConfigError, match="stage1_cc3m.ckpt: cannot be read with torch.load.weights_only=True.: "
                                          "besides tensors it pickles Python objects"):
        convert("minigpt5", tmp_path / "release", config=CONFIG)


def test_stage_option_is_minigpt5_only(tmp_path):
    with pytest.raises(ConfigError, match="fromage: the converter takes no stage option"):
        convert("fromage", tmp_path, stage="stage2_vist")


def test_default_config_is_the_published_model():
    from mmgen.convert.minigpt5 import default_config

    args = default_config("x.pth")["init_args"]
    assert args["llm"]["init_args"]["adapter"]["init_args"]["r"] == 8
    assert args["visual_encoder"]["init_args"]["projection"] == "x.pth"
    assert args["generator"]["init_args"]["name_or_path"] == "stabilityai/stable-diffusion-2-1-base"


# -- the files users have: one checkpoint file, explicit paths, MiniGPT-4's LAVIS files -----------------
def test_release_as_a_stage2_file_finds_stage1_beside_it(tmp_path):
    """As the official --test_weight: the stage-2 checkpoint (it holds LoRA tensors) with
    stage1_cc3m.ckpt in its folder."""
    stage1, stage2, _ = write_release(tmp_path / "release", projection=False)
    model, conversion = convert("minigpt5", tmp_path / "release" / "stage2_vist.ckpt", config=CONFIG)
    params = dict(model.named_parameters())
    assert torch.equal(params["mapper.fc.2.weight"], stage1["fc.2.weight"])
    assert torch.equal(params[ROWS["input"]], stage2[PEFT + "model.embed_tokens.modules_to_save.default.weight"][-9:])
    assert not conversion.fresh
    model, conversion = convert("minigpt5", tmp_path / "release" / "stage1_cc3m.ckpt", config=CONFIG)
    assert len(conversion.fresh) == 8  # a stage-1 file alone: the LoRA stays at its initialisation
    with pytest.raises(ConfigError, match="--release is a checkpoint file"):
        convert("minigpt5", tmp_path / "release" / "stage1_cc3m.ckpt", config=CONFIG, stage="stage2_vist")


def test_stage_files_by_explicit_paths(tmp_path):
    write_release(tmp_path / "a", stage2="stage2_mmdialog", projection=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "stage1_cc3m.ckpt").rename(tmp_path / "b" / "my_stage1.ckpt")
    model, conversion = convert("minigpt5", tmp_path / "a", config=CONFIG, stage1=tmp_path / "b" / "my_stage1.ckpt",
                                stage2=tmp_path / "a" / "stage2_mmdialog.ckpt")
    assert not conversion.fresh
    assert any(k.startswith("my_stage1.ckpt:fc.0.weight") for k, _ in conversion.placed)
    with pytest.raises(ConfigError, match="stage1_cc3m.ckpt: missing"):  # the folder's default name
        convert("minigpt5", tmp_path / "a", config=CONFIG, stage="stage2_mmdialog")


def test_lavis_files_in_the_release_folder_are_named_and_loaded(tmp_path):
    """eva_vit_g.pth and blip2_pretrained_flant5xxl.pth beside the checkpoints: the written config
    names them (QFormerEncoder loads them, frozen), and --dtype sets the frozen backbones' dtype."""
    from test_qformer_lavis import blip2_file, eva_vit_file

    write_release(tmp_path / "release", stage2=None)
    blip2 = blip2_file(w=32, q=32, ffn=64, layers=2, cross=(0,), queries=4)
    torch.save(eva_vit_file(w=32, mlp=64, blocks=3), tmp_path / "release" / "eva_vit_g.pth")
    torch.save({"model": blip2}, tmp_path / "release" / "blip2_pretrained_flant5xxl.pth")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"model": CONFIG}))
    with pytest.warns(UserWarning, match="random frozen weights"):
        model, conversion = main(["convert", "minigpt5", "--release", str(tmp_path / "release"), "--out",
                                  str(tmp_path / "out"), "--config", str(tmp_path / "tiny.yaml"), "--dtype", "bfloat16"])
    encoder = model.visual_encoder
    torch.testing.assert_close(encoder.query_tokens.float(), blip2["query_tokens"].to(torch.bfloat16).float())
    assert encoder.query_tokens.dtype == torch.bfloat16
    assert "eva_vit_g.pth:blocks.2.attn.qkv.weight: not used (ViT block 2" in "\n".join(encoder.load_summary)
    written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["init_args"]
    assert written["visual_encoder"]["init_args"]["lavis_vit"].endswith("release/eva_vit_g.pth")
    assert written["visual_encoder"]["init_args"]["lavis_qformer"].endswith("blip2_pretrained_flant5xxl.pth")
    assert written["llm"]["init_args"]["dtype"] == "bfloat16" and written["visual_encoder"]["init_args"]["dtype"] == "bfloat16"
    assert {k for k, _ in conversion.reported} >= {"eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth"}
    reloaded = load_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.visual_encoder.query_tokens, encoder.query_tokens)


def test_a_named_visual_file_that_does_not_exist_is_refused(tmp_path):
    write_release(tmp_path / "release", stage2=None, projection=False)
    with pytest.raises(ConfigError, match="nowhere.pth: the visual encoder's lavis_vit file does not exist"):
        convert("minigpt5", tmp_path / "release", config=CONFIG, lavis_vit=str(tmp_path / "nowhere.pth"))


def test_without_config_float32_and_the_official_backbones_unless_asked():
    from mmgen.convert.minigpt5 import default_config

    args = default_config()["init_args"]
    assert args["llm"]["init_args"]["name_or_path"] == "Vision-CAIR/vicuna-7b"  # MiniGPT-5's README: Vicuna V0 7B
    assert args["visual_encoder"]["init_args"]["name_or_path"] == "Salesforce/blip2-flan-t5-xxl"
    assert {args[c]["init_args"]["dtype"] for c in ("llm", "visual_encoder", "generator")} == {"float32"}
    args = default_config(llm="/models/vicuna", dtype="bfloat16")["init_args"]
    assert args["llm"]["init_args"]["name_or_path"] == "/models/vicuna"
    assert {args[c]["init_args"]["dtype"] for c in ("llm", "visual_encoder", "generator")} == {"bfloat16"}
    from mmgen.convert import backbone_note  # the summary's first line when built without --config

    assert backbone_note(default_config()).startswith("llm=Vision-CAIR/vicuna-7b (float32), visual_encoder=")
    with pytest.raises(ConfigError, match="--dtype 'fp8'"):
        convert("minigpt5", "nowhere", config=CONFIG, dtype="fp8")
