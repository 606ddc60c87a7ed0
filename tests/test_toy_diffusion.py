"""The toy world's judge and latent diffusion model, on shortened runs (mmgen/toy/judge.py,
mmgen/toy/diffusion.py): the judge learns to read shape and colour, the diffusion folder is a
standard Stable Diffusion folder (mmgen's component and diffusers' pipeline load it) with 16x16x4
latents, training is reproducible from its seed, the UNet's denoising loss goes down, the saved
UNet is the moving average of its weights, and judged checks along the way leave the training as
it was."""

import json
import random

import pytest
import torch

from mmgen.data import toy
from mmgen.errors import ConfigError, DataError
from mmgen.toy import diffusion
from mmgen.toy.judge import ATTRIBUTES, judge_images, load_judge, scene_attributes, train_judge


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIP of the toy world's shape with the CLIP-shaped world tokenizer."""
    from mmgen.data.toy_tokenizer import build_world_tokenizer
    from mmgen.toy.clip import build_clip

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_world_tokenizer(clip=True)
    torch.manual_seed(0)
    build_clip(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _short_diffusion(out, clip_dir, seed=0, unet_steps=4, **options):
    return diffusion.train_latent_diffusion(out, clip_dir, seed=seed, n_train=48, vae_steps=3, unet_steps=unet_steps,
                                            vae_batch_size=4, unet_batch_size=8, log=lambda _: None, **options)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, clip_dir):
    folder = tmp_path_factory.mktemp("sd")
    _short_diffusion(folder, clip_dir)
    return folder


# -- the judge ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_judge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("judge")
    judge, record = train_judge(folder, seed=0, n_train=800, n_val=200, steps=80, batch_size=64)
    return folder, judge, record


def test_judge_learns_shape_and_colour_and_round_trips(short_judge):
    folder, judge, record = short_judge
    accuracy = record["held_out_accuracy"]
    # Chance is 1/4 for shape and 1/6 for colour; 80 steps already read most held-out images.
    assert accuracy["color"] >= 0.8, accuracy
    assert accuracy["shape"] >= 0.4, accuracy  # 0.5 on a quiet machine; chance 0.25
    loaded = load_judge(folder)
    assert loaded.attributes == ATTRIBUTES and loaded.image_size == 32
    rng = random.Random(7)
    scenes = [toy.sample_scene(rng) for _ in range(16)]
    images = [toy.render_scene(s, 64) for s in scenes]  # another resolution: resized to the judge's
    assert loaded.read(images) == judge.read(images)
    assert judge_images(loaded, images, scenes) == judge_images(loaded, images, [toy.caption_scene(s) for s in scenes])


def test_judge_scores_wrong_targets_as_wrong(short_judge):
    _, judge, _ = short_judge
    rng = random.Random(3)
    scenes = [toy.sample_scene(rng) for _ in range(40)]
    images = [toy.render_scene(s) for s in scenes]
    wrong = [s.replace(color=toy.TOY_COLORS[(toy.TOY_COLORS.index(s.color) + 1) % len(toy.TOY_COLORS)]) for s in scenes]
    right_scores, wrong_scores = judge_images(judge, images, scenes), judge_images(judge, images, wrong)
    assert right_scores["color"] >= 0.8 and wrong_scores["color"] <= 0.2
    assert wrong_scores["shape"] == right_scores["shape"]  # only colour was changed


def test_captions_are_parsed_into_attributes_or_rejected_by_name():
    scene = toy.ToyScene("triangle", "purple", "small", "top left", "brown")
    assert scene_attributes(toy.caption_scene(scene)) == scene_attributes(scene)
    with pytest.raises(DataError, match="a purple blob"):
        scene_attributes("a purple blob on a brown background")
    with pytest.raises(DataError, match="has no shape"):
        scene_attributes({"color": "red"})
    with pytest.raises(ConfigError, match="not a toy judge folder"):
        load_judge("/nonexistent/judge")


