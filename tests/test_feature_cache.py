"""Feature caches over shards: the same losses with cached CLIP features, caption embeddings and
VAE latent distributions as with the live components (same weights, same batch); caches made by
another component, from other shards or other preprocessing are refused; training from a cache
never runs the encoder; the `mmgen cache-features` command."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from mmgen.cli import build_cli, main
from mmgen.data.feature_cache import FeatureCache, write_feature_cache
from mmgen.data.shards import ShardDataModule, resolve_source
from mmgen.data_commands import cache_recipe
from mmgen.errors import DataError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory) -> Path:
    from mmgen.data.toy import write_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root, 24, 4, 32, 0)
    out = root / "shards"
    main(["shards", "from-tsv", "--tsv", str(root / "train.tsv"), "--image-dir", str(root / "images"),
          "--out", str(out), "--shard-size", "8"])
    return out


def configured(config: str, *overrides: str):
    cli = build_cli(["--config", str(ROOT / "configs" / config), "--trainer.logger=false", *overrides], run=False)
    torch.manual_seed(0)
    cli.model.configure_model()
    return cli.model


def make_cache(kind, model, shards, out, data=None, dtype=torch.float32) -> Path:
    data = data or ShardDataModule(str(shards), image_size=32)
    urls, _, _ = resolve_source(str(shards))
    decode, encode, fingerprint, preprocessing = cache_recipe(kind, model, data, torch.device("cpu"))
    write_feature_cache(out, kind, urls, decode, encode, fingerprint, batch_size=5, dtype=dtype,
                        preprocessing=preprocessing)
    return Path(out)


def first_batch(shards, **kwargs) -> dict:
    data = ShardDataModule(str(shards), batch_size=6, shuffle_buffer=4, seed=1, **kwargs)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_fromage_same_losses_from_cached_clip_features(caption_shards, tmp_path):
    model = configured("fromage_tiny.yaml")
    cache = make_cache("clip", model, caption_shards, tmp_path / "clip")
    live = first_batch(caption_shards, image_size=32)
    cached = first_batch(caption_shards, image_size=32, features=str(cache))
    assert cached["keys"] == live["keys"] and "images" not in cached  # images never decoded
    assert cached["image_features"].shape == (6, 1, model.visual_encoder.feature_dim)
    expected, _, _ = model.compute_losses(live["images"], live["captions"])
    got, _, _ = model.compute_losses(None, cached["captions"], features=model.cached_image_features(cached))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_gill_same_losses_from_cached_features_and_caption_embeddings(caption_shards, tmp_path):
    model = configured("gill_tiny.yaml")
    clip = make_cache("clip", model, caption_shards, tmp_path / "clip")
    captions = make_cache("captions", model, caption_shards, tmp_path / "captions")
    live = first_batch(caption_shards, image_size=32)
    cached = first_batch(caption_shards, image_size=32, features=[str(clip), str(captions)])
    assert cached["caption_embeddings"].shape == (6, 77, model.image_generator.text_embed_dim)
    expected, _, _ = model.compute_losses(live["images"], live["captions"])
    got, _, _ = model.compute_losses(None, cached["captions"], model.cached_caption_embeddings(cached),
                                     features=model.cached_image_features(cached))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_minigpt5_same_losses_from_cached_latent_distribution(tmp_path):
    """The latent cache holds the VAE's mean and std; the loss draws mean + std * noise as the VAE
    would, so with the same random state it is the loss computed from the images."""
    overrides = [f"--data.init_args.train.init_args.root={tmp_path / 'toy5'}",
                 "--data.init_args.train.init_args.n_train=8", "--data.init_args.train.init_args.n_val=0"]
    index = main(["shards", "from-samples", "--config", str(ROOT / "configs/minigpt5_stage1_tiny.yaml"),
                  "--out", str(tmp_path / "s"), "--shard-size", "3", *overrides])
    model = configured("minigpt5_stage1_tiny.yaml", *overrides)
    data = ShardDataModule(str(index), input_image_size=32, output_image_size=32)
    cache = make_cache("vae", model, index, tmp_path / "vae", data=data)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["samples"] == 9 and manifest["fingerprint"]["image_size"] == model.generator.image_size
    live = first_batch(index, input_image_size=32, output_image_size=32)
    cached = first_batch(index, input_image_size=32, output_image_size=32, features=str(cache))
    assert cached["sources"] == live["sources"] and "output_images" not in cached
    assert cached["output_latent_mean"].shape[0] == live["output_images"].shape[0]
    losses = []
    for batch in (live, cached):
        model.init_training_rng(0)  # the same CFG dropout draws
        torch.manual_seed(7)  # the same latent sample, noise and timesteps
        losses.append(model.compute_losses(batch, train=True))
    assert set(losses[0]) == set(losses[1]) >= {"ldm", "text", "loss"}
    for name in losses[0]:
        torch.testing.assert_close(losses[1][name], losses[0][name], msg=lambda m: f"{name}: {m}")


def test_cache_made_by_another_encoder_is_refused(caption_shards, tmp_path):
    cache = make_cache("clip", configured("fromage_tiny.yaml"), caption_shards, tmp_path / "clip")
    batch = first_batch(caption_shards, image_size=32, features=str(cache))
    other_weights = configured("fromage_tiny.yaml")
    with torch.no_grad():  # the same class and config, other weights (e.g. another checkpoint)
        next(other_weights.visual_encoder.parameters()).add_(0.01)
    with pytest.raises(DataError, match=r"made by another visual encoder.*weights_sha256"):
        other_weights.cached_image_features(batch)
    from mmgen.components.clip_vision import CLIPVisionEncoder

    other_config = configured("fromage_tiny.yaml")
    config = dict(other_config.visual_encoder.model.config.to_dict(), patch_size=16)
    other_config.visual_encoder = CLIPVisionEncoder(config={k: config[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")})
    other_config.visual_encoder.configure()
    with pytest.raises(DataError, match=r"clip.*config_sha256"):
        other_config.cached_image_features(batch)


def test_cache_of_other_shards_or_preprocessing_is_refused(caption_shards, tmp_path):
    model = configured("fromage_tiny.yaml")
    cache = make_cache("clip", model, caption_shards, tmp_path / "clip")
    manifest = json.loads((cache / "manifest.json").read_text())
    # the rows of shard 0 claimed for shard 1: the key check names the file
    manifest["shards"][0]["file"], manifest["shards"][1]["file"] = manifest["shards"][1]["file"], manifest["shards"][0]["file"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    data = ShardDataModule(str(caption_shards), image_size=32, features=str(cache), shuffle_buffer=0)
    data.setup("fit")
    with pytest.raises(DataError, match=r"the cache was made from other shards"):
        next(iter(data.train_dataloader()))
    with pytest.raises(DataError, match=r"preprocessed as \{'image_size': 32\}"):
        ShardDataModule(str(caption_shards), image_size=64, features=str(cache)).setup("fit")
    manifest["shards"] = manifest["shards"][:1]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="has no rows for shard"):
        ShardDataModule(str(caption_shards), image_size=32, features=str(cache)).setup("fit")
    with pytest.raises(DataError, match="mmgen cache-features"):
        FeatureCache(tmp_path / "missing")


def test_training_from_the_cache_never_runs_the_encoder(caption_shards, tmp_path, monkeypatch):
    from mmgen.components.clip_vision import CLIPVisionEncoder

    cli = build_cli(["--config", str(ROOT / "configs/fromage_tiny.yaml"), "--trainer.logger=false"], run=False)
    torch.manual_seed(0)
    cli.model.configure_model()  # the weights the cache is made with; fit keeps them (already built)
    cache = make_cache("clip", cli.model, caption_shards, tmp_path / "clip", dtype=torch.float16)

    def refuse(self, images):
        raise AssertionError("the visual encoder ran")

    monkeypatch.setattr(CLIPVisionEncoder, "forward", refuse)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    data = ShardDataModule(str(caption_shards), batch_size=6, image_size=32, features=str(cache))
    trainer.fit(cli.model, datamodule=data)
    assert trainer.global_step == 2


def test_cache_features_command(caption_shards, tmp_path):
    manifest = main(["cache-features", "--kind", "clip", "--config", str(ROOT / "configs/fromage_tiny.yaml"),
                     "--shards", str(caption_shards), "--out", str(tmp_path / "c"), "--batch-size", "7",
                     "--data.class_path=mmgen.data.shards.ShardDataModule",
                     f"--data.init_args.train={caption_shards}", "--data.init_args.image_size=32"])
    written = json.loads(manifest.read_text())
    assert written["kind"] == "clip" and written["samples"] == 24 and written["dtype"] == "float16"
    assert [s["samples"] for s in written["shards"]] == [8, 8, 8]
    assert written["preprocessing"] == {"image_size": 32}
    assert set(written["fingerprint"]) == {"class", "config_sha256", "weights_sha256"}
    rows = FeatureCache(tmp_path / "c").get(resolve_source(str(caption_shards))[0][1], 2, "000000010")
    assert rows["image_features"].dtype == torch.float16 and rows["image_features"].shape[0] == 1


def test_tsv_caption_cache_records_and_checks_its_generator(tmp_path):
    """`mmgen cache-captions` (GILL's TSV cache) records the same fingerprint: a GILL whose image
    generator is another (here: other random weights) refuses the embeddings."""
    from mmgen.data.caption_cache import CachedCaptionDataModule

    overrides = [f"--data.init_args.root={tmp_path / 'toy'}", "--data.init_args.n_train=16", "--data.init_args.n_val=4"]
    manifest = main(["cache-captions", "--config", "configs/gill_tiny.yaml", "--out", str(tmp_path / "c"), *overrides])
    assert json.loads(manifest.read_text())["fingerprint"]["identity"].startswith("random:")
    same = configured("gill_tiny.yaml", *overrides)
    data = CachedCaptionDataModule(build_cli(["--config", "configs/gill_tiny.yaml", "--trainer.logger=false", *overrides],
                                             run=False).datamodule, train_cache=str(tmp_path / "c"))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert same.cached_caption_embeddings(batch) is batch["caption_embeddings"]
    other = configured("gill_tiny.yaml", *overrides, "--model.init_args.image_generator.init_args.seed=1")
    with pytest.raises(DataError, match=r"made by another image generator.*identity"):
        other.cached_caption_embeddings(batch)
