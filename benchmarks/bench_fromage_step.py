"""FROMAGe training-step benchmark: mmgen vs the reference's way of training the [RET] row.

The reference trains new token rows by making the WHOLE embedding matrix trainable and zeroing
the gradient of every other row; AdamW then keeps state for the whole matrix and its weight decay
still moves frozen rows. mmgen trains the new rows alone (peft trainable tokens). Both variants
run the same FROMAGe step (captioning + retrieval forwards, contrastive loss, AdamW step) on
random weights, each in its own process so peak memory is its own.

    python benchmarks/bench_fromage_step.py                 # tiny and OPT-125M + CLIP ViT-B/32
    python benchmarks/bench_fromage_step.py --sizes tiny --steps 20

Prints samples/s and peak memory (CUDA: max allocated; CPU: peak RSS of the process) per variant,
and the mmgen/reference ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    "tiny": dict(
        llm=dict(config=dict(model_type="opt", vocab_size=64, hidden_size=64, word_embed_proj_dim=64,
                             ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1),
                 tokenizer="mmgen:toy_tokenizer"),
        clip=dict(config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8)),
        batch=16, image_size=32,
    ),
    "base": dict(  # OPT-125M + CLIP ViT-B/32 architectures, random weights, a 50265-word tokenizer
        llm=dict(name_or_path="facebook/opt-125m", random_weights=True, tokenizer=50265),
        clip=dict(name_or_path="openai/clip-vit-base-patch32", random_weights=True),
        batch=4, image_size=224,
    ),
}


def _build(size: str, variant: str, device: str):
    import torch

    import mmgen  # noqa: F401
    from mmgen.components.causal_lm import CausalLM
    from mmgen.components.clip_vision import CLIPVisionEncoder
    from mmgen.methods.fromage import FROMAGe
    from mmgen.methods.optim import Optim, build_optimizer

    spec = SIZES[size]
    llm_args = dict(spec["llm"])
    if isinstance(llm_args["tokenizer"], int):  # no real tokenizer offline: one of OPT's size
        from mmgen.data.toy_tokenizer import build_toy_tokenizer

        folder = Path(tempfile.mkdtemp()) / "tokenizer"
        build_toy_tokenizer(vocab_size=llm_args["tokenizer"]).save_pretrained(folder)
        llm_args["tokenizer"] = str(folder)
    model = FROMAGe(CausalLM(**llm_args), CLIPVisionEncoder(**spec["clip"]), pack_probability=0.0)
    model.configure_model()
    if variant == "reference":
        # The reference: the whole (tied) matrix trains; a hook zeroes all but the [RET] row's grad.
        base = model.llm.model.get_base_model()
        weight = base.get_input_embeddings().base_layer.weight
        weight.requires_grad_(True)
        keep = torch.zeros(weight.shape[0], 1)
        keep[model.llm.new_token_ids] = 1
        weight.register_hook(lambda grad: grad * keep.to(grad))
    model.to(device).train()
    optim = Optim(lr=3e-4, weight_decay=0.01, warmup_steps=0)
    optimizer = build_optimizer(model.parameter_groups(), optim, 1000)["optimizer"]
    if variant == "reference":  # one group with weight decay on everything, as the reference
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4,
                                      betas=(0.9, 0.95), weight_decay=0.01)
    return model, optimizer, spec


def _run(size: str, variant: str, steps: int, device: str, queue) -> None:
    import torch

    torch.manual_seed(0)
    model, optimizer, spec = _build(size, variant, device)
    captions = ["a red circle on a blue background", "a green square on a white background"] * (spec["batch"] // 2)
    images = torch.rand(spec["batch"], 3, spec["image_size"], spec["image_size"], device=device)

    def step():
        losses, _, _ = model.compute_losses(images, captions)
        losses["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    seconds = time.perf_counter() - start
    state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    queue.put(dict(samples_per_s=steps * spec["batch"] / seconds, peak_mib=peak, optimizer_state=state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 tiny, 5 base)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    print(f"device: {args.device}")
    print(f"{'size':<6} {'variant':<10} {'samples/s':>10} {'peak MiB':>10} {'optim state':>12}")
    for size in args.sizes:
        steps = args.steps or (30 if size == "tiny" else 5)
        results = {}
        for variant in ("mmgen", "reference"):
            queue = context.Queue()
            process = context.Process(target=_run, args=(size, variant, steps, args.device, queue))
            process.start()
            results[variant] = queue.get()
            process.join()
            r = results[variant]
            print(f"{size:<6} {variant:<10} {r['samples_per_s']:>10.1f} {r['peak_mib']:>10.0f} {r['optimizer_state']:>12,}")
        m, ref = results["mmgen"], results["reference"]
        print(f"{size:<6} ratio mmgen/reference: speed x{m['samples_per_s'] / ref['samples_per_s']:.2f}, "
              f"peak memory x{m['peak_mib'] / ref['peak_mib']:.2f}, "
              f"optimizer state x{m['optimizer_state'] / ref['optimizer_state']:.4f}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