# -- the diffusion model --------------------------------------------------------------------------
def test_folder_is_a_stable_diffusion_folder(sd_dir):
    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("vae", "unet", "scheduler", "text_encoder", "tokenizer"):
        assert (sd_dir / part).is_dir(), part
    assert index["safety_checker"] == [None, None]
    assert json.loads((sd_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"


def test_mmgen_component_loads_and_draws(sd_dir):
    from mmgen.components.stable_diffusion import StableDiffusion

    sd = StableDiffusion(name_or_path=str(sd_dir))
    sd.configure()
    assert sd.text_embed_dim == 64 and sd.image_size == 32
    cond = sd.encode_captions(["a big red circle in the center on a black background"])  # (1, 77, 64)
    assert cond.shape == (1, 77, 64)
    mean, _ = sd.latent_distribution(torch.rand(2, 3, 32, 32))
    assert mean.shape == (2, 4, 16, 16)  # one downsampling, SD's 4 channels
    images = sd.generate(cond, None, num_inference_steps=2, seeds=[0])
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    # GILL's and MiniGPT-5's path: the loss through the frozen UNet reaches the conditioning.
    cond = cond.clone().requires_grad_(True)
    sd.ldm_loss(torch.rand(1, 3, 32, 32), cond).backward()
    assert cond.grad.abs().sum() > 0


def test_stock_diffusers_pipeline_loads_and_draws(sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a small blue cross in the top right on a gray background", num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 32, 32)


def test_training_is_deterministic_from_the_seed(tmp_path, clip_dir):
    from safetensors.torch import load_file

    def unet(folder):
        return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")

    for name, seed in [("first", 0), ("again", 0), ("other", 1)]:
        _short_diffusion(tmp_path / name, clip_dir, seed=seed)
    first, again, other = unet(tmp_path / "first"), unet(tmp_path / "again"), unet(tmp_path / "other")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert max(float((first[k] - other[k]).abs().max()) for k in first) > 1e-2


def test_short_unet_training_lowers_the_denoising_loss(clip_dir):
    from diffusers import DDPMScheduler

    images, captions = diffusion.draw_training_set(64, seed=0)
    text_encoder, tokenizer = diffusion.load_text_encoder(clip_dir)
    unique = sorted(set(captions))
    cond = diffusion.encode_captions(text_encoder, tokenizer, unique)  # (k, 77, 64)
    index = torch.tensor([unique.index(c) for c in captions])
    uncond = diffusion.encode_captions(text_encoder, tokenizer, [""])[0]
    # Stand-in latents: the images pooled to 8x8, channels repeated (the UNet's loss needs no VAE).
    pooled = torch.nn.functional.avg_pool2d(images * 2 - 1, 4)  # (64, 3, 8, 8)
    latents = pooled.repeat(1, 3, 1, 1)[:, :diffusion.UNET_CONFIG["in_channels"]]  # (64, c, 8, 8)
    scheduler = DDPMScheduler.from_config({k: v for k, v in diffusion.SD_SCHEDULER.items() if not k.startswith("_")})

    def held_out_loss(unet):  # the same noise and timesteps for both models
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(123)
            return diffusion.diffusion_loss(unet, scheduler, latents, cond[index]).item()

    losses = []
    for steps in (1, 40):
        torch.manual_seed(0)  # the same initial weights and batches
        unet, _ = diffusion.train_unet(latents, torch.zeros_like(latents), cond, index, uncond, steps=steps,
                                       batch_size=8, log=lambda _: None)
        losses.append(held_out_loss(unet))
    assert losses[1] < 0.7 * losses[0], losses


def test_one_caption_per_image_is_required(tmp_path, clip_dir):
    with pytest.raises(ConfigError, match="one caption per image"):
        diffusion.train_latent_diffusion(tmp_path, clip_dir, images=torch.rand(4, 3, 32, 32), captions=["a"])
    with pytest.raises(ConfigError, match="no CLIP here"):
        diffusion.load_text_encoder(tmp_path / "missing")


def test_saved_unet_is_the_moving_average_of_its_weights(clip_dir):
    """diffusers' EMAModel follows every optimizer step: its decay is 0 at the first update (the
    average starts at the weights after step 1) and 1 - 2^(-2/3) at the second, so after two steps
    the average is that mix of the weights after one and after two steps."""
    text_encoder, tokenizer = diffusion.load_text_encoder(clip_dir)
    cond = diffusion.encode_captions(text_encoder, tokenizer, ["a big red circle in the center on a black background"])
    latents = torch.randn(4, 4, 8, 8)

    def train(steps, ema_decay):
        torch.manual_seed(0)
        unet, _ = diffusion.train_unet(latents, torch.zeros_like(latents), cond, torch.zeros(4, dtype=torch.long),
                                       cond[0], steps=steps, batch_size=2, ema_decay=ema_decay, log=lambda _: None)
        return unet.state_dict()

    after_one, after_two, averaged = train(1, 0.0), train(2, 0.0), train(2, 0.999)
    decay = 1 - 2 ** (-2 / 3)
    changed = [k for k in after_two if not torch.equal(after_one[k], after_two[k])]
    assert changed
    for k in changed:
        assert torch.allclose(averaged[k], decay * after_one[k] + (1 - decay) * after_two[k], atol=1e-6), k


def test_judged_checks_record_a_curve_and_leave_training_unchanged(tmp_path, clip_dir, short_judge):
    from safetensors.torch import load_file

    _, judge, _ = short_judge
    record = _short_diffusion(tmp_path, clip_dir, judge=judge, check_every=2, n_check=3)
    curve = record["unet"]["curve"]
    assert [point["step"] for point in curve] == [2, 4]  # every 2 steps and at the end
    assert all(0 <= point[name] <= 1 for point in curve for name in ("shape", "color", "shape+color"))
    # The same seed without checks, trained here in the same process state (a fixture made earlier
    # may have run under another torch thread count, which reorders float sums): bit-identical.
    _short_diffusion(tmp_path / "plain", clip_dir)
    checked = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    plain = load_file(tmp_path / "plain" / "unet" / "diffusion_pytorch_model.safetensors")
    assert checked.keys() == plain.keys()
    assert all(torch.equal(checked[k], plain[k]) for k in plain)
