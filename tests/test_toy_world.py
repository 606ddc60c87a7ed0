"""The toy world: its generator, the shipped toy backbones, and the methods learning on top of them.

The method tests are shortened runs of the shipped configs (fewer steps, a smaller world) on the
frozen shipped backbones; their thresholds sit far above what a broken loss, a detached gradient or
a wrong token mask reaches (chance, or near it), and below what the short run reaches here.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mmgen.data import toy
from mmgen.data.toy_tokenizer import build_world_tokenizer, method_template_texts
from mmgen.toy import TOY_WORLD_DIR

SHIPPED = ["tokenizer", "opt", "llama", "clip", "qformer", "judge", "sd"]
SMALL = dict(n_captions=512, n_stories=16, n_dialogues=16, n_val=64)  # a small world, written in ~2 s


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return toy.write_toy_world(tmp_path_factory.mktemp("world"), seed=7, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- the world -------------------------------------------------------------------------------------
def test_world_is_deterministic_and_read_by_the_real_readers(world: Path, tmp_path: Path) -> None:
    from mmgen.data.captions import read_caption_tsv
    from mmgen.data.mmdialog import MMDialogDataset
    from mmgen.data.vist import VISTDataset

    again = toy.write_toy_world(tmp_path / "again", seed=7, **SMALL)
    assert _files(again) == _files(world)  # byte-identical, images included
    other = toy.write_toy_world(tmp_path / "other", seed=8, **SMALL)
    assert (other / "captions" / "train.tsv").read_bytes() != (world / "captions" / "train.tsv").read_bytes()

    val = read_caption_tsv(world / "captions" / "val.tsv", world / "captions" / "images", "caption", "image")
    assert len(val) == 64 and len({r.caption for r in val}) == 64  # each held-out caption names one image
    assert all(toy.parse_caption(r.caption) for r in val)
    stories = VISTDataset(str(world / "vist" / "train.json"), image_dir=str(world / "vist" / "images"),
                          tasks=["generate"]).build()
    assert len(stories) == 16 * 5  # one generate sample per step of every story
    dialogues = MMDialogDataset(str(world / "mmdialog" / "train_conversations.txt"), max_turn_tokens=None).build()
    assert dialogues and any(s.output_images for s in dialogues) and any(s.input_images for s in dialogues)


def test_scene_rendering_and_captions() -> None:
    rng = random.Random(0)
    scenes = [toy.sample_scene(rng) for _ in range(50)]
    for scene in scenes:
        assert toy.parse_caption(toy.caption_scene(scene)) == scene.replace(dx=0.0, dy=0.0)
    image = toy.render_scene(scenes[0], 32)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert toy.render_scene(scenes[0], 32).tobytes() == image.tobytes()  # a pure function of the scene
    corner = toy.ToyScene("square", "red", "small", "top left", "black")
    pixels = torch.tensor(list(toy.render_scene(corner, 32).getdata())).view(32, 32, 3)
    assert pixels[:16, :16, 0].float().mean() > pixels[16:, 16:, 0].float().mean() + 50  # red is top left
    with pytest.raises(ValueError, match="unknown toy shape"):
        toy.ToyScene("hexagon", "red", "small", "center", "black")
    with pytest.raises(ValueError, match="not a toy-world caption"):
        toy.parse_caption("a red circle")


def test_story_steps_depend_on_earlier_ones() -> None:
    rng = random.Random(1)
    for _ in range(20):
        steps = toy.sample_story(rng)
        assert len(steps) == 5 and steps[0][0] == toy.caption_scene(steps[0][1])
        for (_, before), (text, after) in zip(steps, steps[1:]):
            assert after.shape == before.shape and not any(shape in text for shape in toy.TOY_SHAPES)
            changed = [a for a in ("color", "size", "position", "background") if getattr(after, a) != getattr(before, a)]
            assert len(changed) == 1 and getattr(after, changed[0]) in text  # the text names the change only


def test_restatements_tell_the_whole_scene_again() -> None:
    rng = random.Random(2)
    forms = set()
    for _ in range(40):
        scene = toy.sample_scene(rng)
        text = toy.restate_scene(scene, rng)
        caption, again = text.split(" . ", 1)
        assert caption == toy.caption_scene(scene)
        forms.add(again.startswith("what"))
        for attribute in toy.RESTATE_QUESTIONS:  # every value told again, whatever the order
            assert f" {getattr(scene, attribute)}" in f" {again}", (attribute, text)
    assert forms == {True, False}  # both forms occur


def test_world_tokenizer_covers_every_text(world: Path) -> None:
    from transformers import AutoTokenizer

    from mmgen.toy.data import language_texts

    tokenizer = build_world_tokenizer()
    for text in language_texts(world, "train") + method_template_texts():
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text
    shipped = AutoTokenizer.from_pretrained(TOY_WORLD_DIR / "tokenizer")
    assert shipped.get_vocab() == tokenizer.get_vocab()
    clip = build_world_tokenizer(clip=True)
    # clip/ and sd/ were trained with this vocabulary: the LMs' texts must not change it.
    for folder in ("clip", "sd/tokenizer"):
        assert AutoTokenizer.from_pretrained(TOY_WORLD_DIR / folder).get_vocab() == clip.get_vocab(), folder
    ids = clip("a big red circle in the center on a black background")["input_ids"]
    assert ids[0] == clip.bos_token_id != clip.eos_token_id == ids[-1]  # CLIP pools at the one "</s>"


# -- the shipped backbones ---------------------------------------------------------------------------
def test_shipped_backbones_are_small_and_load_like_real_checkpoints() -> None:
    from mmgen.components.causal_lm import CausalLM
    from mmgen.components.clip_vision import CLIPVisionEncoder
    from mmgen.components.qformer import QFormerEncoder
    from mmgen.components.stable_diffusion import StableDiffusion

    for name in SHIPPED:
        assert (TOY_WORLD_DIR / name).is_dir(), f"{name}: run `mmgen toy pretrain`"
    size = sum(p.stat().st_size for p in TOY_WORLD_DIR.rglob("*") if p.is_file())
    assert size < 20e6, f"toy backbones are {size / 1e6:.1f} MB"

    images = torch.rand(2, 3, 32, 32)
    for family in ("opt", "llama"):
        llm = CausalLM(name_or_path=f"mmgen:toy_world/{family}")
        llm.configure()
        assert llm.model.config.model_type == family and llm.tokenizer.unk_token_id == 2
    clip = CLIPVisionEncoder(name_or_path="mmgen:toy_world/clip")
    clip.configure()
    assert clip(images).shape == (2, 1, 64)
    qformer = QFormerEncoder(name_or_path="mmgen:toy_world/qformer")
    qformer.configure(embed_dim=64)
    assert qformer(images).shape == (2, 4, 64)
    sd = StableDiffusion(name_or_path="mmgen:toy_world/sd")
    sd.configure()
    assert sd.encode_captions(["a big red circle in the center on a black background"]).shape[:2] == (1, 77)


def test_shipped_lm_and_clip_have_learned_the_world(world: Path) -> None:
    from transformers import AutoModelForCausalLM, CLIPModel

    from mmgen.toy import clip as toy_clip
    from mmgen.toy.data import caption_pairs
    from mmgen.toy.language import build_lm, perplexity

    images, captions = caption_pairs(world, "val")  # drawn with another seed: unseen images
    tokenizer = build_world_tokenizer()
    lm = AutoModelForCausalLM.from_pretrained(TOY_WORLD_DIR / "opt")
    torch.manual_seed(0)
    assert perplexity(lm, tokenizer, captions) < 2.5  # the grammar's own entropy puts the floor near 1.7
    assert perplexity(build_lm("opt", tokenizer), tokenizer, captions) > 50  # untrained: about the vocabulary
    model = CLIPModel.from_pretrained(TOY_WORLD_DIR / "clip").eval()
    accuracy = toy_clip.zero_shot_accuracy(model, build_world_tokenizer(clip=True), images,
                                           [toy.parse_caption(c) for c in captions])
    assert accuracy["shape"] >= 0.9 and accuracy["color"] >= 0.95


def test_pretrain_is_deterministic_in_one_process_or_two(tmp_path: Path) -> None:
    """The same files whether the lanes (the LMs beside the judge and diffusion model) run one
    after the other or in two processes; the record holds every stage of both lanes."""
    from mmgen.cli import main

    args = ["toy", "pretrain", "--quick", "--stages", "world,tokenizer,opt,judge", "--world", str(tmp_path / "world")]
    first = main(args + ["--out", str(tmp_path / "a"), "--jobs", "1"])
    second = main(args + ["--out", str(tmp_path / "b"), "--jobs", "2"])
    for file in ("opt/model.safetensors", "judge/model.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    assert first["stages"]["opt"]["last_loss"] < first["stages"]["opt"]["first_loss"]
    for folder, record in (("a", first), ("b", second)):
        on_disk = json.loads((tmp_path / folder / "pretrain.json").read_text())
        assert on_disk == record and on_disk["stages"].keys() == {"world", "tokenizer", "opt", "judge"}
    assert (first["jobs"], second["jobs"]) == (1, 2)


def test_probe_recall_tells_carried_from_missing_and_buried_captions() -> None:
    """The linear probes that say whether an LM's state carries the caption: states that are a
    linear view of the image features are retrieved; states independent of them are not; and
    the same states buried under a large offset shared by all (what the first toy LMs gave FROMAGe)
    still carry the caption for least squares but not for FROMAGe's head in its budget."""
    from mmgen.toy.language import probe_recall

    torch.manual_seed(0)
    features, val_features = torch.randn(1024, 32), torch.randn(128, 32)  # (n, f) "images"
    view = torch.randn(32, 48) / 32 ** 0.5
    states, val_states = features @ view + 0.05 * torch.randn(1024, 48), val_features @ view  # (n, d)
    assert probe_recall(states, features, val_states, val_features) >= 0.9
    assert probe_recall(states, features, val_states, val_features, fit="least_squares") >= 0.9
    noise, val_noise = torch.randn(1024, 48), torch.randn(128, 48)
    assert probe_recall(noise, features, val_noise, val_features) <= 0.08  # chance: 1/128
    offset = 30 * torch.randn(48)
    buried, val_buried = 0.05 * states + offset, 0.05 * val_states + offset
    assert probe_recall(buried, features, val_buried, val_features, fit="least_squares") >= 0.9
    assert probe_recall(buried, features, val_buried, val_features) <= 0.3
    with pytest.raises(ValueError, match="fit must be"):
        probe_recall(states, features, val_states, val_features, fit="ridge")


