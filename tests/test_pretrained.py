"""Pretrained folders: save/reload round trip with identical outputs, checks on load, export of a
Lightning checkpoint, and `mmgen fit` started from a folder (init_from)."""

import copy

import pytest
import torch
import yaml

from conftest import TINY_CLIP_VISION, TINY_OPT, TOY_TOKENIZER, tiny_clip, tiny_llm
from mmgen.cli import main
from mmgen.errors import ConfigError
from mmgen.methods.base import MultimodalLM
from mmgen.methods.fromage import FROMAGe
from mmgen.pretrained import build_model, load_pretrained, read_weights, save_pretrained, trained_state


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Tiny OPT and CLIP saved as local folders: configs reference them by path."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_OPT)).save_pretrained(root / "opt")
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)).save_pretrained(root / "clip")
    return root


def fromage_config(backbones):
    return {
        "class_path": "FROMAGe",
        "init_args": {
            "llm": {"class_path": "CausalLM", "init_args": {"name_or_path": str(backbones / "opt"), "tokenizer": TOY_TOKENIZER}},
            "visual_encoder": {"class_path": "CLIPVisionEncoder", "init_args": {"name_or_path": str(backbones / "clip")}},
            "retrieval_head": {"class_path": "RetrievalHead", "init_args": {"embed_dim": 16}},
        },
    }


@pytest.fixture
def trained(backbones):
    """A configured FROMAGe whose trained tensors are not at their initialisation."""
    model = build_model(fromage_config(backbones))
    model.configure_model()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in trained_state(model):
            params[name].add_(torch.randn_like(params[name]))
    return model.eval()


def test_round_trip_gives_identical_outputs(trained, tmp_path, captions):
    trained.save_pretrained(tmp_path / "fromage")
    assert {p.name for p in (tmp_path / "fromage").iterdir()} == {"config.yaml", "model.safetensors", "README.md", "adapter", "tokenizer"}
    assert (tmp_path / "fromage" / "adapter" / "llm" / "adapter_config.json").is_file()
    config = yaml.safe_load((tmp_path / "fromage" / "config.yaml").read_text())
    assert config["class_path"] == "mmgen.methods.fromage.FROMAGe"
    assert config["init_args"]["llm"]["init_args"]["name_or_path"].endswith("opt")  # referenced, not copied
    card = (tmp_path / "fromage" / "README.md").read_text()
    assert "FROMAGe" in card and "opt" in card and "from_pretrained" in card

    reloaded = FROMAGe.from_pretrained(tmp_path / "fromage")
    stored = read_weights(tmp_path / "fromage")
    assert set(stored) == set(trained_state(trained)) == {n for n, p in trained.named_parameters() if p.requires_grad}
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before, text_a, image_a = trained.compute_losses(images, captions)
        after, text_b, image_b = reloaded.compute_losses(images, captions)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    torch.testing.assert_close(text_b, text_a, rtol=0, atol=0)
    # a reloaded model saves again (its config came with it)
    save_pretrained(reloaded, tmp_path / "again")
    assert yaml.safe_load((tmp_path / "again" / "config.yaml").read_text()) == config


def test_a_model_built_in_python_has_no_config_to_save(tmp_path):
    model = FROMAGe(tiny_llm("opt"), tiny_clip())
    model.configure_model()
    with pytest.raises(ConfigError, match="built in Python"):
        model.save_pretrained(tmp_path / "x")


def test_damaged_folders_are_refused_naming_the_file_or_key(trained, tmp_path):
    folder = save_pretrained(trained, tmp_path / "ok")
    weights = folder / "model.safetensors"
    # wrong shape: a clear error naming the key, the model untouched
    state = read_weights(folder)
    from safetensors.torch import save_file

    bad = dict(state, **{"visual_prefix.proj.bias": torch.zeros(3)})
    save_file(bad, str(weights))
    with pytest.raises(ConfigError, match=r"visual_prefix\.proj\.bias has shape \(3,\)"):
        load_pretrained(folder)
    save_file(dict(state, **{"retrieval_head.logit_scale": state["retrieval_head.logit_scale"].half()}), str(weights))
    with pytest.raises(ConfigError, match="logit_scale has dtype torch.float16"):
        load_pretrained(folder)
    save_file(dict(state, extra=torch.zeros(1)), str(weights))
    with pytest.raises(ConfigError, match="unexpected \\['extra'\\]"):
        load_pretrained(folder)
    # truncated file: named, and refused before the model is built
    save_file(state, str(weights))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="model.safetensors.*truncated"):
        load_pretrained(folder)
    with pytest.raises(ConfigError, match="not a pretrained folder"):
        load_pretrained(tmp_path)


def test_export_a_lightning_checkpoint(trained, tmp_path):
    # the checkpoint as MultimodalLM.on_save_checkpoint writes it
    ckpt = {"state_dict": trained_state(trained), "hyper_parameters": dict(trained.hparams), "global_step": 7}
    torch.save(ckpt, tmp_path / "last.ckpt")
    out = main(["export", "--ckpt_path", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "exported")])
    stored = read_weights(out)
    assert set(stored) == set(ckpt["state_dict"])
    for name, tensor in ckpt["state_dict"].items():
        assert torch.equal(stored[name], tensor), name
    assert "global step 7" in (out / "README.md").read_text()
    assert isinstance(MultimodalLM.from_pretrained(out), FROMAGe)

    damaged = copy.deepcopy(ckpt)
    damaged["state_dict"].pop("visual_prefix.proj.weight")
    torch.save(damaged, tmp_path / "damaged.ckpt")
    with pytest.raises(ConfigError, match=r"missing \['visual_prefix.proj.weight'\]"):
        main(["export", "--ckpt_path", str(tmp_path / "damaged.ckpt"), "--out", str(tmp_path / "no")])


def test_fit_starts_from_a_pretrained_folder(tmp_path):
    """`mmgen fit` + init_from: the first step sees the folder's tensors (lr 0 keeps them)."""
    config = yaml.safe_load(open("configs/fromage_tiny.yaml"))["model"]
    model = build_model(config)
    model.configure_model()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    with pytest.warns(UserWarning, match="random frozen weights"):
        save_pretrained(model, tmp_path / "init")
    cli = main([
        "fit", "--config", "configs/fromage_tiny.yaml", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--model.init_args.init_from={tmp_path / 'init'}",
        f"--data.root={tmp_path / 'toy'}", "--data.n_train=16", "--data.n_val=16",
        "--model.init_args.optim.lr=0", "--model.init_args.rescale_new_rows=false",
    ])
    assert cli.trainer.global_step == 1
    for name, tensor in trained_state(model).items():
        assert torch.equal(trained_state(cli.model)[name], tensor), name

    # resuming restores every trained tensor from the checkpoint: init_from is not read, and may be gone
    import shutil

    (ckpt,) = tmp_path.glob("checkpoints/*.ckpt")
    shutil.rmtree(tmp_path / "init")
    resumed = main([
        "fit", "--config", "configs/fromage_tiny.yaml", f"--trainer.default_root_dir={tmp_path / 'resumed'}",
        "--trainer.logger=false", "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0", f"--model.init_args.init_from={tmp_path / 'init'}",
        f"--data.root={tmp_path / 'toy'}", "--data.n_train=16", "--data.n_val=16",
        "--model.init_args.optim.lr=0", "--model.init_args.rescale_new_rows=false", f"--ckpt_path={ckpt}",
    ])
    assert resumed.trainer.global_step == 2
    for name, tensor in trained_state(model).items():
        assert torch.equal(trained_state(resumed.model)[name], tensor), name
