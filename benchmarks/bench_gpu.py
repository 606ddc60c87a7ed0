"""GPU training-step benchmark: FROMAGe, GILL and MiniGPT-5 at full size with random weights, bf16,
mmgen's step against the reference's algorithm in the same run on the same model.

    python benchmarks/bench_gpu.py                           # full size on cuda; sized for < 8 min on an H100/H200
    python benchmarks/bench_gpu.py --methods gill --steps 10
    python benchmarks/bench_gpu.py --preset tiny --device cpu  # the same code at tiny size (tested)

Nothing is downloaded: each model is built from the bundled architecture configs with random
weights directly on the device (``mmgen.components.hub.random_weights_only`` under
``torch.device``); tokenizers are word-level stand-ins with the real vocabulary sizes (OPT 50265,
LLaMA 32000), so embedding and LM-head costs are those of the real models. Only shapes matter for
time and memory. Batches are the published per-GPU micro-batches (FROMAGe 180, GILL 100,
MiniGPT-5 6) of captions long enough to fill ``max_text_length``.

Variants, timed on the same model:

    mmgen      the method's own step: new token rows as their own parameters (AdamW state for
               those rows only); GILL shares one text-only LLM forward between retrieval and
               generation when their packing coins agree (the coins are drawn as in training).
    reference  the reference code's algorithm: the whole embedding (and untied LM head) matrix
               trains with a gradient mask keeping the new rows (AdamW state and decay for the
               whole matrix), every LLM forward's hidden states kept until backward, and GILL's
               three LLM forwards per example.

Columns: step time (median of the timed steps, after warm-up, CUDA-synchronised), samples/s,
TFLOP per step (counted by ``torch.utils.flop_counter.FlopCounterMode`` over one step: the
matrix products, convolutions and attention kernels actually executed, forward and backward; a
frozen layer's backward computes only the gradient of its input, so it counts 2 x params x tokens
forward plus 2 x params x tokens backward where a gradient flows, and nothing where none does;
GILL's mmgen step: the mean of a step whose packing coins agree and one where they differ),
MFU (the mmgen step's counted FLOPs / step time / the GPU's dense bf16 peak: the reference
variant's extra work is not useful work), peak memory (``torch.cuda.max_memory_allocated`` over
the variant's steps, optimizer state included) and the memory plan's estimate for the same run
(``mmgen.memory``). ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mmgen  # noqa: E402,F401
import torch  # noqa: E402

METHODS = ("fromage", "gill", "minigpt5")
# Dense bf16 tensor-core peaks (TFLOP/s) by device name; --peak-tflops for others.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 154.8, "L4": 121.0}
BATCH = {"full": {"fromage": 180, "gill": 100, "minigpt5": 6}, "tiny": {"fromage": 4, "gill": 4, "minigpt5": 2}}

TINY_OPT = dict(model_type="opt", vocab_size=64, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512,
                pad_token_id=0, bos_token_id=1, eos_token_id=1)
TINY_LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=32, patch_size=8)


# -- models --------------------------------------------------------------------------------------
_TOKENIZERS: dict[int, str] = {}


def tokenizer_of_size(vocab_size: int) -> str:
    """A word-level tokenizer folder with ``vocab_size`` words (a real vocabulary's size)."""
    if vocab_size not in _TOKENIZERS:
        from mmgen.data.toy_tokenizer import build_toy_tokenizer

        folder = Path(tempfile.mkdtemp(prefix="mmgen-bench-")) / f"tokenizer{vocab_size}"
        build_toy_tokenizer(vocab_size=vocab_size).save_pretrained(folder)
        _TOKENIZERS[vocab_size] = str(folder)
    return _TOKENIZERS[vocab_size]


def build(method: str, preset: str):
    """The method's model, not yet configured (built later on the device or the meta device)."""
    from mmgen.components.causal_lm import CausalLM
    from mmgen.components.clip_vision import CLIPVisionEncoder
    from mmgen.components.gill_mapper import GILLMapper
    from mmgen.components.lora import LoRA

    full = preset == "full"
    if method in ("fromage", "gill"):
        if full:
            llm = CausalLM("facebook/opt-6.7b", random_weights=True, dtype="bfloat16", tokenizer=tokenizer_of_size(50265))
            clip = CLIPVisionEncoder("openai/clip-vit-large-patch14", random_weights=True, dtype="bfloat16")
        else:
            llm = CausalLM(config=dict(TINY_OPT), tokenizer="mmgen:toy_tokenizer")
            clip = CLIPVisionEncoder(config=dict(TINY_CLIP))
        if method == "fromage":
            from mmgen.methods.fromage import FROMAGe

            return FROMAGe(llm, clip)
        from mmgen.methods.gill import GILL

        mapper = GILLMapper(out_dim=768) if full else GILLMapper(d_model=32, nhead=4, num_encoder_layers=1,
                                                                 num_decoder_layers=1, dim_feedforward=64, out_dim=32)
        return GILL(llm, clip, gen_mapper=mapper, precomputed_captions=True)  # targets from a cache, as the reference
    from mmgen.components.qformer import QFormerEncoder
    from mmgen.components.stable_diffusion import StableDiffusion, tiny_sd_config
    from mmgen.components.voken_mapper import VokenMapper
    from mmgen.methods.minigpt5 import MiniGPT5

    adapter = LoRA(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    if full:
        llm = CausalLM("Vision-CAIR/vicuna-7b", random_weights=True, dtype="bfloat16",
                       tokenizer=tokenizer_of_size(32000), adapter=adapter)
        encoder = QFormerEncoder("Salesforce/blip2-flan-t5-xxl", random_weights=True, dtype="bfloat16")
        generator = StableDiffusion("stabilityai/stable-diffusion-2-1-base", random_weights=True,
                                    tokenizer="mmgen:toy_tokenizer", dtype="bfloat16")
        mapper = VokenMapper()
    else:
        llm = CausalLM(config=dict(TINY_LLAMA), tokenizer="mmgen:toy_tokenizer", adapter=adapter)
        encoder = QFormerEncoder(config=dict(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8),
            qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                cross_attention_frequency=2),
            num_query_tokens=4))
        generator = StableDiffusion(config=tiny_sd_config(), tokenizer="mmgen:toy_tokenizer")
        mapper = VokenMapper(num_heads=2, num_encoder_layers=1, num_decoder_layers=1)
    model = MiniGPT5(llm, generator, encoder, mapper)
    _choose_stage(model, "mls")  # stage 2: LoRA, vokens and mapper transformer train
    return model


