"""MiniGPT-5 training-step benchmark on CPU (or any device), at tiny and small size.

    python benchmarks/bench_minigpt5_step.py                 # both sizes, both stages
    python benchmarks/bench_minigpt5_step.py --size small --threads 2 --steps 5

One step = forward (LLM with images at <ImageHere>, mapper, SD UNet/VAE LDM loss, caption loss in
stage 1) + backward + AdamW step, batch of VIST-like samples (2 input images, 1 output image
each). Prints ms/step (median after one warm-up step) and trainable parameters. Random weights,
offline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mmgen  # noqa: E402,F401

SIZES = {
    # width of LLaMA / Q-Former / SD text encoder, layers, image side, mapper layers and heads
    "tiny": dict(llm=32, llm_layers=2, q=32, vision=32, image=32, sd=32, sd_channels=(32, 64), mapper_layers=1, heads=2, queries=4),
    "small": dict(llm=256, llm_layers=4, q=128, vision=128, image=64, sd=256, sd_channels=(64, 128), mapper_layers=4, heads=8, queries=32),
}


def build(size: str, adapter: str):
    from mmgen.components.causal_lm import CausalLM
    from mmgen.components.lora import LoRA
    from mmgen.components.prefix_tuning import PrefixTuning
    from mmgen.components.qformer import QFormerEncoder
    from mmgen.components.stable_diffusion import StableDiffusion, tiny_sd_config
    from mmgen.components.voken_mapper import VokenMapper
    from mmgen.methods.minigpt5 import MiniGPT5

    s = SIZES[size]
    llm = CausalLM(
        config=dict(model_type="llama", vocab_size=64, hidden_size=s["llm"], intermediate_size=2 * s["llm"],
                    num_hidden_layers=s["llm_layers"], num_attention_heads=4, num_key_value_heads=4,
                    max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                    tie_word_embeddings=False),
        tokenizer="mmgen:toy_tokenizer",
        adapter=LoRA(r=8, alpha=16, dropout=0.05) if adapter == "lora" else PrefixTuning(5, True, 64),
    )
    encoder = QFormerEncoder(config=dict(
        vision_config=dict(hidden_size=s["vision"], intermediate_size=2 * s["vision"], num_hidden_layers=2,
                           num_attention_heads=4, image_size=s["image"], patch_size=8),
        qformer_config=dict(hidden_size=s["q"], intermediate_size=2 * s["q"], num_hidden_layers=2,
                            num_attention_heads=4, cross_attention_frequency=2),
        num_query_tokens=s["queries"]))
    sd_config = tiny_sd_config(text_embed_dim=s["sd"], image_size=s["image"])
    sd_config["unet"]["block_out_channels"] = list(s["sd_channels"])
    sd_config["vae"]["block_out_channels"] = list(s["sd_channels"])
    generator = StableDiffusion(config=sd_config, tokenizer="mmgen:toy_tokenizer")
    mapper = VokenMapper(num_heads=s["heads"], num_encoder_layers=s["mapper_layers"], num_decoder_layers=s["mapper_layers"])
    model = MiniGPT5(llm, generator, encoder, mapper)
    model.configure_model()
    return model


def batch(n: int, image: int) -> dict:
    from mmgen.data.minigpt5_samples import IMAGE_IN_PROMPT, VOKEN_STRING

    g = torch.Generator().manual_seed(0)
    source = f"###Human: a red circle {IMAGE_IN_PROMPT} a blue square {IMAGE_IN_PROMPT} Tell me the next scene with image. ###Assistant:"
    return {
        "sources": [source] * n, "targets": [f"a green cross {VOKEN_STRING} ###"] * n,
        "captions": ["a green cross"] * n,
        "input_images": torch.rand(2 * n, 3, image, image, generator=g), "n_input_images": [2] * n,
        "output_images": torch.rand(n, 3, image, image, generator=g), "n_output_images": [1] * n,
    }


def bench(size: str, stage: str, adapter: str, batch_size: int, steps: int) -> dict:
    from mmgen.methods.optim import build_optimizer
    from mmgen.methods.stages import get_stage

    torch.manual_seed(0)
    model = build(size, adapter)
    model.stage = get_stage(stage)
    model.apply_stage(model.stage)
    optimizer = build_optimizer(model.parameter_groups(), model.optim, 1000)["optimizer"]
    data = batch(batch_size, SIZES[size]["image"])
    model.train()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model.compute_losses(data)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(size=size, stage=stage, adapter=adapter, batch=batch_size, ms=1000 * statistics.median(times[1:]),
                trainable=trainable, total=sum(p.numel() for p in model.parameters()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=[*SIZES, "all"], default="all")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'size':<6} {'stage':<5} {'adapter':<7} {'ms/step':>9} {'trainable':>11} {'total':>11}")
    for size in SIZES if args.size == "all" else [args.size]:
        for stage, adapter in (("uas", "lora"), ("mls", "lora"), ("mls", "prefix")):
            r = bench(size, stage, adapter, args.batch, args.steps)
            print(f"{r['size']:<6} {r['stage']:<5} {r['adapter']:<7} {r['ms']:>9.1f} {r['trainable']:>11,} {r['total']:>11,}")


if __name__ == "__main__":
    main()
