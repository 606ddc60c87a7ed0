"""The toy world's latent diffusion model: Stable Diffusion's recipe at a size a CPU trains in minutes.

The same diffusers parts as Stable Diffusion, trained in the same order:

1. an ``AutoencoderKL`` (reconstruction + a small KL term) that maps 32-px images to 16x16x4 latents;
   its ``scaling_factor`` is set, as SD's 0.18215 was, so that scaled latents have unit variance;
2. a ``UNet2DConditionModel`` that predicts the noise of those latents (epsilon, SD's scaled-linear
   betas over 1000 steps, Min-SNR-5 weighting), cross-attending to the frozen CLIP text encoder's
   ``last_hidden_state`` of the caption padded to 77 tokens, without attention mask, exactly what
   ``StableDiffusion.encode_captions`` and diffusers' pipeline feed it. One caption in ten is
   replaced by the empty caption so that classifier-free guidance works (GILL's and SD's negative
   prompt is the embedding of ""; MiniGPT-5's is learned on top). The saved weights are the
   exponential moving average of the trained ones (diffusers' ``EMAModel``), as SD's are.

The result is written as a standard ``StableDiffusionPipeline`` folder (model_index.json, vae/,
unet/, scheduler/ (SD v1.5's PNDM config), text_encoder/, tokenizer/; no safety checker), which
mmgen's ``StableDiffusion`` component and a stock ``StableDiffusionPipeline`` both load.
:func:`evaluate_diffusion` draws images from captions through mmgen's component with its default
sampler (DPM-Solver, 25 steps, guidance 7.5) and lets the judge read them; given a judge,
:func:`train_latent_diffusion` also measures that on the way (the UNet's learning curve).
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mmgen.components.stable_diffusion import KNOWN_SD_CONFIGS, min_snr_weights
from mmgen.data import toy
from mmgen.data.images import to_tensor
from mmgen.errors import ConfigError
from mmgen.toy.judge import judge_images
from mmgen.toy.training import fit

# Stable Diffusion v1.5's scheduler config as published (PNDM, scaled-linear betas 0.00085-0.012).
SD_SCHEDULER = dict(KNOWN_SD_CONFIGS["runwayml/stable-diffusion-v1-5"]["scheduler"])
MAX_LENGTH = 77  # SD pads every caption to CLIP's 77 positions; the UNet attends to all of them

# 32 px -> 16x16x4 latents (2 blocks: one downsampling; 4 channels as SD). With two downsamplings
# (8x8 latents, 8 channels) a small shape covered two or three latent cells and the judge read only
# 71-75% of the reconstructed shapes; at 16x16 it reads 92% after 300 steps. Narrow, no attention
# in the mid block: flat colours, and full-resolution convolutions dominate a CPU step.
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                  block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, mid_block_add_attention=False)
# 16x16 latents -> 8x8 -> 4x4. Convolutions only at 16x16 (attention over 256 positions costs more
# than it brings for flat shapes); cross-attention at 8x8 (where position lives) and in the 4x4 mid
# block (where shape and colour are global). `attention_head_dim` is, in diffusers' UNet, the
# number of heads (a historical misnomer): 2 heads; 8 tiny heads made CPU attention 2x slower.
UNET_CONFIG = dict(in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64, 64],
                   down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                   attention_head_dim=2, norm_num_groups=32)


# -- text -----------------------------------------------------------------------------------------
def load_text_encoder(clip_dir: str | Path):
    """(CLIPTextModel, tokenizer) from a folder holding a CLIPModel (or CLIPTextModel) and its
    tokenizer: the text tower alone is what Stable Diffusion keeps of CLIP."""
    from transformers import AutoTokenizer, CLIPTextModel
    from transformers.utils import logging

    clip_dir = Path(clip_dir)
    if not (clip_dir / "config.json").is_file():
        raise ConfigError(f"{clip_dir}: no CLIP here (config.json missing); build the toy CLIP first")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a CLIPModel folder: the vision tower's weights are skipped on purpose
    try:
        text_encoder = CLIPTextModel.from_pretrained(clip_dir).eval().requires_grad_(False)
    finally:
        logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    tokenizer.model_max_length = MAX_LENGTH  # what a stock pipeline pads to
    return text_encoder, tokenizer


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """(n, 77, d) ``last_hidden_state``s as Stable Diffusion conditions on them: padded to 77
    tokens, no attention mask (``StableDiffusion.encode_captions`` and the pipeline do the same)."""
    out = []
    for i in range(0, len(captions), batch_size):
        tokens = tokenizer(captions[i:i + batch_size], padding="max_length", max_length=MAX_LENGTH,
                           truncation=True, return_tensors="pt")
        out.append(text_encoder(input_ids=tokens.input_ids).last_hidden_state)
    return torch.cat(out)


# -- the VAE --------------------------------------------------------------------------------------
def train_vae(images: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 2e-3,
              kl_weight: float = 1e-6, log: Callable[[str], None] = print):
    """An AutoencoderKL fit to ``images`` ((n, 3, s, s) in [0, 1]); draws from torch's global
    generator (seed it). Its ``scaling_factor`` is 1 / std of the latents of ``images``."""
    from diffusers import AutoencoderKL

    side = images.shape[-1]
    vae = AutoencoderKL(sample_size=side, **VAE_CONFIG).train()
    pixels = images * 2 - 1  # [-1, 1], as SD's VAE sees images

    def loss(step: int) -> torch.Tensor:
        batch = pixels[torch.randint(0, len(pixels), (batch_size,))]  # (b, 3, s, s)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # MSE, not SD's L1: on these images L1 (a median) learns to paint small shapes over with
        # the background (measured: the judge read shape 54% / colour 62% of its reconstructions).
        # SD's LPIPS and GAN terms are for texture, which flat shapes do not have.
        return F.mse_loss(recon, batch) + kl_weight * posterior.kl().mean()

    result = fit(vae.parameters(), loss, steps=steps, lr=lr, weight_decay=0.0, log=log, name="vae")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
        # Decoding is the costly half (full-resolution convolutions): 1024 images measure it well.
        recon = torch.cat([vae.decode(z).sample for z in latents[:1024].split(256)])
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    result["reconstruction_mse"] = round(F.mse_loss(recon, pixels[:1024]).item(), 5)  # in [-1, 1] units
    result["scaling_factor"] = vae.config.scaling_factor
    return vae, result


# -- the UNet -------------------------------------------------------------------------------------
def diffusion_loss(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, snr_gamma: float = 5.0) -> torch.Tensor:
    """SD's training objective on scaled ``latents`` (b, 8, h, w) given ``cond`` (b, 77, d):
    uniform timesteps, epsilon target, Min-SNR weight min(SNR, gamma) / SNR (as diffusers'
    text-to-image script and ``StableDiffusion.ldm_loss``)."""
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=cond).sample  # (b, 8, h, w)
    per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (b,)
    return (per_sample * min_snr_weights(scheduler.alphas_cumprod, t, snr_gamma)).mean()


def train_unet(latent_mean: torch.Tensor, latent_std: torch.Tensor, cond: torch.Tensor, index: torch.Tensor,
               uncond: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 2e-3, cfg_dropout: float = 0.1,
               ema_decay: float = 0.999, check: Callable[[torch.nn.Module], dict] | None = None,
               check_every: int = 0, log: Callable[[str], None] = print):
    """A UNet2DConditionModel trained on VAE latents (mean and std (n, c, h, w), scaled) of images
    whose captions are ``cond[index]`` ((k, 77, d) unique caption embeddings, ``index`` (n,));
    ``uncond`` (77, d) replaces a caption with probability ``cfg_dropout``. Draws from torch's
    global generator (seed it).

    Returns the exponential moving average of the weights (diffusers' ``EMAModel``, its warmup
    decay 1 - (1 + step)^(-2/3) capped at ``ema_decay``; 0 keeps the raw weights), as diffusion
    models are published: on a short run it smooths out the last, noisy Adam steps.
    ``check(unet)`` (e.g. judged samples), if given, runs on the averaged weights every
    ``check_every`` steps and at the end; its results are the ``"curve"`` of the returned record."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    unet = UNet2DConditionModel(sample_size=latent_mean.shape[-1], cross_attention_dim=cond.shape[-1],
                                **dict(UNET_CONFIG, in_channels=latent_mean.shape[1], out_channels=latent_mean.shape[1])
                                ).train()
    noise_scheduler = DDPMScheduler.from_config({k: v for k, v in SD_SCHEDULER.items() if not k.startswith("_")})
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True) if ema_decay > 0 else None
    curve: list[dict] = []

    def averaged() -> torch.nn.Module:
        """A copy of the UNet holding the averaged weights (a deep copy: no draw from the RNG)."""
        model = copy.deepcopy(unet)
        if ema is not None:
            ema.copy_to(model.parameters())
        return model.eval().requires_grad_(False)

    def checkpoint(step: int) -> None:
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # a check leaves the training's random stream as it was
            point = {"step": step, **check(averaged())}
        point["seconds"] = round(time.perf_counter() - start, 1)
        curve.append(point)
        log(f"  unet check at step {step}: {json.dumps(point)}")

    def loss(step: int) -> torch.Tensor:
        # `fit` owns the optimizer step, so the average follows it here: at the start of step s it
        # takes in the weights that step s - 1 left (and once more after the loop).
        if step > 0:
            if ema is not None:
                ema.step(unet.parameters())
            if check is not None and check_every > 0 and step % check_every == 0:
                checkpoint(step)
        pick = torch.randint(0, len(index), (batch_size,))
        latents = latent_mean[pick] + latent_std[pick] * torch.randn_like(latent_mean[pick])  # a VAE sample
        keep = torch.rand(batch_size) >= cfg_dropout  # (b,)
        c = torch.where(keep[:, None, None], cond[index[pick]], uncond)  # (b, 77, d)
        return diffusion_loss(unet, noise_scheduler, latents, c)

    result = fit(unet.parameters(), loss, steps=steps, lr=lr, weight_decay=0.0, log=log, name="unet")
    if ema is not None:
        ema.step(unet.parameters())
    if check is not None:
        checkpoint(steps)
        result["curve"] = curve
    result["ema_decay"] = ema_decay
    return averaged(), result


