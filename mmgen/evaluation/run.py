"""``mmgen eval --task T --model M ...``: one paper benchmark, its table and its JSON.

    mmgen eval --task vist-retrieval    --model out/fromage --data sis/val.json --image-dir sis/val_images
    mmgen eval --task vist-generation   --model out/gill    --data sis/val.json --image-dir sis/val_images --baseline
    mmgen eval --task visdial-retrieval --model out/fromage --data visdial_1.0_val.json --image-dir VisualDialog_val2018
    mmgen eval --task cc3m              --model out/gill    --data cc3m_val.tsv --image-dir cc3m/images
    mmgen eval --task mmdialog          --model out/minigpt5_mmdialog --data test_conversations.txt

docs/evaluation.md describes each protocol. Results go to ``--out`` (default: ``eval/`` next to the
model: inside a pretrained folder, beside a checkpoint file): ``<task>.json``, the generated images
(``<task>/generations/<setting>/``, reused by a rerun) and a contact sheet (``<task>/sheet/index.html``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmgen.errors import ConfigError

TASKS = ("vist-retrieval", "visdial-retrieval", "vist-generation", "visdial-generation", "cc3m", "mmdialog")
TITLES = {
    "vist-retrieval": "VIST contextual image retrieval (the last image of each story)",
    "visdial-retrieval": "VisDial text-to-image retrieval",
    "vist-generation": "VIST contextual image generation (the last image of each story)",
    "visdial-generation": "VisDial text-to-image generation",
    "cc3m": "CC3M validation: image generation and captioning",
    "mmdialog": "MMDialog: multimodal response generation",
}
DEFAULT_EXTRACTORS = {
    "clip": ("CLIPFeatures", "openai/clip-vit-large-patch14"),
    "inception": ("InceptionFeatures", "timm/inception_v3.tv_in1k"),
    "lpips": ("LPIPSAlex", "torchvision"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgen eval", description="Run one of the papers' benchmarks on a trained model "
                                "and print its table beside the papers' numbers (docs/evaluation.md).")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--model", required=True, help="checkpoint of mmgen fit, or a pretrained folder")
    p.add_argument("--data", required=True, help="VIST json, VisDial json, CC3M TSV or MMDialog JSONL")
    p.add_argument("--image-dir", help="image folder (default: the data file's folder)")
    p.add_argument("--image-mapping", help="VIST: MiniGPT-5's image mapping json (cleaned layout)")
    p.add_argument("--out", help="results folder (default: eval/ next to the model)")
    p.add_argument("--limit", type=int, help="only the first N items (a quick look; not comparable)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", default="1,5,10", help="VisDial: the numbers of dialogue rounds to evaluate")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--model-seed", type=int, help="seed before building the model (tiny configs' random backbones)")
    gen = p.add_argument_group("image generation (the papers: seed 42, 50 PNDM steps, guidance 7.5)")
    gen.add_argument("--seed", type=int, default=42, help="item i's image uses seed + i")
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--scheduler", default="pndm")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--baseline", action="store_true", help="also score the text-to-image baseline "
                     "(the model's Stable Diffusion from the caption alone)")
    gen.add_argument("--shard", help="K/N: generate only items n with n %% N == K (one process per GPU); "
                     "a last run without --shard scores everything from the shared image cache")
    gen.add_argument("--sheet", type=int, default=48, help="items per setting on the contact sheet (0: none)")
    ext = p.add_argument_group("measuring networks: a hub id or folder, or a YAML/JSON {class_path, init_args}")
    for name, (cls, default) in DEFAULT_EXTRACTORS.items():
        ext.add_argument(f"--{name}", default=default, help=f"{cls} weights (default {default})")
    ext.add_argument("--clip-tokenizer", help="tokenizer of --clip when it is not in its folder")
    text = p.add_argument_group("text")
    text.add_argument("--max-new-tokens", type=int, default=32)
    text.add_argument("--caption-prompt", help="text after the image for captioning (default: "
                      "none for FROMAGe/GILL, 'Describe this image.' for MiniGPT-5)")
    return p


def build_extractor(spec: str, default_class: str, **extra):
    """A feature extractor from a hub id / folder (``default_class``) or a YAML/JSON file holding
    ``{class_path, init_args}`` (e.g. a tiny random one)."""
    from mmgen.evaluation import extractors
    from mmgen.registry import REGISTRY

    path = Path(spec)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        import yaml

        from mmgen.files import read_text

        config = yaml.safe_load(read_text(path, "extractor config", error=ConfigError))
        if not isinstance(config, dict) or "class_path" not in config:
            raise ConfigError(f"{path}: expected {{class_path: ..., init_args: {{...}}}}")
        name = str(config["class_path"]).rsplit(".", 1)[-1]
        cls = REGISTRY["feature_extractor"].get(name)
        if cls is None:
            raise ConfigError(f"{path}: {config['class_path']} is not a feature_extractor; "
                              f"known: {sorted(REGISTRY['feature_extractor'])}")
        extractor = cls(**dict(config.get("init_args") or {}))
    else:
        cls = getattr(extractors, default_class)
        key = "backbone_weights" if default_class == "LPIPSAlex" else "name_or_path"
        extractor = cls(**{key: spec, **extra})
    extractor.configure()
    return extractor


def results_dir(model: str, out: str | None) -> Path:
    if out:
        return Path(out)
    path = Path(model)
    return path / "eval" if path.is_dir() else path.parent / "eval"


class Progress:
    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="item")

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self):
        self.bar.close()


def main(args: list[str]) -> dict:
    options = parser().parse_args(args)
    if options.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {options.batch_size}")
    from mmgen.inference.api import load_model

    if options.model_seed is not None:
        from lightning.pytorch import seed_everything

        seed_everything(options.model_seed, verbose=False)
    model = load_model(options.model, device=options.device)
    out = results_dir(options.model, options.out)
    from mmgen.evaluation import protocols

    run = getattr(protocols, options.task.replace("-", "_"))
    settings, baseline, data = run(model, options, out)
    from mmgen.evaluation.results import format_table, write_results

    if settings is None:  # a --shard run generates only
        print(f"shard {options.shard}: images cached under {out / options.task / 'generations'}")
        return {}
    recorded = {k: v for k, v in vars(options).items() if k not in ("task", "model", "data", "out")}
    path = write_results(out / f"{options.task}.json", options.task, str(options.model),
                         f"{type(model).__module__}.{type(model).__name__}", data, recorded, settings, baseline)
    print(format_table(options.task, f"{TITLES[options.task]} - {type(model).__name__}", settings, baseline))
    print(f"results: {path}")
    return json.loads(path.read_text())

