"""The ``mmgen`` command: LightningCLI's fit/validate/test/predict plus mmgen's own tools.

    mmgen fit --config configs/fromage_tiny.yaml
    mmgen params --config configs/fromage.yaml     # full-size dry run: parameter table, no download
    mmgen components                               # what is registered, by kind
    mmgen cache-captions --config configs/gill.yaml  # GILL's caption-embedding cache
    mmgen export --ckpt_path last.ckpt --out out/x   # checkpoint -> pretrained folder (docs/weights.md)
    mmgen convert fromage --release DIR --out out/x  # official release -> pretrained folder
    mmgen index build --model last.ckpt --images DIR_OR_TSV --out out/index  # retrieval index
    mmgen chat --model last.ckpt [--index out/index] [--out chat/]  # talk with a trained model

Tests call ``main([...])`` in-process.
"""

from __future__ import annotations

import argparse
import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

import mmgen  # noqa: F401  (torchvision fix before lightning's imports)
from mmgen.methods.base import MultimodalLM

TOOLS = {}


def tool(name):
    def register(fn):
        TOOLS[name] = fn
        return fn

    return register


def build_cli(args: list[str] | None, run: bool = True) -> LightningCLI:
    import mmgen.components  # noqa: F401  (registers components so short class names resolve)
    import mmgen.methods  # noqa: F401
    from mmgen.lightning_cli import MMGenCLI  # config-file, checkpoint and resume checks

    return MMGenCLI(
        MultimodalLM,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None):
    given = list(sys.argv[1:] if args is None else args)
    if given and given[0] in TOOLS:
        return TOOLS[given[0]](given[1:])
    return build_cli(args)  # None: LightningCLI reads sys.argv itself


