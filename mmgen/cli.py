"""The ``mmgen`` command: LightningCLI's fit/validate/test/predict plus mmgen's own tools.

    mmgen fit --config configs/fromage_tiny.yaml
    mmgen params --config configs/fromage.yaml     # full-size dry run: parameter table, no download
    mmgen components                               # what is registered, by kind
    mmgen cache-captions --config configs/gill.yaml  # GILL's caption-embedding cache
    mmgen export --ckpt_path last.ckpt --out out/x   # checkpoint -> pretrained folder (docs/weights.md)
    mmgen convert fromage --release DIR --out out/x  # official release -> pretrained folder
    mmgen index build --model last.ckpt --images DIR_OR_TSV --out out/index  # retrieval index
    mmgen chat --model last.ckpt [--index out/index] [--out chat/]  # talk with a trained model
    mmgen serve --model last.ckpt [--index out/index] [--port 7860]  # the same in the browser

``mmgen --help`` lists every command: Lightning's four and every ``@tool`` registered in
``TOOLS`` (its docstring's first sentence); ``mmgen --version``. Bad input (``ConfigError``,
``DataError``, the hub client's not-found errors) prints one line and exits 2; ``--debug`` or
``MMGEN_DEBUG=1`` keeps the traceback. Tests call ``main([...])`` in-process.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from mmgen.methods.base import MultimodalLM

TOOLS = {}

#: Lightning's subcommands (their options: ``mmgen fit --help``).
LIGHTNING_COMMANDS = {
    "fit": "train a model from a config (--config FILE, overrides as --key=value); --ckpt_path resumes",
    "validate": "run the validation set once (--ckpt_path: the checkpoint to evaluate)",
    "test": "run the test set once (--ckpt_path: the checkpoint to evaluate)",
    "predict": "answer prompts with a trained model (--ckpt_path), writing the answers",
}


def tool(name):
    def register(fn):
        TOOLS[name] = fn
        return fn

    return register


def build_cli(args: list[str] | None, run: bool = True) -> LightningCLI:
    import mmgen.components  # noqa: F401  (registers components so short class names resolve)
    import mmgen.methods  # noqa: F401
    from mmgen.lightning_cli import MMGenCLI  # config-file, checkpoint, source and resume checks

    return MMGenCLI(
        MultimodalLM,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        # The methods build their own AdamW groups and schedule (model.optim) and MiniGPT-5's stages
        # rebuild them; a --optimizer would silently replace all that, so there is none.
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def _summary(fn) -> str:
    """First sentence of a tool's docstring, on one line."""
    text = " ".join((fn.__doc__ or "").split())
    return text.split(". ")[0].rstrip(".") if text else ""