def test_shipped_lm_state_carries_the_caption_for_fromage(world: Path) -> None:
    """`caption_probe_recall` on the shipped OPT: FROMAGe's head on its frozen states at the
    caption's end retrieves held-out images. Measured on this small world: 0.875 (chance 1/64);
    the OPT of 600 steps at lr 3e-3, which never learned to answer from the caption, 0.30; the
    first toy OPT, whose attribute embeddings had collapsed, 0.09. (An untrained OPT of the same
    shape gets 0.77: random states keep the words apart.)"""
    from transformers import AutoModelForCausalLM

    from mmgen.toy.language import caption_probe_recall

    tokenizer = build_world_tokenizer()
    probe = caption_probe_recall(AutoModelForCausalLM.from_pretrained(TOY_WORLD_DIR / "opt"), tokenizer, world)
    assert probe["n"] == 64
    assert probe["contrastive_R@1"] >= 0.6 and probe["least_squares_R@1"] >= 0.8, probe


def test_shipped_lms_answer_from_the_caption(world: Path) -> None:
    """Asked about a held-out caption ("<caption> . what color is it ?"), the shipped LMs name the
    caption's own value; an untrained LM of the same shape answers at chance. Measured on the full
    world's 128 held-out captions: LLaMA 1.0 for every attribute; OPT shape and size 1.0, colour
    0.70, position 0.77, background 0.34 (before the 1e-3 recipe, OPT answered shape and colour at chance: 0.29, 0.19)."""
    from transformers import AutoModelForCausalLM

    from mmgen.toy.data import caption_pairs
    from mmgen.toy.language import answer_accuracy, build_lm

    tokenizer = build_world_tokenizer()
    captions = caption_pairs(world, "val")[1]
    llama = answer_accuracy(AutoModelForCausalLM.from_pretrained(TOY_WORLD_DIR / "llama"), tokenizer, captions)
    assert min(llama.values()) >= 0.9, llama
    opt = answer_accuracy(AutoModelForCausalLM.from_pretrained(TOY_WORLD_DIR / "opt"), tokenizer, captions)
    assert opt["shape"] >= 0.9 and opt["size"] >= 0.9 and sum(opt.values()) / 5 >= 0.7, opt
    torch.manual_seed(0)
    untrained = answer_accuracy(build_lm("opt", tokenizer), tokenizer, captions)
    assert sum(untrained.values()) / 5 <= 0.5, untrained  # chance: 0.32 on average


