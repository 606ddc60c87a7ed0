"""``mmgen toy pretrain``: rebuild every toy-world backbone, deterministically, timing each stage.

    world      the generated world (captions, stories, dialogues) in .cache/, not shipped
    tokenizer  the world's word-level tokenizer (LM-shaped; the CLIP-shaped copy goes with clip/)
    clip       CLIPModel               (visual encoder of FROMAGe/GILL; text encoder of the diffusion model)
    opt        OPT-style causal LM     (FROMAGe, GILL; its caption probe reads clip/'s image features)
    llama      LLaMA-style causal LM   (MiniGPT-5)
    qformer    BLIP-2 Q-Former         (MiniGPT-5's visual encoder), then MiniGPT-4's llama_proj onto llama/
    judge      the shape/colour classifier that scores generated images   (mmgen.toy.judge)
    sd         latent diffusion model conditioned on clip's text tower    (mmgen.toy.diffusion)

Each backbone is written with ``save_pretrained`` to ``<out>/<name>/``; ``<out>/pretrain.json``
records, per stage, the seconds it took and the backbone's own quality on held-out data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from mmgen.toy import TOY_WORLD_DIR

STAGES = ("world", "tokenizer", "clip", "opt", "llama", "qformer", "judge", "sd")
# Stages that run side by side with ``jobs=2``, once the stages before them are done: each reads
# only what the common start (world, tokenizer, clip) and the earlier stages of its own lane wrote.
LANES = (("opt", "llama", "qformer"), ("judge", "sd"))
RECORD = "pretrain.json"

# Sizes of the world and of each training run. ``quick`` (tests) shrinks every one of them.
FULL = dict(n_captions=4096, n_stories=384, n_dialogues=384, n_val=128, lm_steps=3000, clip_steps=800,
            qformer_steps=600, projection_steps=400, judge_steps=600)
QUICK = dict(n_captions=256, n_stories=16, n_dialogues=16, n_val=32, lm_steps=10, clip_steps=10,
             qformer_steps=5, projection_steps=5, judge_steps=20)  # the judge warms up over a tenth: >= 2 steps


def pretrain(out: Path = TOY_WORLD_DIR, world: Path = Path(".cache/mmgen-toy-world"), seed: int = 0,
             stages: tuple[str, ...] = STAGES, quick: bool = False, log=print, jobs: int = 1) -> dict:
    """Run ``stages`` (in STAGES order; later ones read what earlier ones saved in ``out``) and
    return the record written to ``out/pretrain.json`` (merged with the stages not rerun).

    ``jobs=2`` runs the two LANES in two processes after the common start, each stage with the
    seed and thread count it has alone, so the files are the same as from one process."""
    if jobs > 1:
        return _pretrain_in_lanes(out, world, seed, stages, quick, log)
    from mmgen.data.toy import write_toy_world
    from mmgen.data.toy_tokenizer import build_world_tokenizer
    from mmgen.toy import clip, language, qformer
    from mmgen.toy.data import caption_pairs, language_texts

    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    sizes = QUICK if quick else FULL
    out, world = Path(out), Path(world)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / RECORD
    record = dict(seed=seed, quick=quick, sizes=sizes, torch_threads=torch.get_num_threads(), jobs=1)
    ran = {}  # this run's stages: only these replace what the record on disk holds
    tokenizer = build_world_tokenizer()
    clip_tokenizer = build_world_tokenizer(clip=True)
    write_world = lambda: write_toy_world(world, sizes["n_captions"], sizes["n_stories"], sizes["n_dialogues"],  # noqa: E731
                                          sizes["n_val"], image_size=32, seed=seed)

    def pairs(split):
        write_world()  # a no-op when the world on disk matches
        return caption_pairs(world, split)

    def run_world():
        write_world()
        return {"root": str(world)}

    def run_tokenizer():
        tokenizer.save_pretrained(out / "tokenizer")
        return {"words": len(tokenizer)}

    def run_lm(family):
        write_world()
        result = language.train_lm(family, tokenizer, language_texts(world, "train"), out / family,
                                   steps=sizes["lm_steps"], seed=seed, log=log)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out / family)
        result["val_caption_perplexity"] = round(language.perplexity(model, tokenizer, pairs("val")[1]), 3)
        result["val_text_perplexity"] = round(
            language.perplexity(model, tokenizer, language_texts(world, "val", restatements=0)), 3)
        result["val_answer_accuracy"] = language.answer_accuracy(model, tokenizer, pairs("val")[1])
        if not quick:  # does the state at a caption's end carry it (FROMAGe's [RET] reads it there)?
            result["val_caption_probe"] = language.caption_probe_recall(model, tokenizer, world, out / "clip")
        return result

    def run_clip():
        images, captions = pairs("train")
        result = clip.train_clip(clip_tokenizer, images, captions, out / "clip", steps=sizes["clip_steps"],
                                 seed=seed, log=log)
        from transformers import CLIPModel

        from mmgen.data.toy import parse_caption

        model = CLIPModel.from_pretrained(out / "clip").eval()
        val_images, val_captions = pairs("val")
        result["zero_shot"] = clip.zero_shot_accuracy(model, clip_tokenizer, val_images,
                                                      [parse_caption(c) for c in val_captions])
        result["val_t2i_R@1"] = clip.retrieval_r1(model, clip_tokenizer, val_images, val_captions)
        result["val_n"] = len(val_captions)
        return result

    def run_qformer():
        images, captions = pairs("train")
        result = qformer.train_qformer(tokenizer, images, captions, out / "qformer", steps=sizes["qformer_steps"],
                                       seed=seed, log=log)
        from transformers import Blip2ForImageTextRetrieval

        model = Blip2ForImageTextRetrieval.from_pretrained(out / "qformer").eval()
        val_images, val_captions = pairs("val")
        result["val_t2i_R@1"] = qformer.retrieval_r1(model, tokenizer, val_images, val_captions)
        # MiniGPT-4's first stage: the llama_proj MiniGPT-5 loads frozen, from the llama/ LM
        from mmgen.toy.projection import PROJECTION_FILE, caption_loss, train_projection

        result["llama_proj"] = train_projection(out / "qformer", out / "llama", images, captions,
                                                out / "qformer" / PROJECTION_FILE,
                                                steps=sizes["projection_steps"], seed=seed, log=log)
        if not quick:  # the held-out captions' loss through it, against a random projection's
            result["llama_proj"]["val_caption_loss"] = caption_loss(
                out / "qformer", out / "llama", val_images, val_captions, out / "qformer" / PROJECTION_FILE)
            result["llama_proj"]["val_caption_loss_random_projection"] = caption_loss(
                out / "qformer", out / "llama", val_images, val_captions, None)
        return result

    def run_judge():
        from mmgen.toy.judge import train_judge

        _, result = train_judge(out / "judge", seed=seed, steps=sizes["judge_steps"],
                                **({"n_train": 512, "n_val": 64} if quick else {}))
        return result

    def run_sd():
        # The latent diffusion model: VAE + UNet conditioned on clip/'s text tower, as SD; then its
        # own rate of correct images from true captions (the reference the methods are held to).
        from mmgen.toy.diffusion import evaluate_diffusion, train_latent_diffusion
        from mmgen.toy.judge import load_judge

        if quick:
            return train_latent_diffusion(out / "sd", clip_dir=out / "clip", seed=seed, log=log, n_train=256,
                                          vae_steps=5, unet_steps=5)
        judge = load_judge(out / "judge")  # also judges samples along the way: the UNet's learning curve
        result = train_latent_diffusion(out / "sd", clip_dir=out / "clip", seed=seed, log=log, judge=judge,
                                        check_every=500)
        result["judged_from_true_captions"] = evaluate_diffusion(out / "sd", judge, n=120)
        return result

    runners = {"world": run_world, "tokenizer": run_tokenizer, "opt": lambda: run_lm("opt"),
               "llama": lambda: run_lm("llama"), "clip": run_clip, "qformer": run_qformer, "judge": run_judge,
               "sd": run_sd}
    total = time.perf_counter()
    for stage in STAGES:
        if stage not in stages:
            continue
        log(f"[toy pretrain] {stage} ...")
        start = time.perf_counter()
        torch.manual_seed(seed)
        result = runners[stage]() or {}
        result = {k: v for k, v in result.items() if _jsonable(v)}
        result["stage_seconds"] = round(time.perf_counter() - start, 1)
        ran[stage] = result
        log(f"[toy pretrain] {stage} done in {result['stage_seconds']} s: "
            f"{json.dumps({k: v for k, v in result.items() if k != 'stage_seconds'})}")
        _save(record_path, record, ran)  # after each stage
    return _save(record_path, {**record, "last_run_seconds": round(time.perf_counter() - total, 1)}, ran)


def _pretrain_in_lanes(out: Path, world: Path, seed: int, stages: tuple[str, ...], quick: bool, log) -> dict:
    """The common start here, then LANES[0] in a second process while LANES[1] runs here."""
    import multiprocessing

    start = time.perf_counter()
    lanes = [tuple(s for s in lane if s in stages) for lane in LANES]
    pretrain(out, world, seed, tuple(s for s in stages if not any(s in lane for lane in LANES)), quick, log)
    if not lanes[0]:
        return pretrain(out, world, seed, lanes[1], quick, log)
    side = multiprocessing.get_context("spawn").Process(
        target=_run_lane, args=(out, world, seed, lanes[0], quick, torch.get_num_threads()))
    side.start()
    try:
        pretrain(out, world, seed, lanes[1], quick, log)
    finally:
        side.join()
    if side.exitcode != 0:
        raise RuntimeError(f"the toy pretraining of {', '.join(lanes[0])} failed (exit code {side.exitcode}); "
                           "its output is above")
    return _save(Path(out) / RECORD, {"jobs": 2, "last_run_seconds": round(time.perf_counter() - start, 1)}, {})


def _run_lane(out: Path, world: Path, seed: int, stages: tuple[str, ...], quick: bool, threads: int) -> None:
    torch.set_num_threads(threads)
    pretrain(out, world, seed, stages, quick)


def _save(path: Path, record: dict, ran: dict) -> dict:
    """Update the record on disk with ``record``'s fields and the stages this run ``ran``, keeping
    the other stages (another run's, or the other lane's, written meanwhile: hence the lock)."""
    from filelock import FileLock

    with FileLock(f"{path}.lock"):
        on_disk = json.loads(path.read_text()) if path.is_file() else {}
        merged = {**on_disk, **record, "stages": {**on_disk.get("stages", {}), **ran}}
        path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return merged


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False