# -- the whole model ------------------------------------------------------------------------------
def draw_training_set(n: int, seed: int, image_size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """(images (n, 3, s, s) in [0, 1], captions) of ``n`` scenes drawn with ``seed``."""
    rng = random.Random(seed)
    scenes = [toy.sample_scene(rng) for _ in range(n)]
    images = torch.stack([to_tensor(toy.render_scene(s, image_size)) for s in scenes])
    return images, [toy.caption_scene(s) for s in scenes]


def train_latent_diffusion(
    out_dir: str | Path,
    clip_dir: str | Path,
    images: torch.Tensor | None = None,
    captions: list[str] | None = None,
    seed: int = 0,
    n_train: int = 8000,
    vae_steps: int = 400,
    unet_steps: int = 1800,
    vae_batch_size: int = 32,
    unet_batch_size: int = 32,
    unet_lr: float = 2e-3,
    ema_decay: float = 0.999,
    judge=None,
    check_every: int = 0,
    n_check: int = 32,
    log: Callable[[str], None] = print,
) -> dict:
    """Train the VAE, then the UNet on the frozen text encoder of ``clip_dir``, and write a
    StableDiffusionPipeline folder to ``out_dir``. Trains on ``images``/``captions`` if given
    ((n, 3, s, s) in [0, 1]), else on ``n_train`` freshly drawn scenes. Deterministic in ``seed``
    (on one machine and thread count). Returns what was measured (losses, seconds per stage).

    With a ``judge``, the learning curve is measured on the way: every ``check_every`` UNet steps
    (and at the end) ``n_check`` images drawn from held-out scenes' captions with the evaluation's
    sampler (DPM-Solver, 25 steps, guidance 7.5) are judged; it does not change the training."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    timings: dict[str, float] = {}
    start = time.perf_counter()
    if images is None:
        images, captions = draw_training_set(n_train, seed)
    if captions is None or len(captions) != len(images):
        raise ConfigError(f"train_latent_diffusion needs one caption per image, got {len(images)} images and "
                          f"{None if captions is None else len(captions)} captions")
    text_encoder, tokenizer = load_text_encoder(clip_dir)
    unique = sorted(set(captions))
    cond = encode_captions(text_encoder, tokenizer, unique)  # (k, 77, d)
    uncond = encode_captions(text_encoder, tokenizer, [""])[0]  # (77, d)
    position = {caption: i for i, caption in enumerate(unique)}
    index = torch.tensor([position[caption] for caption in captions])  # (n,) rows of cond
    timings["data_seconds"] = round(time.perf_counter() - start, 1)

    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random state untouched
        torch.manual_seed(seed)
        log(f"diffusion: VAE on {len(images)} images ({vae_steps} steps)")
        vae, vae_result = train_vae(images, vae_steps, vae_batch_size, log=log)
        with torch.no_grad():
            dists = [vae.encode(chunk * 2 - 1).latent_dist for chunk in images.split(256)]
        scale = vae.config.scaling_factor
        mean = torch.cat([d.mean for d in dists]) * scale  # (n, 4, h/2, w/2)
        std = torch.cat([d.std for d in dists]) * scale
        check = None
        if judge is not None:
            check = judged_samples(judge, vae, text_encoder, tokenizer, uncond, n_check, seed + 4321)
        log(f"diffusion: UNet on {len(unique)} distinct captions ({unet_steps} steps)")
        unet, unet_result = train_unet(mean, std, cond, index, uncond, unet_steps, unet_batch_size, lr=unet_lr,
                                       ema_decay=ema_decay, check=check, check_every=check_every, log=log)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config({k: v for k, v in SD_SCHEDULER.items() if not k.startswith("_")}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out)
    parameters = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                  for name in ("vae", "unet", "text_encoder")}
    record = dict(seed=seed, n_train=len(images), distinct_captions=len(unique), vae=vae_result, unet=unet_result,
                  parameters=parameters, seconds=round(time.perf_counter() - start, 1), **timings)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# -- measuring it ---------------------------------------------------------------------------------
def held_out_scenes(n: int, seed: int) -> list[toy.ToyScene]:
    """``n`` scenes drawn with ``seed`` (another seed than the training set's)."""
    rng = random.Random(seed)
    return [toy.sample_scene(rng) for _ in range(n)]


def judged_samples(judge, vae, text_encoder, tokenizer, uncond: torch.Tensor, n: int,
                   seed: int) -> Callable[[torch.nn.Module], dict]:
    """``check(unet)`` for :func:`train_unet`: the judge's scores of images drawn by ``unet`` (and
    ``vae``) from the captions of ``n`` scenes drawn with ``seed``."""
    scenes = held_out_scenes(n, seed)
    cond = encode_captions(text_encoder, tokenizer, [toy.caption_scene(s) for s in scenes])  # (n, 77, d)

    def check(unet) -> dict:
        scores = judge_images(judge, draw_images(vae, unet, cond, uncond), scenes)
        return {k: round(v, 3) for k, v in scores.items() if k != "n"}

    return check


@torch.no_grad()
def draw_images(vae, unet, cond: torch.Tensor, uncond: torch.Tensor, num_inference_steps: int = 25,
                guidance_scale: float = 7.5, seed: int = 0) -> torch.Tensor:
    """Images (b, 3, s, s) in [0, 1] from in-memory parts, the way ``StableDiffusion.generate``
    draws them (DPM-Solver from SD's scheduler config, guidance against ``uncond`` (77, d), one
    generator per image): for checks during training, before there is a folder to load."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_config({k: v for k, v in SD_SCHEDULER.items() if k[0] != "_"})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(len(cond), -1, -1),
               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type="pt",
               generator=[torch.Generator().manual_seed(seed + i) for i in range(len(cond))])
    return out.images.float().clamp(0, 1)


def evaluate_diffusion(
    sd_dir: str | Path,
    judge,
    n: int = 240,
    seed: int = 1234,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    scheduler: str = "dpm",
    batch_size: int = 60,
) -> dict:
    """Draw one image for each of ``n`` held-out scenes' captions through mmgen's
    ``StableDiffusion`` component (its defaults: DPM-Solver, 25 steps, guidance 7.5 against the
    embedding of "") and return the judge's per-attribute accuracy (see ``judge_images``)."""
    from mmgen.components.stable_diffusion import StableDiffusion

    scenes = held_out_scenes(n, seed)
    captions = [toy.caption_scene(s) for s in scenes]
    sd = StableDiffusion(name_or_path=str(sd_dir))
    sd.configure()
    start = time.perf_counter()
    images = []
    for i in range(0, n, batch_size):
        cond = sd.encode_captions(captions[i:i + batch_size])  # (b, 77, d)
        images.append(sd.generate(cond, None, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  scheduler=scheduler, seeds=[seed + j for j in range(i, i + len(cond))]))
    images = torch.cat(images)  # (n, 3, s, s) in [0, 1]
    scores = judge_images(judge, images, scenes)
    scores.update(sampler=scheduler, steps=num_inference_steps, guidance_scale=guidance_scale,
                  seconds=round(time.perf_counter() - start, 1))
    # The ceiling the VAE sets: the same scenes rendered, encoded and decoded.
    with torch.no_grad():
        truth = torch.stack([to_tensor(toy.render_scene(s, sd.image_size)) for s in scenes]) * 2 - 1
        decoded = sd.vae.decode(sd.vae.encode(truth).latent_dist.mean).sample
    reconstructed = judge_images(judge, ((decoded + 1) / 2).clamp(0, 1), scenes)
    scores["vae_reconstructions"] = {k: v for k, v in reconstructed.items() if k != "n"}
    return scores
