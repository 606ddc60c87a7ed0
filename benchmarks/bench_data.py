"""Data-path benchmark: caption TSV + JPEG folder vs webdataset shards vs cached features.

All measured in the same run, on the same generated images (photo-like JPEGs, ``--image-px``
pixels, decoded and resized to 224 as CLIP takes them):

1. samples/s of the data path alone (one pass of the training loader, ``--workers`` workers):
   TSV + JPEG decode (``CaptionDataModule``), shards + JPEG decode (``ShardDataModule``), shards
   with a CLIP feature cache (no image decoded);
2. a FROMAGe training step (loader + forward + backward + AdamW) at a small model size (CLIP
   ViT-B/16-like vision tower and a 4-layer OPT-like LM, both width 256, random weights), from
   the shards with the visual encoder running vs from the feature cache;
3. a MiniGPT-5-style latent step: the VAE encoding the output images vs latents drawn from the
   cached distribution (tiny VAE at ``--vae-px``);
4. disk and memory per million samples of each cache at the published sizes (CLIP ViT-L/14 pooled
   1024-d, SD latents 4x64x64 mean + std, SD v1.5 caption embeddings 77x768; float16), measured
   on cache files written with those shapes (keys and headers included) and extrapolated.

    python benchmarks/bench_data.py                    # ~1-2 min on 2 CPU cores
    python benchmarks/bench_data.py --samples 2048 --workers 2

Ratios are against the TSV path (1) and the live-encoder step (2, 3) of the same run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mmgen  # noqa: E402,F401  (torchvision fix first)
import torch  # noqa: E402


def write_images(root: Path, n: int, px: int) -> Path:
    """n photo-like JPEGs (smooth gradients + shapes + noise, quality 90) and a caption TSV."""
    import numpy as np
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True)
    rng = random.Random(0)
    lines = ["caption\timage"]
    for i in range(n):
        y, x = np.mgrid[0:px, 0:px] / px
        base = np.stack([np.sin(x * rng.uniform(2, 9)), np.cos(y * rng.uniform(2, 9)), x * y], -1)
        noise = np.random.default_rng(i).normal(0, 0.08, (px, px, 3))
        pixels = ((base * 0.5 + 0.5 + noise).clip(0, 1) * 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            a, b = sorted(rng.sample(range(px), 2)), sorted(rng.sample(range(px), 2))
            draw.ellipse((a[0], b[0], a[1], b[1]), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(root / "images" / f"{i:06d}.jpg", quality=90)
        lines.append(f"a picture number {i} with shapes\t{i:06d}.jpg")
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    return root / "train.tsv"


def loader_rate(loader, n_expected: int) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["captions"])
    elapsed = time.perf_counter() - start
    assert n >= n_expected * 0.9, (n, n_expected)
    return n / elapsed, n


def small_fromage():
    from mmgen.components.causal_lm import CausalLM
    from mmgen.components.clip_vision import CLIPVisionEncoder
    from mmgen.methods.fromage import FROMAGe

    llm = CausalLM(config=dict(model_type="opt", vocab_size=64, hidden_size=256, word_embed_proj_dim=256,
                               ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128,
                               pad_token_id=0, bos_token_id=1, eos_token_id=1), tokenizer="mmgen:toy_tokenizer")
    clip = CLIPVisionEncoder(config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                         num_attention_heads=4, image_size=224, patch_size=16))
    torch.manual_seed(0)
    model = FROMAGe(llm=llm, visual_encoder=clip, pack_probability=0.0)
    model.configure_model()
    return model


def step_times(model, loader, steps: int, cached: bool) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, it = [], iter(loader)
    for _ in range(steps + 1):  # the first step warms up, not timed
        start = time.perf_counter()
        batch = next(it)
        features = model.cached_image_features(batch) if cached else None
        losses, _, _ = model.compute_losses(batch.get("images"), batch["captions"], features=features)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times[1:]


def vae_step_times(steps: int, px: int, batch: int) -> tuple[float, float]:
    """Median seconds of the latent part of a MiniGPT-5 step: VAE encode + sample vs a cached
    distribution (the UNet part is the same in both and left out)."""
    from mmgen.components.stable_diffusion import StableDiffusion, tiny_sd_config

    config = tiny_sd_config()
    config["vae"] = dict(config["vae"], sample_size=px, block_out_channels=[64, 128, 128],
                         down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    sd = StableDiffusion(config=config, tokenizer="mmgen:toy_tokenizer")
    sd.configure(parts=("vae",))
    images = torch.rand(batch, 3, px, px)
    mean, std = sd.latent_distribution(images)
    live, cached = [], []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.no_grad():
            sd.vae.encode(sd._vae_pixels(images)).latent_dist.sample()
        live.append(time.perf_counter() - start)
        start = time.perf_counter()
        _ = mean + std * torch.randn(mean.shape)
        cached.append(time.perf_counter() - start)
    return statistics.median(live), statistics.median(cached)


def cache_sizes(tmp: Path, rows: int = 512) -> dict[str, tuple[float, float]]:
    """{kind: (GB on disk per million samples, peak MB of the reader's Python heap over a pass)}
    for caches written at the published shapes from random rows. Rows are read on demand from
    the files (never loaded whole), so reader memory is bounded by the open files (their key
    lists), not by the number of samples."""
    from mmgen.data.feature_cache import FeatureCache, write_feature_cache
    from mmgen.data.shards import ShardWriter, read_shard

    writer = ShardWriter(tmp / "fake", "fake", shard_size=rows // 2)
    for i in range(rows):
        writer.write({"__key__": f"{i:09d}", "txt": b"x"})
    urls = [str(tmp / "fake" / s["url"]) for s in writer.shards]
    writer.close()
    shapes = {"clip": {"features": (1024,)}, "vae": {"mean": (4, 64, 64), "std": (4, 64, 64)},
              "captions": {"embeddings": (77, 768)}}
    out = {}
    for kind, tensors in shapes.items():
        def encode(items, tensors=tensors, kind=kind):
            rows_ = {name: torch.randn(len(items), *shape) for name, shape in tensors.items()}
            if kind == "vae":
                rows_["counts"] = torch.ones(len(items), dtype=torch.long)
            return rows_

        folder = tmp / f"cache-{kind}"
        write_feature_cache(folder, kind, urls, lambda raw: {}, encode, {"class": "bench"}, batch_size=64)
        disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        cache = FeatureCache(folder)
        tracemalloc.start()
        for url in urls:
            for offset, raw in read_shard(url):
                cache.get(url, offset, raw["__key__"])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[kind] = (disk / rows * 1e6 / 1e9, peak / 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--image-px", type=int, default=384, help="side of the generated JPEGs (CC3M: ~400)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--vae-px", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved passes per data path (best kept)")
    options = parser.parse_args()
    from mmgen.data.captions import CaptionDataModule
    from mmgen.data.shard_convert import from_tsv
    from mmgen.data.shards import ShardDataModule
    from mmgen.data.feature_cache import write_feature_cache
    from mmgen.data.shards import resolve_source
    from mmgen.data_commands import cache_recipe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"generating {options.samples} JPEGs of {options.image_px} px ...", flush=True)
        tsv = write_images(tmp / "raw", options.samples, options.image_px)
        start = time.perf_counter()
        from_tsv(tsv, tmp / "raw" / "images", tmp / "shards", shard_size=128)
        convert = time.perf_counter() - start
        model = small_fromage()
        shards = ShardDataModule(str(tmp / "shards"), batch_size=options.batch, num_workers=options.workers,
                                 image_size=224, shuffle_buffer=256)
        urls, _, _ = resolve_source(str(tmp / "shards"))
        decode, encode, fingerprint, preprocessing = cache_recipe("clip", model, shards, torch.device("cpu"))
        start = time.perf_counter()
        write_feature_cache(tmp / "clip", "clip", urls, decode, encode, fingerprint, batch_size=32,
                            preprocessing=preprocessing)
        build = time.perf_counter() - start

        def tsv_loader():
            data = CaptionDataModule(str(tsv), image_dir=str(tmp / "raw" / "images"), image_size=224,
                                     batch_size=options.batch, num_workers=options.workers)
            return data.train_dataloader()

        def shard_loader(features=None):
            return ShardDataModule(str(tmp / "shards"), batch_size=options.batch, num_workers=options.workers,
                                   image_size=224, shuffle_buffer=256, features=features).train_dataloader()

        n = options.samples
        paths = {"TSV + JPEG decode": tsv_loader, "shards + JPEG decode": shard_loader,
                 "shards + CLIP feature cache": lambda: shard_loader(str(tmp / "clip"))}
        rates = {name: 0.0 for name in paths}
        for _ in range(options.rounds):  # interleaved rounds, best of each: a busy machine's noise
            for name, make in paths.items():  # hits every path alike
                rates[name] = max(rates[name], loader_rate(make(), n)[0])
        base = rates["TSV + JPEG decode"]
        print(f"\n1. data path alone (batch {options.batch}, {options.workers} workers, {n} samples of "
              f"{options.image_px} px -> 224)")
        for name, rate in rates.items():
            print(f"   {name:<30} {rate:9.1f} samples/s   x{rate / base:6.2f}")
        print(f"   (one-off: TSV -> shards {n / convert:.0f} samples/s; CLIP cache build "
              f"{n / build:.0f} samples/s at this encoder size)")

        live = step_times(model, shard_loader(), options.steps, cached=False)
        cached = step_times(model, shard_loader(str(tmp / "clip")), options.steps, cached=True)
        live_s, cached_s = statistics.median(live), statistics.median(cached)
        print(f"\n2. FROMAGe step, ViT-B/16-like 224 px encoder + 4-layer LM (width 256), batch {options.batch}")
        print(f"   shards, encoder runs          {live_s * 1000:8.1f} ms/step  {options.batch / live_s:7.1f} samples/s")
        print(f"   shards + CLIP feature cache   {cached_s * 1000:8.1f} ms/step  {options.batch / cached_s:7.1f} "
              f"samples/s   x{live_s / cached_s:5.2f}")

        vae_live, vae_cached = vae_step_times(options.steps, options.vae_px, 4)
        print(f"\n3. latents of 4 output images, VAE at {options.vae_px} px (3 blocks, width 64-128)")
        print(f"   VAE encode + sample           {vae_live * 1000:8.2f} ms")
        print(f"   cached mean + std x noise     {vae_cached * 1000:8.2f} ms   x{vae_live / vae_cached:7.1f}")

        print("\n4. caches at the published sizes (float16): disk per million samples; reader memory is the peak\n"
              "   Python heap of a pass over 512 samples in shards of 256 (rows are read on demand, so it is\n"
              "   bounded by the open files, not by the sample count; loading a cache whole would cost its disk size)")
        for kind, (disk, memory) in cache_sizes(tmp).items():
            label = {"clip": "CLIP ViT-L/14 pooled (1024)", "vae": "SD VAE mean+std (2x4x64x64)",
                     "captions": "SD v1.5 caption emb. (77x768)"}[kind]
            print(f"   {label:<32} {disk:8.2f} GB / million on disk   {memory:6.2f} MB peak reader heap")


if __name__ == "__main__":
    main()
