"""GILL's caption-embedding cache: round trip, the data module, the CLI command, mismatch errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TOY_TOKENIZER

from mmgen.components.stable_diffusion import StableDiffusion, tiny_sd_config
from mmgen.data.caption_cache import CachedCaptionDataModule, CaptionCache, write_caption_cache
from mmgen.data.toy import ToyCaptionDataModule
from mmgen.errors import DataError


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    generator = StableDiffusion(config=tiny_sd_config(text_embed_dim=16), tokenizer=TOY_TOKENIZER)
    generator.configure(parts=("text_encoder",))
    return generator


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    data = ToyCaptionDataModule(root=str(tmp_path_factory.mktemp("toy")), n_train=20, n_val=6, batch_size=4)
    data.setup("fit")
    return data


def make_cache(sd, captions, out, tsv=None, shard_size=8):
    return write_caption_cache(
        out, captions, sd.encode_captions, generator=sd.identity, text_embed_dim=sd.text_embed_dim,
        tsv=tsv, batch_size=3, shard_size=shard_size,
    )


def test_round_trip_in_shards(sd, toy, tmp_path):
    captions = [r.caption for r in toy.train_dataset.records]
    manifest = json.loads(make_cache(sd, captions, tmp_path / "cache", toy.train_tsv).read_text())
    assert manifest["rows"] == 20 and [s["rows"] for s in manifest["shards"]] == [8, 8, 4]
    assert manifest["text_embed_dim"] == 16 and manifest["max_length"] == 77
    assert np.load(tmp_path / "cache" / manifest["shards"][1]["file"]).dtype == np.float16

    cache = CaptionCache(tmp_path / "cache")
    expected = sd.encode_captions(captions).half()
    torch.testing.assert_close(cache.get(range(20)), expected)
    torch.testing.assert_close(cache.get([9]), expected[9:10])  # second shard
    cache.check(captions, "train.tsv", text_embed_dim=16, generator=sd.identity)


def test_data_module_adds_embeddings(sd, toy, tmp_path):
    captions = [r.caption for r in toy.train_dataset.records]
    make_cache(sd, captions, tmp_path / "train")
    data = CachedCaptionDataModule(toy, train_cache=str(tmp_path / "train"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    plain = next(iter(toy.train_dataloader()))
    assert batch["captions"] == plain["captions"]  # the same order as without the cache
    assert batch["caption_embeddings"].shape == (4, 77, 16)
    torch.testing.assert_close(batch["caption_embeddings"], sd.encode_captions(batch["captions"]).half())
    assert batch["caption_cache"].endswith("manifest.json")
    assert "caption_embeddings" not in next(iter(data.val_dataloader()))  # no val cache given


def test_mismatched_cache_fails_loudly(sd, toy, tmp_path):
    captions = [r.caption for r in toy.train_dataset.records]
    make_cache(sd, captions[:-1], tmp_path / "short")
    with pytest.raises(DataError, match=r"short.*manifest.json.*19 rows.*20 captions"):
        CachedCaptionDataModule(toy, train_cache=str(tmp_path / "short")).setup("fit")

    swapped = captions[1:] + captions[:1]
    make_cache(sd, swapped, tmp_path / "other")
    with pytest.raises(DataError, match=r"other.*other captions"):
        CachedCaptionDataModule(toy, train_cache=str(tmp_path / "other")).setup("fit")

    make_cache(sd, captions, tmp_path / "ok")
    with pytest.raises(DataError, match="made with"):
        CachedCaptionDataModule(toy, train_cache=str(tmp_path / "ok"), generator="runwayml/stable-diffusion-v1-5").setup("fit")
    with pytest.raises(DataError, match="16-d embeddings, the model needs 768-d"):
        CaptionCache(tmp_path / "ok").check(captions, "x", text_embed_dim=768)
    with pytest.raises(DataError, match="mmgen cache-captions"):
        CaptionCache(tmp_path / "missing")


def test_cache_command_and_training_from_the_cache(tmp_path):
    """`mmgen cache-captions` on the tiny config, then a GILL step from the cache without any SD
    weights gives the losses of the step that computes the embeddings."""
    from mmgen.cli import build_cli, main

    root = str(tmp_path / "toy")
    overrides = [f"--data.init_args.root={root}", "--data.init_args.n_train=16", "--data.init_args.n_val=4"]
    manifest = main(["cache-captions", "--config", "configs/gill_tiny.yaml", "--out", str(tmp_path / "c"), *overrides])
    assert json.loads(manifest.read_text())["rows"] == 16

    def model_and_batch(precomputed):
        torch.manual_seed(0)
        cli = build_cli(["--config", "configs/gill_tiny.yaml", "--trainer.logger=false", *overrides,
                         f"--model.init_args.precomputed_captions={precomputed}"], run=False)
        torch.manual_seed(0)
        cli.model.configure_model()
        data = CachedCaptionDataModule(cli.datamodule, train_cache=str(tmp_path / "c"))
        data.setup("fit")
        return cli.model, next(iter(data.train_dataloader()))

    cached_model, batch = model_and_batch(True)
    assert cached_model.image_generator.text_encoder is None  # SD never loaded
    assert not any(True for _ in cached_model.image_generator.parameters())
    from_cache, _, _ = cached_model.compute_losses(batch["images"], batch["captions"], batch["caption_embeddings"])

    live_model, _ = model_and_batch(False)
    live_model.load_state_dict(cached_model.state_dict(), strict=False)
    on_the_fly, _, _ = live_model.compute_losses(batch["images"], batch["captions"])
    for name in from_cache:
        torch.testing.assert_close(from_cache[name], on_the_fly[name], atol=2e-3, rtol=2e-3, msg=name)