def _choose_stage(model, name: str) -> None:
    from mmgen.methods.stages import get_stage

    model.stage = get_stage(name)  # configure_model applies it


def configure_on(model, device) -> None:
    """Build ``model`` with random weights directly on ``device`` ("meta": shapes only)."""
    from mmgen.components.hub import random_weights_only

    with random_weights_only(), torch.device(device):
        model.configure_model()
    if str(device) != "meta":
        model.to(device)


# -- batches and steps ---------------------------------------------------------------------------
def long_caption(words: int) -> str:
    base = "a red circle on a blue background next to a green square".split()
    return " ".join(base[i % len(base)] for i in range(words))


def make_step(method: str, model, batch_size: int, device: str, variant: str, seed: int = 0):
    """(forward, tokens, flop cases): ``forward(**case)`` runs one forward of ``variant`` and
    returns the loss; ``tokens`` per LLM sequence where the method has no fixed length (for the
    memory plan); the FLOP count averages ``forward`` over the cases (GILL's packing coins agree
    in half the steps, when mmgen's step runs 2 LLM forwards instead of 3)."""
    g = torch.Generator().manual_seed(seed)
    share = variant == "mmgen"
    if method in ("fromage", "gill"):
        size = _vision_image_size(model.visual_encoder) or 224
        images = torch.rand(batch_size, 3, size, size, generator=g).to(device)
        captions = [long_caption(60)] * batch_size  # cut at max_text_length: the full sequence
        coins = torch.Generator().manual_seed(seed)

        def coin():
            return bool(torch.rand((), generator=coins) < model.pack_probability)

        if method == "fromage":
            return (lambda: model.compute_losses(images, captions, pack=coin())[0]["loss"]), None, [{}]
        embeds = torch.randn(batch_size, 77, model.gen_mapper.out_dim, generator=g).to(device)

        def forward(packs=None):
            packs = packs or (coin(), coin(), coin())  # caption, retrieval, generation: as in training
            return model.compute_losses(images, captions, embeds, pack_caption=packs[0], pack_ret=packs[1],
                                        pack_gen=packs[2], share_text_forward=share)[0]["loss"]

        return forward, None, [{"packs": (False, False, False)}, {"packs": (False, False, True)}]
    from mmgen.data.interleave import collate
    from mmgen.data.minigpt5_samples import IMAGE_IN_PROMPT, VOKEN_STRING

    n_in = 4  # VIST: four history images, one image to generate
    history = "".join(f"{long_caption(30)} {IMAGE_IN_PROMPT} " for _ in range(n_in))
    size_in = _vision_image_size(model.visual_encoder) or 224
    side = model.generator.image_size
    batch = {
        "sources": [f"###Human: {history} Tell me the next scene with image. ###Assistant:"] * batch_size,
        "targets": [f"{long_caption(20)} {VOKEN_STRING} ###"] * batch_size,
        "captions": [long_caption(20)] * batch_size,
        "input_images": torch.rand(n_in * batch_size, 3, size_in, size_in, generator=g).to(device),
        "n_input_images": [n_in] * batch_size,
        "output_images": torch.rand(batch_size, 3, side, side, generator=g).to(device),
        "n_output_images": [1] * batch_size,
    }
    sequences = [model.source_segments(s) + model.target_segments(t) for s, t in zip(batch["sources"], batch["targets"])]
    tokens = collate(sequences, 0, "cpu").input_ids.shape[1]
    return (lambda: model.compute_losses(batch)["loss"]), tokens, [{}]


