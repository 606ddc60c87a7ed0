"""What each method reaches on the toy world after at most 5 minutes of training (run by hand).

    OMP_NUM_THREADS=1 python benchmarks/bench_toy_world.py [--methods fromage,gill,minigpt5] [--json runs/toy_world.json]

Trains the shipped configs (configs/*_toy.yaml, shipped toy backbones frozen) in-process, each
under its 5-minute budget, then measures on the world's held-out data, every baseline measured in
the same run:

- FROMAGe: text-to-image recall@1 over the 128 held-out images (chance 1/128);
- GILL: images drawn from held-out captions through the trained mapper, read by the judge, beside
  the diffusion model's own images from the same captions (its text encoder, same seeds); and
  story context: the last step of held-out stories drawn from its text alone vs from the whole
  story (the last text names only what changed, so the shape comes from earlier steps), on stories
  drawn for the benchmark (GILL trains on captions only);
- MiniGPT-5 (stage 1 then stage 2): images drawn from "Generate an image with the scene
  description: <caption>", the vokens forced at the start of the answer, read by the judge.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmgen.cli import main  # noqa: E402
from mmgen.data import toy  # noqa: E402
from mmgen.toy import TOY_WORLD_DIR  # noqa: E402

WORLD = Path(".cache/mmgen-toy-world")
TRAIN = True
CHECKPOINT = "runs/minigpt5_stage2_toy/checkpoints/last.ckpt"  # what --no-train measures
STEPS, GUIDANCE = 25, 7.5  # mmgen's default sampler settings (DPM-Solver)


def fit(config: str) -> tuple[object, float]:
    start = time.perf_counter()
    cli = main(["fit", "--config", config])
    return cli, round(time.perf_counter() - start, 1)


def judge(images, targets) -> dict:
    from mmgen.toy.judge import judge_images, load_judge

    scores = judge_images(load_judge(TOY_WORLD_DIR / "judge"), images, targets)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}


def held_out(n: int) -> list[str]:
    from mmgen.toy.data import caption_pairs

    return caption_pairs(WORLD, "val")[1][:n]


def last_steps(n: int) -> tuple[list[str], list[str], list[toy.ToyScene]]:
    """(last step's text, whole story joined as the LMs read stories, last scene) of ``n`` stories
    drawn from a seed of their own. GILL never trains on stories (only captions), so any story is
    held out from it; the world's 16 validation stories were too few to tell the two apart."""
    import random

    rng = random.Random("bench-stories")
    alone, whole, scenes = [], [], []
    for _ in range(n):
        steps = toy.sample_story(rng)
        alone.append(steps[-1][0])
        whole.append(" . ".join(text for text, _ in steps))
        scenes.append(steps[-1][1])
    return alone, whole, scenes


def sd_from_true_captions(captions: list[str]) -> dict:
    from mmgen.components.stable_diffusion import StableDiffusion

    sd = StableDiffusion(name_or_path=str(TOY_WORLD_DIR / "sd"))
    sd.configure()
    images = sd.generate(sd.encode_captions(captions), None, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         seeds=list(range(len(captions))))
    return judge(images, captions)


def run_fromage() -> dict:
    cli, seconds = fit("configs/fromage_toy.yaml")
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return {"train_seconds": seconds, "steps": cli.trainer.global_step, "t2i_R@1": metrics.get("val/t2i_R@1"),
            "i2t_R@1": metrics.get("val/i2t_R@1"), "chance_R@1": metrics.get("val/chance_R@1")}


def run_gill(n: int) -> dict:
    cli, seconds = fit("configs/gill_toy.yaml")
    model = cli.model.eval()
    captions = held_out(n)
    draw = lambda prompts: model.generate_images(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE,  # noqa: E731
                                                 seeds=list(range(len(prompts))))
    result = {"train_seconds": seconds, "steps": cli.trainer.global_step,
              "t2i_R@1": round(float(cli.trainer.callback_metrics.get("val/t2i_R@1", float("nan"))), 4),
              "gill_from_captions": judge(draw(captions), captions),
              "sd_from_true_captions": sd_from_true_captions(captions)}
    alone, whole, scenes = last_steps(n)
    result["story_last_step_text_only"] = judge(draw(alone), scenes)
    result["story_whole_story"] = judge(draw(whole), scenes)
    return result


def run_minigpt5(n: int) -> dict:
    from transformers import LogitsProcessor

    from mmgen.inference.types import GeneratedImage

    if TRAIN:
        _, seconds1 = fit("configs/minigpt5_stage1_toy.yaml")
        cli, seconds2 = fit("configs/minigpt5_stage2_toy.yaml")
        model = cli.model.eval()
    else:  # measure the checkpoint an earlier run left
        from mmgen.methods.minigpt5 import MiniGPT5

        seconds1 = seconds2 = None
        model = MiniGPT5.load_from_checkpoint(CHECKPOINT).eval()
    first_voken = model.voken_ids[0]

    class StartWithVokens(LogitsProcessor):
        """Only [IMG0] at the first answer position (generate hands over the new tokens only);
        the engine completes the group."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == 0:
                forced = torch.full_like(scores, float("-inf"))
                forced[:, first_voken] = 0
                return forced
            return scores

    captions = held_out(n)
    conversations = [[f"Generate an image with the scene description: {c}"] for c in captions]
    answers = model.answer(conversations, mode="generate", seed=0, max_new_tokens=12,
                           logits_processors=[StartWithVokens()])
    images, targets = [], []
    for answer, caption in zip(answers, captions):
        drawn = [p for p in answer.parts if isinstance(p, GeneratedImage)]
        if drawn:
            images.append(drawn[0].image)
            targets.append(caption)
    result = {"train_seconds": [seconds1, seconds2], "answers_with_image": len(images), "n": len(captions)}
    if images:
        result["minigpt5_from_captions"] = judge(images, targets)
        result["sd_from_true_captions"] = sd_from_true_captions(captions)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="fromage,gill,minigpt5")
    parser.add_argument("--n", type=int, default=64, help="held-out captions / stories to draw")
    parser.add_argument("--json", default="runs/bench_toy_world.json")
    parser.add_argument("--no-train", action="store_true", help="MiniGPT-5: measure a checkpoint an earlier run left")
    parser.add_argument("--checkpoint", default=CHECKPOINT, help="with --no-train (stage 1's also answers)")
    options = parser.parse_args()
    TRAIN, CHECKPOINT = not options.no_train, options.checkpoint
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = {"threads": torch.get_num_threads()}
    for method in options.methods.split(","):
        start = time.perf_counter()
        results[method] = {"fromage": run_fromage, "gill": lambda: run_gill(options.n),
                           "minigpt5": lambda: run_minigpt5(options.n)}[method]()
        results[method]["total_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({method: results[method]}, indent=2))
    Path(options.json).parent.mkdir(parents=True, exist_ok=True)
    Path(options.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {options.json}")
