"""Stable Diffusion (v1.5, v2.x) as a frozen image generator on diffusers (GILL, MiniGPT-5).

Three ways to build it, like every mmgen backbone:

- ``name_or_path``: a hub id or a local folder in the diffusers layout (subfolders
  ``text_encoder``, ``tokenizer``, ``unet``, ``vae``, ``scheduler``);
- ``name_or_path`` + ``random_weights=True`` (or inside ``random_weights_only()``, the dry run):
  the architecture of a model in ``KNOWN_SD_CONFIGS`` with random weights, no download;
- ``config``: a dict of ``text_encoder`` (``CLIPTextConfig`` values), ``unet``
  (``UNet2DConditionModel`` kwargs), ``vae`` (``AutoencoderKL`` kwargs) and optionally
  ``scheduler`` (kwargs, with ``_class_name``, default DDIMScheduler): tiny test models. The
  tokenizer then comes from ``tokenizer`` (a folder, e.g. ``mmgen:toy_tokenizer``).

Only the parts asked for are built: ``configure(parts=("text_encoder",))`` gives caption
embeddings without UNet and VAE (GILL's training needs nothing else), ``configure(parts=())``
only reads the configs (``text_embed_dim``, when the caption embeddings come from a cache).
A later ``configure`` with more parts adds them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from mmgen.components.base import ImageGenerator
from mmgen.components.hub import random_weights_requested, resolve_name
from mmgen.errors import ConfigError
from mmgen.quiet import quiet_diffusers_casts
from mmgen.precision import storage_dtype

quiet_diffusers_casts()  # "should be kept in float32: []" on each cast of a part: nothing to keep

PARTS = ("text_encoder", "unet", "vae")

# Short names of diffusers schedulers for generation (``StableDiffusion.generate(scheduler=...)``).
SCHEDULERS = {
    "dpm": "DPMSolverMultistepScheduler",  # fast: about 25 steps
    "pndm": "PNDMScheduler",  # SD's own, 50 steps in the papers
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
}

# Architecture fields of the published diffusers configs (values as published on the hub).
_SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                  projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
_SD21_TEXT = dict(_SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, hidden_act="gelu", projection_dim=512)
_SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=[320, 640, 1280, 1280],
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                  "CrossAttnUpBlock2D"],
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                  flip_sin_to_cos=True, freq_shift=0)
_SD21_UNET = dict(_SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True)
_SD_VAE = dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
               block_out_channels=[128, 256, 512, 512],
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               norm_num_groups=32, scaling_factor=0.18215)
_SD_SCHEDULER = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085,
                     beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                     set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
_SD15 = dict(text_encoder=_SD15_TEXT, unet=_SD15_UNET, vae=_SD_VAE, scheduler=_SD_SCHEDULER)
_SD21_BASE = dict(text_encoder=_SD21_TEXT, unet=_SD21_UNET, vae=_SD_VAE, scheduler=_SD_SCHEDULER)

KNOWN_SD_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "runwayml/stable-diffusion-v1-5": _SD15,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _SD15,
    "stabilityai/stable-diffusion-2-1-base": _SD21_BASE,
}


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float = 5.0,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-sample Min-SNR-gamma loss weights (b,): min(SNR, gamma) / SNR for epsilon prediction,
    / (SNR + 1) for v-prediction, as diffusers' training scripts; SNR from
    ``diffusers.training_utils.compute_snr`` ((sqrt(a) / sqrt(1 - a))^2, MiniGPT-5's formula too)."""
    from types import SimpleNamespace

    from diffusers.training_utils import compute_snr

    # compute_snr reads only the scheduler's alphas_cumprod
    snr = compute_snr(SimpleNamespace(alphas_cumprod=alphas_cumprod), timesteps)  # (b,)
    denominator = snr + 1 if prediction_type == "v_prediction" else snr
    return torch.clamp(snr, max=gamma) / denominator