def _vision_image_size(encoder) -> int | None:
    for module in encoder.modules():
        config = getattr(module, "config", None)
        config = getattr(config, "vision_config", None) or config
        if hasattr(config, "image_size") and hasattr(config, "patch_size"):
            return int(config.image_size)
    return None


class ReferenceWay:
    """Turns a configured mmgen model into the reference's algorithm (same weights): the whole
    token matrices train under a row mask, and every LLM forward's hidden states are kept."""

    def __init__(self, model):
        self.model = model
        self.kept: list = []
        llm = model.llm
        self.matrices, self.handles = [], []
        for layer in llm._token_layers() if hasattr(llm, "_token_layers") else []:
            weight = layer.base_layer.weight
            if weight.requires_grad:
                continue
            weight.requires_grad_(True)
            keep = torch.zeros(weight.shape[0], 1, device=weight.device, dtype=weight.dtype)
            keep[llm.new_token_ids] = 1
            self.handles.append(weight.register_hook(lambda grad, keep=keep: grad * keep))
            self.matrices.append(weight)
        self.hook = llm.model.register_forward_hook(self._keep_hidden_states)

    def _keep_hidden_states(self, module, args, output):
        hidden = getattr(output, "hidden_states", None)
        if hidden is not None:
            self.kept.append(hidden)  # the reference keeps the whole tuple until backward

    def after_step(self):
        self.kept.clear()

    def optimizer(self, optim):
        params = [p for p in self.model.parameters() if p.requires_grad]  # one group, decay on all
        return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                 weight_decay=optim.weight_decay)

    def close(self):
        self.hook.remove()
        for handle in self.handles:
            handle.remove()
        for weight in self.matrices:
            weight.requires_grad_(False)
            weight.grad = None


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_variant(method, model, variant, args, batch_size):
    from mmgen.methods.optim import build_optimizer

    device = args.device
    reference = ReferenceWay(model) if variant == "reference" else None
    optimizer = reference.optimizer(model.optim) if reference else build_optimizer(model, model.optim, 1000)["optimizer"]
    forward, tokens, flop_cases = make_step(method, model, batch_size, device, variant)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16-mixed")
    model.train()

    def step(**case):
        with autocast:
            loss = forward(**case)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if reference:
            reference.after_step()

    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if str(device).startswith("cuda") else None
    counts = [count_flops(lambda: step(**case)) for case in flop_cases]
    flops = None if None in counts else sum(counts) / len(counts)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    if reference:
        reference.close()
    del optimizer
    median = statistics.median(times)
    return {"variant": variant, "step_s": median, "steps_s": times, "samples_per_s": batch_size / median,
            "peak_bytes": peak, "flops": flops, "optimizer_state_bytes": state, "tokens": tokens}


