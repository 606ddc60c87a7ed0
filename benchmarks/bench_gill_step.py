"""GILL training step: mmgen's against the reference's way, in the same run on the same model.

    mmgen:  ONE text-only LLM forward serves retrieval and generation; the caption embeddings
            (the generation targets) are read from a caption-embedding cache.
    naive:  the reference's two text-only forwards (retrieval, generation) on identical inputs,
            and the SD text encoder run on the captions in every step.

Both steps do forward, backward and an AdamW step over the same trainable parameters and the same
batches; the timed steps alternate (naive, mmgen, naive, ...) so load on the machine hits both
alike. Weights are random (no download): only the shapes matter for timing.

    python benchmarks/bench_gill_step.py                 # "small": CPU-sized LLM, real-size SD text encoder and mapper
    python benchmarks/bench_gill_step.py --preset tiny   # the tiny test sizes
    python benchmarks/bench_gill_step.py --preset full --device cuda   # OPT-6.7B + CLIP ViT-L + SD v1.5 (GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mmgen  # noqa: E402,F401
import torch  # noqa: E402

from mmgen.components.causal_lm import CausalLM  # noqa: E402
from mmgen.components.clip_vision import CLIPVisionEncoder  # noqa: E402
from mmgen.components.gill_mapper import GILLMapper  # noqa: E402
from mmgen.components.retrieval_head import RetrievalHead  # noqa: E402
from mmgen.components.stable_diffusion import StableDiffusion, tiny_sd_config  # noqa: E402
from mmgen.components.visual_prefix import LinearVisualPrefix  # noqa: E402
from mmgen.data.caption_cache import CaptionCache, write_caption_cache  # noqa: E402
from mmgen.data.toy import CAPTION_TEMPLATE, TOY_COLORS, TOY_SHAPES  # noqa: E402
from mmgen.methods.gill import GILL  # noqa: E402

TOY = "mmgen:toy_tokenizer"


def build(preset: str) -> tuple[GILL, int]:
    """(model, image size)."""
    if preset == "full":
        model = GILL(
            llm=CausalLM("facebook/opt-6.7b", random_weights=True, dtype="bfloat16", tokenizer=TOY),
            visual_encoder=CLIPVisionEncoder("openai/clip-vit-large-patch14", random_weights=True, dtype="bfloat16"),
            image_generator=StableDiffusion("runwayml/stable-diffusion-v1-5", random_weights=True,
                                            tokenizer=TOY, dtype="float16"),
        )
        return model, 224
    if preset == "tiny":
        llm = dict(model_type="opt", vocab_size=64, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128,
                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=80,
                   pad_token_id=0, bos_token_id=1, eos_token_id=1)
        clip = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8)
        sd = StableDiffusion(config=tiny_sd_config(), tokenizer=TOY)
        mapper = GILLMapper(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128)
        size = 32
    else:  # small: a CPU-sized LLM; SD v1.5's text encoder and the mapper at their real sizes
        llm = dict(model_type="opt", vocab_size=64, hidden_size=512, word_embed_proj_dim=512, ffn_dim=2048,
                   num_hidden_layers=4, num_attention_heads=8, max_position_embeddings=80,
                   pad_token_id=0, bos_token_id=1, eos_token_id=1)
        clip = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=64, patch_size=16)
        sd = StableDiffusion("runwayml/stable-diffusion-v1-5", random_weights=True, tokenizer=TOY)
        mapper = GILLMapper()
        size = 64
    model = GILL(
        llm=CausalLM(config=llm, tokenizer=TOY), visual_encoder=CLIPVisionEncoder(config=clip),
        image_generator=sd, visual_prefix=LinearVisualPrefix(4), retrieval_head=RetrievalHead(256),
        gen_mapper=mapper,
    )
    return model, size


def captions_for(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    return [CAPTION_TEMPLATE.format(color=pick(TOY_COLORS), shape=pick(TOY_SHAPES), bg_color=pick(TOY_COLORS))
            for _ in range(n)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "small", "full"], default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, size = build(args.preset)
    model.configure_model()  # precomputed_captions=False: the naive step needs the text encoder
    model.to(args.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    n_batches = args.warmup + args.steps
    captions = captions_for(n_batches * args.batch_size)
    images = torch.rand(n_batches * args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:  # the cache the mmgen step reads from
        write_caption_cache(tmp, captions, model.image_generator.encode_captions,
                            generator=model.image_generator.identity,
                            text_embed_dim=model.image_generator.text_embed_dim, batch_size=args.batch_size)
        cache = CaptionCache(tmp)

        def step(variant: str, i: int) -> float:
            rows = range(i * args.batch_size, (i + 1) * args.batch_size)
            batch_images, batch_captions = images[rows.start:rows.stop].to(args.device), captions[rows.start:rows.stop]
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            if variant == "mmgen":
                cached = cache.get(rows).to(args.device)
                loss = model.compute_losses(batch_images, batch_captions, cached)[0]["loss"]
            else:
                # the reference's way: two text-only forwards, caption targets encoded every step
                loss = model.compute_losses(batch_images, batch_captions, share_text_forward=False)[0]["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - start

        times = {"naive": [], "mmgen": []}
        for i in range(n_batches):
            for variant in ("naive", "mmgen") if i % 2 == 0 else ("mmgen", "naive"):
                seconds = step(variant, i)
                if i >= args.warmup:
                    times[variant].append(seconds)

    naive, ours = statistics.median(times["naive"]), statistics.median(times["mmgen"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "preset": args.preset, "device": args.device, "batch_size": args.batch_size, "steps": args.steps,
        "trainable_parameters": trainable, "naive_s": naive, "mmgen_s": ours, "speedup": naive / ours,
        "naive_all_s": times["naive"], "mmgen_all_s": times["mmgen"],
    }
    print(f"GILL training step, preset {args.preset}, batch {args.batch_size}, {args.device}, "
          f"{trainable / 1e6:.2f}M trainable; median of {args.steps} steps each")
    print(f"  naive (two text forwards + SD text encoder each step): {naive * 1000:8.1f} ms")
    print(f"  mmgen (one shared text forward + caption cache):       {ours * 1000:8.1f} ms")
    print(f"  ratio naive / mmgen: {naive / ours:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