# -- the methods on top ------------------------------------------------------------------------------
def _fit(config: str, tmp_path: Path, world: Path, *extra: str):
    from mmgen.cli import main

    runs = tmp_path / "runs"
    return main(["fit", "--config", config, f"--trainer.default_root_dir={runs}", "--trainer.logger=false",
                 "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", f"--data.init_args.root={world}",
                 *[f"--data.init_args.{k}={v}" for k, v in SMALL.items()], *extra])


def test_fromage_learns_retrieval_on_the_shipped_backbones(tmp_path: Path, world: Path) -> None:
    cli = _fit("configs/fromage_toy.yaml", tmp_path, world, "--trainer.max_epochs=10", "--trainer.max_steps=100")
    after = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    # The same model before training (its random projections already rank a little above chance).
    before = _validate("configs/fromage_toy.yaml", world)
    assert after["val/chance_R@1"] == 1 / 64
    assert after["val/contrastive"] < before["val/contrastive"] - 0.3, (before, after)
    # Measured here after 100 steps: text-to-image R@1 0.61 and R@10 0.98 (0.016 and 0.19 before
    # training; chance 1/64 and 10/64), image-to-text R@1 0.72. A broken contrastive loss, a [RET]
    # state cut off from the gradient or read at the wrong token stays near chance.
    assert after["val/t2i_R@10"] >= max(2.5 * 10 / 64, before["val/t2i_R@10"] + 0.2), (before, after)
    assert after["val/t2i_R@1"] >= 0.3 and after["val/i2t_R@1"] >= 0.3, (before, after)