def usage() -> str:
    """``mmgen --help``: every command, the tools read from ``TOOLS`` and their docstrings."""
    from mmgen import __version__

    width = max(len(name) for name in [*LIGHTNING_COMMANDS, *TOOLS]) + 2
    lines = [
        f"usage: mmgen COMMAND [options]        (mmgen {__version__}; mmgen COMMAND --help for its options)",
        "", "training and evaluation (Lightning; configs in configs/, docs/configs.md):",
    ]
    lines += [f"  {name:<{width}}{text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "tools:"]
    for name, fn in sorted(TOOLS.items()):  # wrapped under its name: docstrings are long
        lines += textwrap.wrap(_summary(fn), 100, initial_indent=f"  {name:<{width}}", subsequent_indent=" " * (width + 2))
    lines += [
        "", "options:", f"  {'-h, --help':<{width}}this list", f"  {'--version':<{width}}print the version",
        f"  {'--debug':<{width}}show the full traceback of an error (or set MMGEN_DEBUG=1)",
        "", "Errors in your input (files, configs, checkpoints, model names) print one line and exit with 2.",
    ]
    return "\n".join(lines)


def main(args: list[str] | None = None):
    given = list(sys.argv[1:] if args is None else args)
    if given[:1] == ["--debug"]:
        given = given[1:]
    if not given or given[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    if given[0] == "--version":
        from mmgen import __version__

        print(f"mmgen {__version__}")
        return None
    if given[0] in TOOLS:
        return TOOLS[given[0]](given[1:])
    if given[0] not in LIGHTNING_COMMANDS and not given[0].startswith("-"):
        from mmgen.errors import ConfigError

        raise ConfigError(f"unknown command {given[0]!r}; commands: {', '.join([*LIGHTNING_COMMANDS, *sorted(TOOLS)])}")
    return build_cli(given)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: their message is the whole story."""
    from mmgen.errors import ConfigError, DataError

    errors: list[type[BaseException]] = [ConfigError, DataError]
    try:  # the hub client's "not found / offline" family (name the repository in their message)
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

        errors += [HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError]
    except ImportError:
        pass
    return tuple(errors)


def console_main() -> None:
    """The ``mmgen`` console script: like ``main``, but returns nothing, so that the process exit
    status is 0 on success (a returned object would become exit status 1). A user error (bad
    data, config, checkpoint or model name) prints its message on one line, without a traceback,
    and exits 2; bugs keep their traceback. ``--debug`` (or ``MMGEN_DEBUG=1``) shows every traceback."""
    # main() hands the arguments on explicitly (MMGenCLI.parse_arguments silences LightningCLI's
    # warning about that); sys.argv itself must stay: Lightning's DDP relaunches each process from it.
    args = sys.argv[1:]
    debug = args[:1] == ["--debug"] or os.environ.get("MMGEN_DEBUG", "") not in ("", "0")
    try:
        main(args)
    except user_errors() as error:
        if debug:
            raise
        message = " ".join(str(error).split())  # one line, whatever the message's own layout
        print(f"mmgen: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


@tool("components")
def list_components(args: list[str]) -> dict:
    """Print the registered components by kind."""
    parser = argparse.ArgumentParser(prog="mmgen components", description=list_components.__doc__)
    parser.add_argument("kind", nargs="?", help="only this kind")
    options = parser.parse_args(args)
    from mmgen.errors import ConfigError
    from mmgen.registry import registered

    try:
        table = registered(options.kind)
    except KeyError as error:
        raise ConfigError(error.args[0]) from None
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
    memory.add_argument("--strategy", choices=["ddp", "fsdp", "fsdp_backbones"],
                        help="default: the trainer's (ddp unless FSDP/DeepSpeed; fsdp_backbones: mmgen.sharding)")
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
    from mmgen.data.feature_cache import caption_fingerprint

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
        fingerprint=caption_fingerprint(generator, options.use_attention_mask),  # GILL checks it
    )
    print(f"{len(captions)} caption embeddings of {tsv} -> {manifest}")
    return manifest


@tool("export")
def export(args: list[str]):
    """Write a Lightning checkpoint of an mmgen run as a pretrained folder (config, trained
    tensors as safetensors, tokenizer, adapter files, model card), optionally pushed to the hub;
    see mmgen.pretrained and docs/weights.md."""
    parser = argparse.ArgumentParser(prog="mmgen export", description=export.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by mmgen fit")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="then upload the folder to this hub repository "
                        "(org/name; created if missing; log in first: hf auth login, or set HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the hub repository private")
    options = parser.parse_args(args)
    from mmgen.pretrained import export_checkpoint, push_to_hub

    out = export_checkpoint(options.ckpt_path, options.out)
    print(f"{options.ckpt_path} -> {out}")
    if options.push_to_hub:
        url = push_to_hub(out, options.push_to_hub, private=options.private or None)
        print(f"{out} -> {url}")
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


@tool("serve")
def serve(args: list[str]):
    """A chat page in the browser (Gradio, pip install mmgen[demo]): text and images in, text with
    retrieved and generated images out (mmgen.inference.web)."""
    from mmgen.inference.web import main as serve_main

    return serve_main(args)


@tool("eval")
def evaluate(args: list[str]):
    """Run one of the papers' benchmarks (VIST, VisDial, CC3M, MMDialog) on a trained model: the
    paper's table with its numbers beside, a JSON of the results, cached images and a contact
    sheet (mmgen.evaluation, docs/evaluation.md)."""
    from mmgen.evaluation.run import main as eval_main

    return eval_main(args)


@tool("shards")
def shards(args: list[str]):
    """Write webdataset shards from a caption TSV + image folder, img2dataset output or a config's
    MiniGPT-5 samples, or describe shards (mmgen.data_commands; docs/data.md)."""
    from mmgen.data_commands import shards_main

    return shards_main(args)


@tool("cache-features")
def cache_features(args: list[str]):
    """Cache a frozen component's outputs over shards: CLIP features, VAE latent distributions or
    caption embeddings (mmgen.data_commands; docs/data.md)."""
    from mmgen.data_commands import cache_features_main

    return cache_features_main(args)


@tool("toy")
def toy(args: list[str]):
    """The toy world: `mmgen toy pretrain` rebuilds its tiny backbones (tokenizer, LMs, CLIP,
    Q-Former, judge, diffusion model) into mmgen/assets/toy_world (mmgen.toy; docs/toy_world.md)."""
    from mmgen.toy.cli import main as toy_main

    return toy_main(args)


if __name__ == "__main__":
    console_main()
