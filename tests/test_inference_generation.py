"""Image generation for answers: per-image seeds, scheduler choice, lazily built parts."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_TOKENIZER

from mmgen.components.stable_diffusion import StableDiffusion, tiny_sd_config
from mmgen.errors import ConfigError


@pytest.fixture(scope="module")
def sd():
    generator = StableDiffusion(config=tiny_sd_config(text_embed_dim=16), tokenizer=TOY_TOKENIZER)
    generator.configure(parts=())  # nothing built: generation builds what it needs
    return generator


def test_each_image_depends_on_its_own_seed_only(sd):
    torch.manual_seed(0)
    prompts = torch.randn(3, 77, 16)
    batch = sd.generate(prompts, num_inference_steps=2, seeds=[5, 6, 7])
    alone = sd.generate(prompts[1:2], num_inference_steps=2, seeds=[6])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batch[0], batch[2])
    assert sd.unet is not None and sd.vae is not None and sd.text_encoder is not None  # built on demand
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        sd.generate(prompts, num_inference_steps=2, seeds=[1, 2])


@pytest.mark.parametrize("name, cls", [("dpm", "DPMSolverMultistepScheduler"), ("pndm", "PNDMScheduler"),
                                       ("ddim", "DDIMScheduler"), ("EulerDiscreteScheduler", "EulerDiscreteScheduler"),
                                       (None, "DDIMScheduler")])
def test_scheduler_choice(sd, name, cls):
    assert type(sd.inference_scheduler(name)).__name__ == cls
    images = sd.generate(torch.randn(1, 77, 16), num_inference_steps=2, scheduler=name, seeds=[0])
    assert images.shape == (1, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_unknown_scheduler_is_refused(sd):
    with pytest.raises(ConfigError, match="unknown scheduler"):
        sd.inference_scheduler("fastest")