def _validate(config: str, world: Path) -> dict[str, float]:
    from mmgen.cli import main

    cli = main(["validate", "--config", config, "--trainer.logger=false", "--trainer.callbacks=[]",
                f"--data.init_args.root={world}", *[f"--data.init_args.{k}={v}" for k, v in SMALL.items()]])
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def test_gill_mapper_learns_the_diffusion_models_conditioning(tmp_path: Path, world: Path) -> None:
    """GILL's generation loss (mapper output vs the toy diffusion model's own caption embeddings)
    falls well below the untrained mapper's, and retrieval through [IMG0] rises far above chance.
    Whether the images it draws are right takes a longer run: benchmarks/bench_toy_world.py
    (docs/toy_world.md)."""
    before = _validate("configs/gill_toy.yaml", world)
    cli = _fit("configs/gill_toy.yaml", tmp_path, world, "--trainer.max_epochs=10", "--trainer.max_steps=80")
    after = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    # Measured here: 9.38 untrained -> 5.10 after 80 steps; a mapper that never trains stays at 1.0x.
    assert after["val/gen"] < 0.8 * before["val/gen"], (before, after)
    # [IMG0]'s state carries the caption: text-to-image recall@10 over the 64 held-out images,
    # measured here 0.25 before -> 1.0 after (chance 10/64 = 0.16), and recall@1 0.03 -> 0.47 (chance
    # 1/64); cut off from the LM's states, or read at the wrong token, they stay near chance.
    assert after["val/t2i_R@10"] >= max(2 * 10 / 64, before["val/t2i_R@10"] + 0.2), (before, after)
    assert after["val/t2i_R@1"] >= 0.25, (before, after)


def test_minigpt5_vokens_learn_the_diffusion_models_conditioning(tmp_path: Path) -> None:
    """MiniGPT-5's stage 1 on the toy world (the shipped world's captions; its held-out ones
    validate): the mapper's output from the vokens' states moves toward each caption's own
    embedding (the caption loss, an MSE) far past the average caption embedding's (0.82), and the
    LM learns to answer with the vokens. A mapper cut off from the vokens' states can reach no
    better than the average; a broken voken mask leaves the text loss high."""
    from mmgen.cli import main

    stage = '[{"class_path": "mmgen.methods.stages.TrainingStages", "init_args": {"stages": ["uas"]}}]'
    args = ["--config", "configs/minigpt5_stage1_toy.yaml", "--trainer.logger=false", f"--trainer.callbacks={stage}",
            "--data.init_args.val=mmgen.data.toy.ToyWorldCaptionGeneration", "--data.init_args.val.split=test"]
    before = main(["validate", *args]).trainer.callback_metrics
    cli = main(["fit", *args, f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_checkpointing=false",
                "--trainer.max_steps=150", "--trainer.val_check_interval=150"])
    after = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    before = {k: float(v) for k, v in before.items()}
    # Measured here: caption MSE 2.00 -> 0.45, text loss 10.0 -> 1.56 after 150 steps.
    assert after["val/caption"] < 0.6, (before, after)
    assert after["val/text"] < 0.5 * before["val/text"], (before, after)
