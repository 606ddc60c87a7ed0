"""Evaluation protocols on constructed data where the answer is known: recall with a planted true
image and excluded context images, FID / IS / LPIPS / CLIP-I properties, the readers' errors, the
generation cache, and the results table."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TOY_TOKENIZER, tiny_clip, tiny_llm
from PIL import Image

from mmgen.errors import DataError
from mmgen.evaluation import metrics
from mmgen.evaluation.extractors import CLIPFeatures, LPIPSAlex, InceptionFeatures
from mmgen.evaluation.generation import GenerationCache, GenerationOptions, _path_key, _produce, image_request, rank_images
from mmgen.evaluation.tasks import Item, visdial_settings, vist_settings

TINY_CLIP = dict(projection_dim=16,
                 text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, max_position_embeddings=32),
                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, image_size=32, patch_size=8))


def tiny_clip_features():
    return CLIPFeatures(config=TINY_CLIP, tokenizer=TOY_TOKENIZER)


def tiny_inception():
    return InceptionFeatures(random_weights=True, image_size=75)


def images(n, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 32, 32, generator=g) * (1 - shift) + shift).clamp(0, 1)


# -- metrics -------------------------------------------------------------------------------------
def test_recall_at_k_counts_the_true_item_in_the_first_k():
    ranked = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"]]
    assert metrics.recall_at_k(ranked, ["a", "a", "a"], ks=(1, 2, 3)) == pytest.approx(
        {"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100.0})


def test_fid_of_identical_sets_is_near_zero_and_of_shifted_sets_larger():
    extractor = tiny_clip_features()  # any extractor: 16-d features keep the matrix square roots fast
    real = images(24, seed=1)
    same = metrics.fid(extractor, [real[:12], real[12:]], [real])
    other = metrics.fid(extractor, [real], [images(24, seed=2)])
    shifted = metrics.fid(extractor, [real], [images(24, seed=2, shift=0.6)])
    assert abs(same) < 1e-2 * max(shifted, 1e-6)
    assert shifted > other > same


def test_inception_score_of_one_class_is_one():
    extractor = tiny_inception()
    extractor.configure()
    # random BatchNorm statistics blow features up and saturate the softmax (0 * log 0 = nan):
    # the test classifies normalised features instead
    head = torch.nn.Linear(extractor.num_features, 10).double()
    extractor.logits = lambda x: head(torch.nn.functional.normalize(extractor(x), dim=-1))
    same = images(1).repeat(8, 1, 1, 1)  # one image: one class distribution -> IS exactly 1
    mean, _ = metrics.inception_score(extractor, [same], splits=2)
    assert mean == pytest.approx(1.0, abs=1e-5)
    varied, _ = metrics.inception_score(extractor, [images(8, seed=3)], splits=2)
    assert varied >= 1.0


def test_lpips_and_clip_similarity_of_an_image_with_itself():
    lpips = LPIPSAlex(random_weights=True, image_size=64)
    a, b = images(3, seed=4), images(3, seed=5)
    assert torch.allclose(lpips(a, a), torch.zeros(3), atol=1e-6)
    assert bool((lpips(a, b) > 0).all())
    clip = tiny_clip_features()
    assert torch.allclose(metrics.clip_image_similarity(clip, a, a), torch.ones(3), atol=1e-5)
    assert bool((metrics.clip_image_similarity(clip, a, b) < 1 - 1e-4).all())
    # text side and the relevance score: a response identical to its reference scores 1
    assert metrics.clip_f1(clip, [["a red circle", a[0]]], [["a red circle", a[0]]]) == pytest.approx(1.0, abs=1e-5)


def test_lpips_uses_the_shipped_linear_layers_not_random_ones():
    first, second = LPIPSAlex(random_weights=True), LPIPSAlex(random_weights=True)
    first.configure(), second.configure()
    assert torch.equal(first.net.lin0.model[-1].weight, second.net.lin0.model[-1].weight)


def test_text_scores_are_perfect_for_identical_text_and_lower_otherwise():
    refs = ["a red circle on a blue background", "a green square on a red background"]
    same = metrics.text_scores(refs, refs)
    assert same["BLEU-1"] == pytest.approx(100.0) and same["BLEU-4"] == pytest.approx(100.0)
    assert same["ROUGE-L"] == pytest.approx(100.0)
    other = metrics.text_scores(["a blue circle", "a square"], refs)
    assert other["BLEU-1"] < 100 and other["ROUGE-L"] < 100
    if same["CIDEr"] is not None:
        assert same["CIDEr"] > other["CIDEr"]


# -- readers ---------------------------------------------------------------------------------------
def _vist(tmp_path, n_stories=4):
    from mmgen.data.vist import write_toy_vist

    return write_toy_vist(tmp_path / "vist", n_stories, n_steps=5, image_size=32, name="val")


def test_vist_settings_hold_the_papers_three_contexts(tmp_path):
    path = _vist(tmp_path)
    settings, candidates = vist_settings(str(path))
    assert list(settings) == ["1 caption", "5 captions", "5 captions + 4 images"]
    assert len(candidates) == 20  # every image of the split
    one, five, interleaved = (settings[k][0] for k in settings)
    assert len(one.context) == 1 and one.shown == set()
    assert [type(p).__name__ for p in interleaved.context] == ["str", "ImageRef"] * 4 + ["str"]
    assert one.target_image == five.target_image == interleaved.target_image
    assert str(interleaved.target_image) not in interleaved.shown and len(interleaved.shown) == 4
    assert interleaved.caption is None and one.caption == one.context[0]  # no baseline with images


def test_missing_images_are_named_with_their_story(tmp_path):
    path = _vist(tmp_path)
    (path.parent / "images" / "00024.png").unlink()
    with pytest.raises(DataError, match=r"story 2: image not found: .*00024.png"):
        vist_settings(str(path))


def _visdial(tmp_path, n=3, missing=False):
    folder = tmp_path / "visdial"
    folder.mkdir(parents=True)
    dialogs = []
    for i in range(n):
        if not (missing and i == 1):
            Image.new("RGB", (32, 32), (80 * i, 20, 200)).save(folder / f"VisualDialog_val2018_{i:012d}.jpg")
        dialogs.append({"image_id": i, "caption": f"picture {i}",
                        "dialog": [{"question": r % 2, "answer": r % 2} for r in range(10)]})
    data = {"split": "val2018", "data": {"questions": ["is it red", "is it big"], "answers": ["yes", "no"],
                                         "dialogs": dialogs}}
    path = folder / "visdial_1.0_val.json"
    path.write_text(json.dumps(data))
    return path


def test_visdial_rounds_and_errors(tmp_path):
    settings, candidates = visdial_settings(str(_visdial(tmp_path)))
    assert list(settings) == ["1 round", "5 rounds", "10 rounds"] and len(candidates) == 3
    assert settings["1 round"][0].context == ["Q: is it red? A: yes."]
    assert settings["10 rounds"][2].context[0].count("Q:") == 10
    with pytest.raises(DataError, match=r"dialogs\[1\] \(image_id 1\): image not found"):
        visdial_settings(str(_visdial(tmp_path / "b", missing=True)))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {"questions": [], "answers": [], "dialogs": [
        {"image_id": 0, "caption": "x", "dialog": [{"question": 3, "answer": 0}]}]}}))
    with pytest.raises(DataError, match=r"bad.json, dialogs\[0\], round 0: 'question' 3 is not an index"):
        visdial_settings(str(bad))


# -- retrieval: a planted true image, excluded context images ------------------------------------------
def test_retrieval_finds_a_planted_image_and_never_a_context_image(tmp_path):
    from mmgen.components.retrieval_head import RetrievalHead
    from mmgen.inference.index import RetrievalIndex
    from mmgen.methods.fromage import FROMAGe

    model = FROMAGe(tiny_llm("opt"), tiny_clip(), retrieval_head=RetrievalHead(embed_dim=16))
    model.configure_model()
    model.eval()
    settings, candidates = vist_settings(str(_vist(tmp_path)))
    items = settings["5 captions + 4 images"]
    index = RetrievalIndex.build(model, [str(c) for c in candidates])
    row_of = {_path_key(index.path_of(r)): r for r in range(len(index))}

    # the query each context gives, computed here with one plain forward of the LLM
    embeds, seq = model.prompt_batch([image_request(model, item.context) for item in items])
    hidden = model.llm(embeds, seq.attention_mask).hidden[:, -1]  # (b, d) at the appended [RET]
    queries = torch.nn.functional.normalize(model.retrieval_head.embed_text(hidden.float()), dim=-1)
    original = index.embeddings.clone()
    ranked = []
    for item, query in zip(items, queries):  # one item at a time: the tiny model's queries look alike
        # plant: the true image is the query's near-twin; a context image is the query itself
        index.embeddings = original.clone()
        index.embeddings[row_of[_path_key(item.target_image)]] = torch.nn.functional.normalize(
            query + 0.01 * torch.randn_like(query), dim=0)
        index.embeddings[row_of[_path_key(next(iter(item.shown)))]] = query
        ranked += rank_images(model, [item], index, k=10)
        assert not ({_path_key(p) for p in item.shown} & set(ranked[-1]))  # context excluded
    assert metrics.recall_at_k(ranked, [_path_key(i.target_image) for i in items])["R@1"] == 100.0


# -- the generation cache ----------------------------------------------------------------------------
def test_generation_cache_reuses_matching_images_and_keeps_seeds_by_item(tmp_path):
    items = [Item(f"s{i}", [f"caption {i}"], None, caption=f"caption {i}") for i in range(5)]
    cache = GenerationCache(tmp_path / "gen", "model.ckpt")
    options = GenerationOptions(seed=42, num_inference_steps=2)
    calls = []

    def make(run, first_seed):
        calls.append((list(run), first_seed))
        return [Image.new("RGB", (8, 8), (first_seed + j, 0, 0)) for j in range(len(run))]

    prompts = [i.caption for i in items]
    paths, made = _produce(items, cache, options, prompts, make, batch_size=2, progress=None)
    assert made == 5 and calls == [([0, 1], 42), ([2, 3], 44), ([4], 46)]
    for n, path in enumerate(paths):  # image n made with seed 42 + n, recorded beside it
        assert json.loads(path.with_suffix(".json").read_text())["seed"] == 42 + n
        with Image.open(path) as image:
            assert image.getpixel((0, 0))[0] == 42 + n
    paths[1].unlink()  # an interrupted run: image 1 missing; image 3's prompt changed
    prompts[3] = "another caption"
    calls.clear()
    again, made = _produce(items, cache, options, prompts, make, batch_size=2, progress=None)
    assert made == 2 and calls == [([1], 43), ([3], 45)]  # the same seeds as the uninterrupted run
    assert again == paths


def test_results_table_prints_the_papers_numbers_beside():
    from mmgen.evaluation.results import format_table

    settings = {"5 captions + 4 images": {"n": 3, "metrics": {"R@1": 33.3, "R@5": 100.0, "R@10": 100.0}}}
    table = format_table("vist-retrieval", "VIST", settings)
    assert "this model" in table and "FROMAGe (paper)" in table and "18.2" in table and "33.3" in table
