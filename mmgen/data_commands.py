"""``mmgen shards`` (converters into webdataset shards) and ``mmgen cache-features`` (feature
caches of the frozen components over shards); docs/data.md."""

from __future__ import annotations

import argparse


def shards_main(args: list[str]):
    """Write webdataset shards (and their shards.json index) from a caption TSV + image folder,
    from img2dataset output, or from a config's MiniGPT-5 samples (CC3M, VIST, MMDialog); or
    describe a shard source."""
    parser = argparse.ArgumentParser(prog="mmgen shards", description=shards_main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    tsv = commands.add_parser("from-tsv", help="caption TSV + image folder -> caption shards")
    tsv.add_argument("--tsv", required=True)
    tsv.add_argument("--image-dir", required=True, help="folder the TSV's image paths are relative to")
    tsv.add_argument("--caption-column", default="caption")
    tsv.add_argument("--image-column", default="image", help="image (FROMAGe/GILL files) or image_path (MiniGPT-5's)")
    tsv.add_argument("--allow-outside-paths", action="store_true", help="allow absolute or ../ image paths")
    i2d = commands.add_parser("from-img2dataset", help="img2dataset output (webdataset or files format) -> indexed shards")
    i2d.add_argument("--input", required=True, help="img2dataset's output folder")
    samples = commands.add_parser("from-samples", help="a config's MiniGPT-5 samples -> interleaved shards")
    samples.add_argument("--config", action="append", required=True, help="config whose data is a MiniGPT5DataModule")
    samples.add_argument("--split", choices=["train", "val"], default="train")
    for command in (tsv, i2d, samples):
        command.add_argument("--out", required=True, help="folder of the shards and shards.json")
        command.add_argument("--shard-size", type=int, default=10_000, help="samples per tar shard")
    info = commands.add_parser("info", help="shard URLs, counts and kind of a shard source")
    info.add_argument("source", help="folder or shards.json, or URLs with brace patterns")
    options, overrides = parser.parse_known_args(args)
    if overrides and options.command != "from-samples":
        parser.error(f"unrecognized arguments: {overrides}")
    from mmgen.data import shard_convert
    from mmgen.data.shards import resolve_source

    if options.command == "info":
        urls, counts, kind = resolve_source(options.source)
        total = sum(counts) if counts is not None else "unknown"
        print(f"{len(urls)} shards, {total} samples, kind {kind or 'unrecorded'}")
        for url, count in zip(urls, counts or [None] * len(urls)):
            print(f"  {url}  {count if count is not None else '?'}")
        return urls, counts, kind
    if options.command == "from-tsv":
        index = shard_convert.from_tsv(options.tsv, options.image_dir, options.out, options.caption_column,
                                       options.image_column, options.shard_size,
                                       allow_outside_paths=options.allow_outside_paths)
    elif options.command == "from-img2dataset":
        index = shard_convert.from_img2dataset(options.input, options.out, options.shard_size)
    else:
        from mmgen.cli import build_cli

        cli = build_cli([a for c in options.config for a in ("--config", c)] + overrides
                        + ["--trainer.logger=false"], run=False)
        dataset = getattr(cli.datamodule, options.split, None)
        if dataset is None or not hasattr(dataset, "samples"):
            parser.error(f"the config's data has no {options.split} sample dataset (a MiniGPT5DataModule)")
        index = shard_convert.from_samples(dataset, options.out, options.shard_size, prefix=options.split)
    print(f"-> {index}")
    return index


def cache_features_main(args: list[str]):
    """Run a frozen component of a config's model once over shards and store its outputs as a
    feature cache, one safetensors file per shard (mmgen.data.feature_cache): CLIP pooled
    features (FROMAGe, GILL), the VAE latent distribution (MiniGPT-5) or caption embeddings (GILL)."""
    parser = argparse.ArgumentParser(prog="mmgen cache-features", description=cache_features_main.__doc__)
    parser.add_argument("--kind", choices=["clip", "vae", "captions"], required=True)
    parser.add_argument("--config", action="append", required=True, help="training config(s) of the model")
    parser.add_argument("--shards", help="shards to cache (default: the config's ShardDataModule train source)")
    parser.add_argument("--split", choices=["train", "val"], default="train", help="which source of the config's data")
    parser.add_argument("--out", required=True, help="cache folder")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                        help="stored rows (float16 halves the disk of float32)")
    parser.add_argument("--use-attention-mask", action="store_true", help="captions: encode with the mask (GILL: no)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    options, overrides = parser.parse_known_args(args)
    import torch
    from lightning.pytorch import seed_everything

    from mmgen.cli import build_cli
    from mmgen.data.feature_cache import write_feature_cache
    from mmgen.errors import ConfigError
    from mmgen.data.shards import ShardDataModule, resolve_source

    cli = build_cli([a for c in options.config for a in ("--config", c)] + overrides + ["--trainer.logger=false"],
                    run=False)
    model, data = cli.model, cli.datamodule
    seed = cli.config.get("seed_everything")
    if isinstance(seed, int):  # random-weight (tiny) configs: the same weights at every call
        seed_everything(seed, verbose=False)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = options.shards or (getattr(data, options.split, None) if isinstance(data, ShardDataModule) else None)
    if source is None:
        parser.error("give --shards, or a config whose data is a ShardDataModule")
    urls, _, _ = resolve_source(source)
    module = data if isinstance(data, ShardDataModule) else ShardDataModule(train=source)
    try:
        decode, encode, fingerprint, preprocessing = cache_recipe(options.kind, model, module, device,
                                                                  options.use_attention_mask)
    except ConfigError as error:
        parser.error(str(error))

    def progress(name, count):
        print(f"  {name}: {count} samples")

    manifest = write_feature_cache(options.out, options.kind, urls, decode, encode, fingerprint,
                                   batch_size=options.batch_size, dtype=getattr(torch, options.dtype),
                                   source=str(source), preprocessing=preprocessing, progress=progress)
    print(f"{options.kind} features of {len(urls)} shards -> {manifest}")
    return manifest


def cache_recipe(kind: str, model, data, device, use_attention_mask: bool = False):
    """``(decode, encode, fingerprint, preprocessing)`` of a ``kind`` cache of ``model``'s frozen
    component, images decoded as the ShardDataModule ``data`` decodes them. Builds only that
    component (a full-size LLM need not load to cache CLIP features)."""
    import torch

    from mmgen.data.feature_cache import caption_fingerprint, encoder_fingerprint, vae_fingerprint
    from mmgen.data.shards import raw_caption
    from mmgen.errors import ConfigError

    if kind == "clip":
        encoder = getattr(model, "visual_encoder", None)
        if encoder is None:
            raise ConfigError("a clip cache needs a model with a visual_encoder (FROMAGe, GILL)")
        encoder.configure()
        encoder.to(device)
        decoder = data._decoder("captions")

        def encode(items):
            images = torch.stack([i["image"] for i in items]).to(device)  # (b, 3, S, S)
            return {"features": encoder(images)[:, 0]}  # (b, f)

        return decoder, encode, encoder_fingerprint(encoder), {"image_size": data.image_size}
    if kind == "vae":
        generator = getattr(model, "generator", None)
        if generator is None:
            raise ConfigError("a vae cache needs a model with a generator (MiniGPT-5)")
        generator.configure(parts=("vae",))
        generator.vae.to(device)
        decoder = data._decoder("samples")
        decoder.random_flip = False  # the cache is of the unflipped images

        def encode(items):
            images = torch.cat([i["output_images"] for i in items]).to(device)  # (N, 3, S, S)
            counts = {"counts": torch.tensor([len(i["output_images"]) for i in items])}
            if not len(images):  # text-only samples (MMDialog turns): rows of no image
                return counts
            mean, std = generator.latent_distribution(images)  # (N, c, h, w) each
            return {"mean": mean, "std": std, **counts}

        preprocessing = {"output_image_size": data.output_image_size, "image_preprocessing": data.image_preprocessing}
        return decoder, encode, vae_fingerprint(generator), preprocessing
    generator = getattr(model, "image_generator", None)
    if generator is None:
        raise ConfigError("a captions cache needs a model with an image_generator (GILL)")
    generator.configure(parts=("text_encoder",))
    generator.text_encoder.to(device)

    def encode(items):
        return {"embeddings": generator.encode_captions([i["caption"] for i in items], use_attention_mask)}

    return (lambda raw: {"caption": raw_caption(raw)}), encode, caption_fingerprint(generator, use_attention_mask), {}