def count_flops(step) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        return float(counter.get_total_flops())
    except Exception as error:  # a kernel without a FLOP formula must not cost the table
        print(f"  FLOP count failed: {type(error).__name__}: {error}")
        return None


def memory_estimate(method, preset, batch_size, precision, tokens) -> float | None:
    from mmgen.memory import Setting, memory_plan

    try:
        planned = build(method, preset)
        configure_on(planned, "meta")
        return memory_plan(planned, Setting(precision=precision, micro_batch=batch_size, tokens=tokens)).total
    except Exception as error:
        print(f"  memory plan failed: {type(error).__name__}: {error}")
        return None


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not str(args.device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def bench_method(method, args) -> list[dict]:
    batch_size = args.batch_size or BATCH[args.preset][method]
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build(method, args.preset)
    configure_on(model, args.device)
    build_s = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for variant in ("mmgen", "reference"):
        rows.append(run_variant(method, model, variant, args, batch_size))
    del model
    if str(args.device).startswith("cuda"):
        torch.cuda.empty_cache()
    estimate = memory_estimate(method, args.preset, batch_size, args.precision, rows[0]["tokens"])
    useful = rows[0]["flops"]
    peak = peak_tflops(args)
    for row in rows:
        row.update(method=method, batch_size=batch_size, build_s=build_s, parameters=total, trainable=trainable,
                   planned_bytes=estimate,
                   mfu=(useful / row["step_s"] / (peak * 1e12)) if (useful and peak) else None)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    def gib(x):
        return f"{x / 2**30:.3g}" if x is not None else "n/a"

    lines = [header, "",
             "| method | variant | micro-batch | step s | samples/s | TFLOP/step | MFU | peak GiB | planned GiB | AdamW state GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | skipped: {r['skipped']} |  |  |  |  |  |  |  |  |")
            continue
        tflop = f"{r['flops'] / 1e12:.3g}" if r["flops"] else "n/a"
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] else "n/a"
        lines.append(f"| {r['method']} | {r['variant']} | {r['batch_size']} | {r['step_s']:.3f} | "
                     f"{r['samples_per_s']:.1f} | {tflop} | {mfu} | {gib(r['peak_bytes'])} | "
                     f"{gib(r['planned_bytes'])} | {gib(r['optimizer_state_bytes'])} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["full", "tiny"], default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch-size", type=int, help="per GPU (default: the published micro-batch)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 5 full, 2 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default: 2 full, 1 tiny)")
    parser.add_argument("--precision", choices=["bf16-mixed", "32"], default="bf16-mixed")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip the methods not started within this many seconds (default 420)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (5 if args.preset == "full" else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.preset == "full" else 1)

    device_name = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {device_name}, preset {args.preset}, {args.precision}")
    start = time.perf_counter()
    rows: list[dict] = []
    for method in args.methods:
        if time.perf_counter() - start > args.budget_s:
            rows.append({"method": method, "skipped": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        if method == "minigpt5":
            try:
                import diffusers  # noqa: F401
            except ImportError:
                rows.append({"method": method, "skipped": "diffusers is not installed (the SD UNet of the LDM loss)"})
                print(f"{method}: skipped, diffusers is not installed")
                continue
        print(f"{method}: building and running ...", flush=True)
        try:
            new = bench_method(method, args)
        except torch.OutOfMemoryError as error:  # leaving the block frees the model (the traceback)
            new = [{"method": method, "skipped": f"out of memory: {str(error).splitlines()[0]}"}]
        if str(args.device).startswith("cuda"):
            torch.cuda.empty_cache()
        rows += new
        for r in new:
            if "skipped" not in r:
                print(f"  {r['variant']:<9} {r['step_s'] * 1000:9.1f} ms/step  {r['samples_per_s']:8.1f} samples/s")
    header = (f"Training step, {device_name}, preset {args.preset}, {args.precision}, median of {args.steps} "
              f"steps after {args.warmup} warm-up (measured; planned GiB is the memory plan's estimate)")
    print(markdown(rows, header))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        meta = {"device": device_name, "preset": args.preset, "precision": args.precision, "torch": torch.__version__,
                "steps": args.steps, "warmup": args.warmup, "peak_tflops": peak_tflops(args)}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    return rows


if __name__ == "__main__":
    main()