def tiny_sd_config(text_embed_dim: int = 32, vocab_size: int = 64, image_size: int = 32,
                   bos_token_id: int = 1, eos_token_id: int = 1, pad_token_id: int = 0) -> dict:
    """A Stable-Diffusion-shaped generator of a few hundred thousand parameters (tests, toy runs).

    The token ids default to the bundled toy tokenizer's (``</s>`` = 1 opens every caption, no
    EOS is appended). Pooling reads the first ``eos_token_id``; nothing here uses the pooled
    output, only ``last_hidden_state``."""
    return dict(
        text_encoder=dict(vocab_size=vocab_size, hidden_size=text_embed_dim,
                          intermediate_size=2 * text_embed_dim, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77,
                          bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id),
        unet=dict(sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=text_embed_dim,
                  attention_head_dim=8, norm_num_groups=32),
        vae=dict(sample_size=image_size, in_channels=3, out_channels=3, latent_channels=4,
                 layers_per_block=1, block_out_channels=[32, 64],
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                 norm_num_groups=32),
        scheduler=dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085,
                       beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                       set_alpha_to_one=False, steps_offset=1),
    )


class StableDiffusion(ImageGenerator):
    """Frozen Stable Diffusion: caption embeddings for training targets, the latent diffusion loss
    through the frozen UNet, and generation from ``prompt_embeds``.

    Args:
        name_or_path: Hub id or local folder of a diffusers Stable Diffusion model.
        config: ``{"text_encoder": ..., "unet": ..., "vae": ..., "scheduler": ...}`` values for a
            random model (see ``tiny_sd_config``); with ``name_or_path`` they override its parts'
            configs in random builds.
        random_weights: Build ``name_or_path``'s architecture with random weights (no download for
            the models in ``KNOWN_SD_CONFIGS``).
        tokenizer: Folder or hub id of the tokenizer. Default: ``name_or_path``'s ``tokenizer``
            subfolder. Needed for random builds that encode text (``mmgen:toy_tokenizer``).
        dtype: dtype of the frozen weights ("float32", "float16", "bfloat16"); "auto": the run's
            precision decides (mmgen.precision).
        resolution: Side in pixels that ``ldm_loss`` resizes images to. Default: the VAE's
            ``sample_size`` (512 for SD v1.5 and 2.1-base).
        seed: Seed of random builds: the same config always gives the same weights, so caption
            embeddings cached from a random (toy) text encoder stay valid for it.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict | None = None,
        random_weights: bool = False,
        tokenizer: str | None = None,
        dtype: str = "auto",
        resolution: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.name_or_path = resolve_name(name_or_path)
        self.config_overrides = copy.deepcopy(config) if config else None
        self.random_weights = random_weights
        self.tokenizer_name = resolve_name(tokenizer)
        self.dtype_name, self.build_dtype = dtype, storage_dtype(dtype)  # of parts when built; see `dtype`
        self.resolution = resolution
        self.seed = seed
        self.tokenizer = None
        self.text_encoder = None
        self.unet = None
        self.vae = None
        self.scheduler = None
        self._configs: dict[str, Any] | None = None
        self._random = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the built parts are in now: the strategy or precision plugin may have cast
        them after building (``precision: bf16-true``), so it is read, never cached."""
        for part in PARTS:
            module = getattr(self, part)
            if module is not None:
                return next(module.parameters()).dtype
        return self.build_dtype

    def follow_run_precision(self, dtype: torch.dtype) -> None:
        if self.dtype_name == "auto" and not any(getattr(self, part) is not None for part in PARTS):
            self.build_dtype = dtype  # lazily built parts too

    # -- building --------------------------------------------------------------------------------
    def configure(self, parts: Iterable[str] | None = None) -> None:
        """Build ``parts`` (default: all of text_encoder, unet, vae) that are not built yet; the
        configs and the scheduler are always read (cheap, no weights)."""
        parts = PARTS if parts is None else tuple(parts)
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ConfigError(f"StableDiffusion parts are {PARTS}, not {sorted(unknown)}")
        if self._configs is None:
            self._random = random_weights_requested(self.random_weights) or self.name_or_path is None
            self._configs = self._read_configs()
            with torch.device("cpu"):  # the scheduler's tables are real tensors even in a dry run
                self.scheduler = self._build_scheduler(self._configs["scheduler"])
        for part in parts:
            if getattr(self, part) is None:
                module = self._build(part)
                if module.dtype != self.dtype:  # random builds; pretrained ones load in dtype
                    module = module.to(self.dtype)  # (and a lazily built part joins the others)
                module = module.requires_grad_(False).eval()
                setattr(self, part, module)
                if part == "text_encoder":
                    self.tokenizer = self._load_tokenizer()

    def _read_configs(self) -> dict[str, Any]:
        """{part: config dict} for text_encoder/unet/vae/scheduler, without loading weights."""
        overrides = self.config_overrides or {}
        local = self.name_or_path is not None and os.path.isdir(self.name_or_path)
        if self._random and (self.name_or_path is None or (self.name_or_path in KNOWN_SD_CONFIGS and not local)):
            base = KNOWN_SD_CONFIGS.get(self.name_or_path, {})
            configs = {k: {**base.get(k, {}), **overrides.get(k, {})} for k in (*PARTS, "scheduler")}
            missing = [k for k in PARTS if not configs[k]]
            if missing:
                raise ConfigError(
                    f"StableDiffusion needs `name_or_path` (one of {sorted(KNOWN_SD_CONFIGS)}, a hub "
                    f"id or a folder) or `config` with {list(PARTS)}; missing {missing}"
                )
            configs["scheduler"] = configs["scheduler"] or dict(tiny_sd_config()["scheduler"])
            return configs
        if self.name_or_path is None:
            raise ConfigError("StableDiffusion needs `name_or_path` or `config`")
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig

        from mmgen.components.hub import require_local_folder

        require_local_folder(self.name_or_path, "Stable Diffusion")
        text = CLIPTextConfig.from_pretrained(self.name_or_path, subfolder="text_encoder").to_dict()
        unet = dict(UNet2DConditionModel.load_config(self.name_or_path, subfolder="unet"))
        vae = dict(AutoencoderKL.load_config(self.name_or_path, subfolder="vae"))
        from diffusers import DDIMScheduler

        scheduler = dict(DDIMScheduler.load_config(self.name_or_path, subfolder="scheduler"))
        configs = dict(text_encoder=text, unet=unet, vae=vae, scheduler=scheduler)
        for key, values in overrides.items():
            configs[key] = {**configs[key], **values}
        return configs

    @staticmethod
    def _build_scheduler(config: dict):
        import diffusers

        config = dict(config)
        name = config.pop("_class_name", "DDIMScheduler")
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        return getattr(diffusers, name).from_config(config)

    def _build(self, part: str):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        config = {k: v for k, v in self._configs[part].items() if not k.startswith("_")}
        if not self._random:
            if part == "text_encoder":
                return CLIPTextModel.from_pretrained(self.name_or_path, subfolder="text_encoder", dtype=self.build_dtype)
            cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
            return cls.from_pretrained(self.name_or_path, subfolder=part, torch_dtype=self.build_dtype)
        with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random state untouched
            torch.manual_seed(self.seed + PARTS.index(part))
            if part == "text_encoder":
                return CLIPTextModel(CLIPTextConfig(**config))
            return (UNet2DConditionModel if part == "unet" else AutoencoderKL).from_config(config)

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        if self.tokenizer_name is not None:
            from mmgen.components.tokenizers import load_tokenizer  # names a missing folder

            return load_tokenizer(self.tokenizer_name)
        if self.name_or_path is None:
            return None
        try:
            return AutoTokenizer.from_pretrained(self.name_or_path, subfolder="tokenizer")
        except (OSError, ValueError):
            if self._random:
                return None  # random full-size build without tokenizer files (dry run)
            raise

    def train(self, mode: bool = True):
        super().train(mode)
        for part in PARTS:  # frozen: always inference behaviour
            if getattr(self, part) is not None:
                getattr(self, part).eval()
        return self

    # -- what others need to know ----------------------------------------------------------------
    @property
    def text_embed_dim(self) -> int:
        return int(self._configs["text_encoder"]["hidden_size"])

    @property
    def vae_scaling_factor(self) -> float:
        return float(self._configs["vae"].get("scaling_factor", 0.18215))

    @property
    def image_size(self) -> int:
        return int(self.resolution or self._configs["vae"].get("sample_size", 512))

    @property
    def identity(self) -> str:
        """What a cache of this generator's caption embeddings records: the hub id or folder, or a
        hash of the text encoder's config for a random build."""
        text = json.dumps(self._configs["text_encoder"], sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        if self.name_or_path is not None and not self._random:
            return self.name_or_path
        return f"random:{self.name_or_path or 'config'}:{digest}:seed={self.seed}"

    def _device(self, module) -> torch.device:
        return next(module.parameters()).device

    # -- using -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_captions(self, captions: list[str], use_attention_mask: bool = False) -> torch.Tensor:
        """The text encoder's ``last_hidden_state`` for ``captions`` padded (and cut) to
        ``max_length`` (77) tokens: (b, 77, text_embed_dim). GILL's target and SD's own
        conditioning use no attention mask; MiniGPT-5's caption target uses it."""
        if self.text_encoder is None:
            self.configure(parts=("text_encoder",))
        if self.tokenizer is None:
            raise ConfigError(
                f"StableDiffusion {self.name_or_path or '(config)'} has no tokenizer: give `tokenizer`"
            )
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True,
            return_tensors="pt",
        )
        device = self._device(self.text_encoder)
        mask = tokens.attention_mask.to(device) if use_attention_mask else None
        out = self.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask)
        return out.last_hidden_state  # (b, 77, text_embed_dim)

    def _vae_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, h, w) in [0, 1] -> (b, 3, S, S) in [-1, 1] at the VAE's resolution, in its dtype."""
        size = self.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return (images * 2 - 1).to(self.dtype)  # [0, 1] -> [-1, 1]

    @torch.no_grad()
    def latent_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution of ``images`` ((b, 3, h, w) in [0, 1]): mean and std, each
        (b, c, h/8, w/8), unscaled; what a latent cache stores (``mmgen cache-features``)."""
        if self.vae is None:
            self.configure(parts=("vae",))
        dist = self.vae.encode(self._vae_pixels(images)).latent_dist
        return dist.mean, dist.std

    def ldm_loss(self, images: torch.Tensor | None, cond: torch.Tensor, snr_gamma: float | None = 5.0,
                 latent_dist: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The latent diffusion loss of ``images`` ((b, 3, h, w) in [0, 1]) conditioned on ``cond``
        ((b, 77, text_embed_dim)); gradients flow into ``cond`` through the frozen UNet.

        VAE latents x scaling factor; one timestep per sample, uniform over the scheduler's train
        timesteps; epsilon target (or v where the scheduler predicts v); per-sample Min-SNR weight
        min(SNR, gamma) / SNR (/ (SNR + 1) for v-prediction, as diffusers' training scripts);
        ``snr_gamma=None``: plain MSE. Returns the batch mean.

        ``latent_dist``: the images' (mean, std) from a latent cache instead of ``images``: the
        latent is drawn from it as the VAE's own distribution draws it (mean + std x noise, the
        same generator call), so the VAE never runs.
        """
        if self.unet is None or (self.vae is None and latent_dist is None):
            raise ConfigError("StableDiffusion.ldm_loss needs configure(parts=('unet', 'vae'))")
        with torch.no_grad():
            if latent_dist is None:
                latents = self.vae.encode(self._vae_pixels(images)).latent_dist.sample()  # (b, 4, h/8, w/8)
            else:
                mean, std = (t.to(device=self._device(self.unet), dtype=self.dtype) for t in latent_dist)
                latents = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
            latents = latents * self.vae_scaling_factor
        b = latents.shape[0]
        # randn of the shape, not randn_like: the VAE's output may be channels-last (CPU convs),
        # and randn_like follows the memory layout, so the same seed would give other noise to
        # latents from the VAE than to the same latents from a cache (or another backend).
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        n_steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, n_steps, (b,), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        pred = self.unet(noisy, t, encoder_hidden_states=cond.to(self.dtype)).sample  # (b, 4, h', w')
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (b,)
        if snr_gamma is None:
            return per_sample.mean()
        weight = min_snr_weights(self.scheduler.alphas_cumprod, t, snr_gamma, self.scheduler.config.prediction_type)
        return (per_sample * weight).mean()

    def _place(self, parts: Iterable[str], device: torch.device) -> None:
        """Build ``parts`` if needed and move them to ``device`` in this generator's dtype: parts
        built lazily (after the model was moved) start on the CPU."""
        self.configure(parts=parts)
        for part in parts:
            module = getattr(self, part)
            if self._device(module) != device or next(module.parameters()).dtype != self.dtype:
                setattr(self, part, module.to(device=device, dtype=self.dtype))

    def inference_scheduler(self, scheduler: str | None = "dpm"):
        """A fresh scheduler (it keeps per-run timestep state) from this model's scheduler config:
        ``"dpm"`` (DPMSolverMultistepScheduler: good images in about 25 steps), ``"pndm"`` (the
        papers' 50-step sampler, SD's default), ``"ddim"``, ``"euler"``, any diffusers scheduler
        class name, or None for the model's own configured scheduler."""
        import diffusers

        config = dict(self.scheduler.config)
        if scheduler is None:
            return type(self.scheduler).from_config(config)
        name = SCHEDULERS.get(scheduler.lower(), scheduler)
        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
            raise ConfigError(f"unknown scheduler {scheduler!r}: use one of {sorted(SCHEDULERS)} or a diffusers "
                              "scheduler class name")
        if name == "PNDMScheduler":
            config.setdefault("skip_prk_steps", True)  # as Stable Diffusion's own PNDM config
        return cls.from_config(config)

    @torch.no_grad()
    def generate(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = "dpm",
        seeds: list[int] | None = None,
    ) -> torch.Tensor:
        """Images (b, 3, h, w) in [0, 1] from ``prompt_embeds`` (b, 77, text_embed_dim), one
        batched diffusion run on ``prompt_embeds``' device.

        ``negative_prompt_embeds`` (b or 1, 77, d) default: SD's own embedding of the empty
        prompt (what GILL uses as the unconditional branch); it needs the text encoder.
        ``seeds``: one per image (each image's noise from its own generator, so an image does not
        depend on its batch), instead of ``generator``. ``scheduler``: see
        :meth:`inference_scheduler` (default DPM-Solver; "pndm" with 50 steps is the papers')."""
        from diffusers import StableDiffusionPipeline

        b, device = prompt_embeds.shape[0], prompt_embeds.device
        if seeds is not None:
            if len(seeds) != b:
                raise ValueError(f"{len(seeds)} seeds for {b} images")
            generator = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self._place(("unet", "vae"), device)
        if negative_prompt_embeds is None:
            self._place(("text_encoder",), device)
            negative_prompt_embeds = self.encode_captions([""])
        if negative_prompt_embeds.shape[0] == 1 and b > 1:
            negative_prompt_embeds = negative_prompt_embeds.expand(b, -1, -1)
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=None, tokenizer=None, unet=self.unet,
            scheduler=self.inference_scheduler(scheduler),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            prompt_embeds=prompt_embeds.to(device, self.dtype),
            negative_prompt_embeds=negative_prompt_embeds.to(device, self.dtype),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            height=height,
            width=width,
            output_type="pt",
        )
        return out.images.float().clamp(0, 1)  # (b, 3, h, w)
