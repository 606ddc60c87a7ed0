"""The ``mmgen`` command: LightningCLI's fit/validate/test/predict plus mmgen's own tools.

    mmgen fit --config configs/fromage_tiny.yaml
    mmgen params --config configs/fromage.yaml     # full-size dry run: parameter table, no download
    mmgen components                               # what is registered, by kind

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


def build_cli(args: list[str], run: bool = True) -> LightningCLI:
    import mmgen.components  # noqa: F401  (registers components so short class names resolve)
    import mmgen.methods  # noqa: F401

    return LightningCLI(
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
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] in TOOLS:
        return TOOLS[args[0]](args[1:])
    return build_cli(args)


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
    no memory) and print its parameter table."""
    parser = argparse.ArgumentParser(prog="mmgen params", description=parameter_report.__doc__)
    parser.add_argument("--config", action="append", required=True, help="config file(s), as for fit")
    parser.add_argument("overrides", nargs="*", help="further LightningCLI arguments")
    options = parser.parse_args(args)
    from mmgen.summary import dry_run, format_table

    cli_args = [a for c in options.config for a in ("--config", c)] + options.overrides
    cli = build_cli(cli_args + ["--trainer.logger=false"], run=False)
    rows = dry_run(cli.model)
    print(format_table(rows, title=f"{type(cli.model).__name__} ({', '.join(options.config)})"))
    return rows


if __name__ == "__main__":
    main()
