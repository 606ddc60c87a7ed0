"""Arguments of ``mmgen toy``."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmgen.toy import TOY_WORLD_DIR
from mmgen.toy.pretrain import STAGES, pretrain


def main(args: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="mmgen toy", description="The toy world's backbones (docs/toy_world.md).")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("pretrain",
                                help="rebuild the toy backbones, deterministically (about 20 min on a 2-core machine)")
    build.add_argument("--out", default=str(TOY_WORLD_DIR), help="where the backbone folders go (default: the shipped ones)")
    build.add_argument("--world", default=".cache/mmgen-toy-world", help="where the generated world is written")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--stages", default=",".join(STAGES),
                       help=f"comma-separated subset of {','.join(STAGES)} (later stages read earlier ones from --out)")
    build.add_argument("--quick", action="store_true", help="tiny world, a few steps each: checks the pipeline only")
    build.add_argument("--threads", type=int, default=1,
                       help="torch threads (default 1: these models are too small to gain from more, and on a "
                            "shared machine extra spinning threads slow every step down)")
    build.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                       help="processes (default 2: the LMs and the Q-Former train beside the judge and the "
                            "diffusion model; the files are the same as with 1)")
    options = parser.parse_args(args)
    stages = tuple(s.strip() for s in options.stages.split(",") if s.strip())
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    import torch

    torch.set_num_threads(options.threads)
    return pretrain(Path(options.out), Path(options.world), options.seed, stages, options.quick, jobs=options.jobs)