def console_main() -> None:
    """The ``mmgen`` console script: like ``main``, but returns nothing, so that the process exit
    status is 0 on success (a returned object would become exit status 1). A user error (bad
    data, config or checkpoint) prints its one-sentence message, without a traceback, and exits 2."""
    from mmgen.errors import ConfigError, DataError

    try:
        main()
    except (ConfigError, DataError) as error:
        print(f"mmgen: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@tool("components")
def list_components(args: list[str]) -> dict:
    """Print the registered components by kind."""
    parser = argparse.ArgumentParser(prog="mmgen components", description=list_components.__doc__)
    parser.add_argument("kind", nargs="?", help="only this kind")
    options = parser.parse_args(args)
    from mmgen.registry import registered

    table = registered(options.kind)
    for kind, classes in table.items():
        print(f"{kind}:")
        for name, cls in sorted(classes.items()):
            doc = (cls.__doc__ or "").strip().splitlines()
            print(f"  {name:<24} {cls.__module__}.{cls.__qualname__}")
            if doc:
                print(f"  {'':<24} {doc[0]}")
    return table


@tool("params")
def parameter_report(args: list[str]):
    """Build a config's model at full size with random weights on the meta device (no download,
    no memory) and print its parameter table; with --memory, an estimate of the peak training
    memory per GPU (mmgen.memory; defaults from the config's trainer and data sections)."""
    parser = argparse.ArgumentParser(prog="mmgen params", description=parameter_report.__doc__)
    parser.add_argument("--config", action="append", required=True, help="config file(s), as for fit")
    parser.add_argument("overrides", nargs="*", help="further LightningCLI arguments")
    memory = parser.add_argument_group("memory plan")
    memory.add_argument("--memory", action="store_true", help="also print the memory plan (an estimate)")
    memory.add_argument("--micro-batch", type=int, help="samples per GPU per forward (default: the data's batch_size)")
    memory.add_argument("--precision", help="32, bf16-mixed, 16-mixed, bf16-true, 16-true (default: the trainer's)")
    memory.add_argument("--strategy", choices=["ddp", "fsdp"], help="default: the trainer's (ddp unless FSDP/DeepSpeed)")
    memory.add_argument("--devices", type=int, help="GPUs (default: the trainer's devices)")
    memory.add_argument("--activation-checkpointing", action="store_true", default=None,
                        help="recompute the LLM's layers in backward (default: the LLM's gradient_checkpointing)")
    memory.add_argument("--tokens", type=int, help="tokens per LLM sequence (default: the method's)")
    options, unknown = parser.parse_known_args(args)  # unknown: LightningCLI --key=value overrides
    from mmgen.summary import dry_run, format_table

    cli_args = [a for c in options.config for a in ("--config", c)] + options.overrides + unknown
    cli = build_cli(cli_args + ["--trainer.logger=false"], run=False)
    rows = dry_run(cli.model, cli.trainer)
    print(format_table(rows, title=f"{type(cli.model).__name__} ({', '.join(options.config)})"))
    if not options.memory:
        return rows
    from mmgen.memory import memory_plan, setting_from_config

    checkpointing = options.activation_checkpointing or getattr(cli.model.llm, "gradient_checkpointing", False)
    setting = setting_from_config(
        cli.config, cli.datamodule, precision=options.precision, micro_batch=options.micro_batch,
        strategy=options.strategy, devices=options.devices, activation_checkpointing=checkpointing,
        tokens=options.tokens,
    )
    plan = memory_plan(cli.model, setting, title=f"{type(cli.model).__name__} ({', '.join(options.config)})")
    print()
    print(plan.format())
    return plan


@tool("cache-captions")
def cache_captions(args: list[str]):
    """Precompute an image generator's caption embeddings for a caption TSV (GILL's generation
    targets) into a sharded on-disk cache; see mmgen.data.caption_cache for the format."""
    parser = argparse.ArgumentParser(prog="mmgen cache-captions", description=cache_captions.__doc__)
    parser.add_argument("--config", action="append", default=[],
                        help="training config(s): the model's image_generator, the data's TSV and cache folders")
    parser.add_argument("--split", choices=["train", "val"], default="train", help="which of the config's TSVs")
    parser.add_argument("--tsv", help="caption TSV (default: the config data's file of --split)")
    parser.add_argument("--out", help="cache folder (default: the config's CachedCaptionDataModule folder of --split)")
    parser.add_argument("--generator", help="hub id or folder of a Stable Diffusion model, instead of --config")
    parser.add_argument("--caption-column", default=None, help="default: the config data's, else 'caption'")
    parser.add_argument("--use-attention-mask", action="store_true", help="encode with the attention mask (GILL: no)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=10_000, help="captions per .npy shard")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    options, overrides = parser.parse_known_args(args)  # the rest: LightningCLI arguments for --config
    if overrides and not options.config:
        parser.error(f"unrecognized arguments: {overrides}")
    import torch

    from mmgen.data.caption_cache import CachedCaptionDataModule, read_tsv_captions, write_caption_cache

    data, generator = None, None
    if options.config:
        cli_args = [a for c in options.config for a in ("--config", c)] + overrides
        cli = build_cli(cli_args + ["--trainer.logger=false"], run=False)
        generator, data = getattr(cli.model, "image_generator", None), cli.datamodule
    if options.generator:
        from mmgen.components.stable_diffusion import StableDiffusion

        generator = StableDiffusion(options.generator)
    if generator is None:
        parser.error("give --generator, or a --config whose model has an image_generator")
    inner = data.data if isinstance(data, CachedCaptionDataModule) else data
    tsv, out = options.tsv, options.out
    if tsv is None:
        if inner is None:
            parser.error("give --tsv, or a --config with caption data")
        inner.prepare_data()  # generated datasets (the toy world) are written here
        tsv = inner.train_tsv if options.split == "train" else inner.val_tsv
    if out is None and isinstance(data, CachedCaptionDataModule):
        out = data.train_cache if options.split == "train" else data.val_cache
    if out is None:
        parser.error("give --out (or a config whose data is a CachedCaptionDataModule)")
    column = options.caption_column or getattr(inner, "caption_column", None) or "caption"
    image_column = getattr(inner, "image_column", None) or "image"

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    generator.configure(parts=("text_encoder",))
    generator.to(device)
    captions = read_tsv_captions(tsv, column, image_column)
    manifest = write_caption_cache(
        out, captions,
        encode=lambda batch: generator.encode_captions(batch, options.use_attention_mask),
        generator=generator.identity, text_embed_dim=generator.text_embed_dim,
        max_length=generator.max_length, use_attention_mask=options.use_attention_mask,
        tsv=tsv, caption_column=column, batch_size=options.batch_size, shard_size=options.shard_size,
    )
    print(f"{len(captions)} caption embeddings of {tsv} -> {manifest}")
    return manifest


@tool("export")
def export(args: list[str]):
    """Write a Lightning checkpoint of an mmgen run as a pretrained folder (config, trained
    tensors as safetensors, adapter files, model card); see mmgen.pretrained."""
    parser = argparse.ArgumentParser(prog="mmgen export", description=export.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by mmgen fit")
    parser.add_argument("--out", required=True, help="folder to write")
    options = parser.parse_args(args)
    from mmgen.pretrained import export_checkpoint

    out = export_checkpoint(options.ckpt_path, options.out)
    print(f"{options.ckpt_path} -> {out}")
    return out


@tool("convert")
def convert_release(args: list[str]):
    """Convert an official FROMAGe, GILL or MiniGPT-5 release into an mmgen pretrained folder;
    every source tensor is placed or reported (docs/weights.md has the key mapping)."""
    from mmgen.convert import add_arguments, run

    parser = argparse.ArgumentParser(prog="mmgen convert", description=convert_release.__doc__)
    add_arguments(parser)  # the converters declare their options (file names, backbones, dtype)
    return run(parser.parse_args(args))


@tool("index")
def retrieval_index(args: list[str]):
    """Retrieval indexes (FROMAGe, GILL): embed a folder of images or a caption TSV's images with
    a trained model into an index folder (docs/retrieval_index.md), or describe one."""
    parser = argparse.ArgumentParser(prog="mmgen index", description=retrieval_index.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="embed images into an index folder")
    build.add_argument("--model", required=True, help="checkpoint of mmgen fit, or a pretrained folder")
    build.add_argument("--images", required=True, help="image folder, or caption TSV with an image column")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--image-dir", help="folder the TSV's image paths are relative to (default: the TSV's)")
    build.add_argument("--image-column", help="TSV column of the image paths (default: image or image_path)")
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--num-workers", type=int, default=0, help="image-loading worker processes")
    build.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored embeddings")
    build.add_argument("--faiss-factory", help="also save a trained FAISS index of this type, e.g. IVF4096,Flat")
    build.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    build.add_argument("--seed", type=int, default=None, help="seed before building the model: backbones "
                       "with random weights (tiny configs) are then those of runs with seed_everything=SEED")
    info = commands.add_parser("info", help="print an index folder's metadata")
    info.add_argument("directory")
    options = parser.parse_args(args)
    from mmgen.inference.index import RetrievalIndex

    if options.command == "info":
        index = RetrievalIndex.load(options.directory, check_images=False)
        print(f"{index!r}\nimages under {index.root}\n" + "\n".join(f"{k}: {v}" for k, v in index.meta.items()))
        return index
    from mmgen.inference.api import load_model

    if options.seed is not None:
        from lightning.pytorch import seed_everything

        seed_everything(options.seed, verbose=False)
    model = load_model(options.model, device=options.device)  # checkpoint or pretrained folder
    backend = {"backend": "faiss", "faiss_factory": options.faiss_factory} if options.faiss_factory else {}
    index = RetrievalIndex.build(
        model, options.images, image_dir=options.image_dir, image_column=options.image_column,
        batch_size=options.batch_size, num_workers=options.num_workers, source=options.model,
        progress=True, **backend,
    )
    out = index.save(options.out, dtype=options.dtype)
    print(f"{len(index)} images of {options.images} -> {out}")
    return index


@tool("chat")
def chat(args: list[str]):
    """Talk with a trained model in the terminal (images by path); the conversation can be written
    as the same HTML page as mmgen predict writes (mmgen.inference.chat)."""
    from mmgen.inference.chat import main as chat_main

    return chat_main(args)


if __name__ == "__main__":
    console_main()
