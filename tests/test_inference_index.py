"""The retrieval index: planted items found, shown images skipped, another model's index refused,
missing images and damaged files refused, save/load round trip, FAISS = exact, `mmgen index`."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_clip, tiny_llm
from mmgen.errors import ConfigError, DataError
from mmgen.inference.index import (
    EMBEDDINGS_FILE, META_FILE, PATHS_FILE, RetrievalIndex, fingerprint, list_images,
)
from mmgen.inference.types import RetrievedImage


def _planted(n=200, e=16, seed=0):
    """Random unit embeddings, and queries that are noisy copies of rows 7, 42 and 150."""
    g = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(n, e, generator=g), dim=-1)
    planted = [7, 42, 150] if n > 150 else [0, 1, 2]
    queries = embeddings[planted] + 0.05 * torch.randn(len(planted), e, generator=g)
    paths = [f"img_{i:04d}.png" for i in range(n)]
    return embeddings, paths, planted, queries


def _image_folder(root, n, size=32):
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (size, size), colour).save(root / f"img_{i:04d}.png")
    return root


def test_search_finds_planted_items_with_cosine_scores():
    embeddings, paths, planted, queries = _planted()
    index = RetrievalIndex(embeddings * 3.0, paths, root="store")  # rows normalised on the way in
    results = index.search(queries * 10.0, k=3)  # queries too
    assert [hits[0].path for hits in results] == [f"store/img_{i:04d}.png" for i in planted]
    for hits, row, query in zip(results, planted, queries):
        assert [h.rank for h in hits] == [0, 1, 2]
        assert hits[0].score == pytest.approx(float(F.cosine_similarity(query, embeddings[row], dim=0)), abs=1e-5)
        assert hits[0].score >= hits[1].score >= hits[2].score
    assert isinstance(results[0][0], RetrievedImage)


def test_images_already_shown_are_skipped():
    embeddings, paths, planted, queries = _planted()
    index = RetrievalIndex(embeddings, paths, root="store")
    first = index.search(queries, k=2)
    shown = [{first[0][0].path}, set(), {"store/./img_0150.png"}]  # any spelling of the same file
    results = index.search(queries, k=2, exclude=shown)
    assert results[0][0].path == first[0][1].path and results[0][0].rank == 0
    assert results[1][0].path == "store/img_0042.png"
    assert all(h.path != "store/img_0150.png" for h in results[2])
    assert len(results[0]) == 2
    # fewer images left than k: a shorter list, never an excluded image
    small = RetrievalIndex(embeddings[:3], paths[:3])
    hits = small.search(embeddings[:1], k=3, exclude=[{paths[0], paths[1]}])[0]
    assert [h.path for h in hits] == [paths[2]]


def test_save_load_round_trip(tmp_path):
    store = _image_folder(tmp_path / "images", 12)
    embeddings = F.normalize(torch.randn(12, 8), dim=-1)
    paths = sorted(p.name for p in store.iterdir())
    index = RetrievalIndex(embeddings, paths, root=store, model_fingerprint="sha256:abc",
                           meta={"model": {"source": "x.ckpt"}})
    out = index.save(tmp_path / "index", dtype="float32")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["format"] == "mmgen-retrieval-index" and meta["version"] == 1
    assert meta["count"] == 12 and meta["embed_dim"] == 8 and meta["dtype"] == "float32"
    assert meta["image_root"] == "../images"  # relative to the index folder: they move together
    assert meta["model"] == {"source": "x.ckpt", "fingerprint": "sha256:abc"}
    loaded = RetrievalIndex.load(out)
    torch.testing.assert_close(loaded.embeddings, index.embeddings)
    assert loaded.paths == paths and loaded.model_fingerprint == "sha256:abc"
    hits = loaded.search(embeddings[5], k=1)[0]
    assert hits[0].path == str(loaded.root / paths[5]) and hits[0].score == pytest.approx(1.0, abs=1e-5)
    # float16 storage: half the size, same top-1
    half = RetrievalIndex(embeddings, paths, root=store).save(tmp_path / "half")
    assert json.loads((half / META_FILE).read_text())["dtype"] == "float16"
    assert RetrievalIndex.load(half).search(embeddings[5], k=1)[0][0].path.endswith(paths[5])


def test_missing_images_are_refused_naming_them(tmp_path):
    store = _image_folder(tmp_path / "images", 4)
    paths = sorted(p.name for p in store.iterdir())
    out = RetrievalIndex(F.normalize(torch.randn(4, 8), dim=-1), paths, root=store).save(tmp_path / "index")
    (store / paths[2]).unlink()
    with pytest.raises(DataError, match=rf"index.*1 of 4 indexed images are missing: .*{paths[2]}"):
        RetrievalIndex.load(out)
    # without the check at load, a result whose file is missing is refused when returned
    lazy = RetrievalIndex.load(out, check_images=False)
    lazy.search(lazy.embeddings[0], k=1)  # present: fine
    with pytest.raises(DataError, match=rf"retrieved images are missing: .*{paths[2]}"):
        lazy.search(lazy.embeddings[2], k=1)


def test_damaged_index_files_are_refused_naming_the_file(tmp_path):
    store = _image_folder(tmp_path / "images", 3)
    paths = sorted(p.name for p in store.iterdir())

    def fresh(name):
        return RetrievalIndex(F.normalize(torch.randn(3, 8), dim=-1), paths, root=store).save(tmp_path / name)

    with pytest.raises(DataError, match="no such folder"):
        RetrievalIndex.load(tmp_path / "nothing")
    out = fresh("a")
    (out / META_FILE).unlink()
    with pytest.raises(DataError, match=rf"{META_FILE}"):
        RetrievalIndex.load(out)
    out = fresh("b")
    data = (out / EMBEDDINGS_FILE).read_bytes()
    (out / EMBEDDINGS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{EMBEDDINGS_FILE}: not a readable safetensors"):
        RetrievalIndex.load(out)
    out = fresh("c")
    (out / PATHS_FILE).write_text(json.dumps(paths[:2]))
    with pytest.raises(DataError, match=rf"{PATHS_FILE}: 2 paths, but {META_FILE} says count=3"):
        RetrievalIndex.load(out)
    out = fresh("d")
    meta = json.loads((out / META_FILE).read_text())
    meta["version"] = 99
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError, match="version 99"):
        RetrievalIndex.load(out)
    out = fresh("e")
    (out / META_FILE).write_text("{not json")
    with pytest.raises(DataError, match=rf"{META_FILE}: not valid JSON"):
        RetrievalIndex.load(out)


@pytest.fixture
def fromage():
    from mmgen.methods.fromage import FROMAGe

    model = FROMAGe(tiny_llm("opt"), tiny_clip())
    model.configure_model()
    return model.eval()


def test_build_embeds_with_the_models_image_side_and_refuses_another_models_index(fromage, tmp_path):
    from mmgen.data.images import load_image

    store = _image_folder(tmp_path / "images", 5)
    index = RetrievalIndex.build(fromage, store, batch_size=2)
    assert len(index) == 5 and index.paths == [f"img_{i:04d}.png" for i in range(5)]
    pixels = torch.stack([load_image(store / p, 32) for p in index.paths])
    expected = fromage.retrieval_head.embed_image(fromage.visual_encoder(pixels).float())
    torch.testing.assert_close(index.embeddings, expected, atol=1e-5, rtol=1e-5)
    # an image's own embedding as the query finds that image first
    assert index.search(expected[3], k=1)[0][0].path.endswith("img_0003.png")

    out = index.save(tmp_path / "index")
    loaded = RetrievalIndex.load(out)
    loaded.check_model(fromage)  # same model: fine
    assert fingerprint(fromage) == loaded.model_fingerprint
    # a float copy-cast of the same model has the same fingerprint
    assert fingerprint(fromage.to(torch.bfloat16).float()) == loaded.model_fingerprint

    with torch.no_grad():
        fromage.retrieval_head.image_proj.weight.add_(0.01)  # another trained image projection
    with pytest.raises(ConfigError, match=rf"retrieval index {out} was made by another model"):
        loaded.check_model(fromage)
    with torch.no_grad():
        fromage.retrieval_head.image_proj.weight.sub_(0.01)
        fromage.retrieval_head.text_proj.weight.add_(1.0)  # the text side does not matter
    loaded.check_model(fromage)
    torch.manual_seed(1)
    other = type(fromage)(tiny_llm("opt"), tiny_clip(seed=1))  # another (random) visual encoder
    other.configure_model()
    other.retrieval_head.image_proj.load_state_dict(fromage.retrieval_head.image_proj.state_dict())
    with pytest.raises(ConfigError, match="made by another model"):
        loaded.check_model(other)


def test_models_without_a_retrieval_head_cannot_build(tmp_path):
    class NoHead(torch.nn.Module):
        visual_encoder = None

    with pytest.raises(ConfigError, match="cannot embed images for retrieval"):
        RetrievalIndex.build(NoHead(), _image_folder(tmp_path / "i", 1))


def test_list_images_from_a_tsv_and_missing_files(tmp_path):
    store = _image_folder(tmp_path / "images", 3)
    tsv = tmp_path / "val.tsv"
    tsv.write_text("caption\timage\na\timg_0000.png\nb\timg_0002.png\n")
    root, paths, _ = list_images(tsv, image_dir=store)
    assert root == store and paths == ["img_0000.png", "img_0002.png"]
    (tmp_path / "bad.tsv").write_text("caption\tpicture\na\tx.png\n")
    with pytest.raises(DataError, match="bad.tsv: header has no 'image' or 'image_path' column"):
        list_images(tmp_path / "bad.tsv")
    with pytest.raises(DataError, match="no such image folder or caption TSV"):
        list_images(tmp_path / "absent")
    (tmp_path / "gone.tsv").write_text("caption\timage\na\tnope.png\n")

    class Model(torch.nn.Module):  # only reached after the listing is checked
        def __init__(self):
            super().__init__()
            self.visual_encoder = torch.nn.Identity()
            self.retrieval_head = torch.nn.Linear(2, 2)
            self.retrieval_head.embed_image = lambda x: x

    with pytest.raises(DataError, match=r"1 of 1 indexed images are missing: .*nope.png"):
        RetrievalIndex.build(Model(), tmp_path / "gone.tsv", image_dir=store)


def test_faiss_gives_the_exact_top_k():
    pytest.importorskip("faiss")
    embeddings, paths, planted, queries = _planted(n=500, e=32)
    exact = RetrievalIndex(embeddings, paths)
    flat = RetrievalIndex(embeddings, paths, backend="faiss")
    shown = [{paths[planted[0]]}, set(), set()]
    for exclude in (None, shown):
        a, b = exact.search(queries, k=5, exclude=exclude), flat.search(queries, k=5, exclude=exclude)
        assert [[h.path for h in hits] for hits in a] == [[h.path for h in hits] for hits in b]
        for ha, hb in zip(a, b):
            assert [h.score for h in ha] == pytest.approx([h.score for h in hb], abs=1e-5)


def test_trained_faiss_index_is_saved_and_reloaded(tmp_path):
    pytest.importorskip("faiss")
    store = _image_folder(tmp_path / "images", 64)
    paths = sorted(p.name for p in store.iterdir())
    embeddings = F.normalize(torch.randn(64, 16), dim=-1)
    ivf = RetrievalIndex(embeddings, paths, root=store, backend="faiss", faiss_factory="IVF4,Flat", faiss_nprobe=4)
    top = ivf.search(embeddings[:4], k=3)
    out = ivf.save(tmp_path / "index")
    assert (out / "faiss.index").is_file()
    assert json.loads((out / META_FILE).read_text())["faiss"]["factory"] == "IVF4,Flat"
    loaded = RetrievalIndex.load(out, backend="faiss", faiss_nprobe=4)
    assert loaded._faiss is not None  # read, not rebuilt
    assert [[h.path for h in hits] for hits in loaded.search(embeddings[:4], k=3)] == [[h.path for h in hits] for hits in top]
    # nprobe = all lists: the exact answer
    assert [h.path for h in loaded.search(embeddings[9], k=1)[0]] == [str(loaded.root / paths[9])]


def test_bad_queries_and_backend_are_refused():
    embeddings, paths, _, _ = _planted(n=10, e=8)
    index = RetrievalIndex(embeddings, paths)
    with pytest.raises(ConfigError, match=r"queries must be \(q, 8\)"):
        index.search(torch.randn(2, 4))
    with pytest.raises(ConfigError, match="2 queries but 1 exclude sets"):
        index.search(torch.randn(2, 8), exclude=[set()])
    with pytest.raises(ConfigError, match="unknown retrieval index backend"):
        RetrievalIndex(embeddings, paths, backend="annoy")


def test_mmgen_index_build_and_info(tmp_path):
    """`mmgen index build` from a pretrained folder (backbones saved locally, so a reload is the
    same model): the index it writes is accepted by that model and refused by another."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    from conftest import TINY_CLIP_VISION, TINY_OPT, TOY_TOKENIZER
    from mmgen.cli import main
    from mmgen.pretrained import build_model, load_pretrained

    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_OPT)).save_pretrained(tmp_path / "opt")
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)).save_pretrained(tmp_path / "clip")
    config = {"class_path": "FROMAGe", "init_args": {
        "llm": {"class_path": "CausalLM", "init_args": {"name_or_path": str(tmp_path / "opt"), "tokenizer": TOY_TOKENIZER}},
        "visual_encoder": {"class_path": "CLIPVisionEncoder", "init_args": {"name_or_path": str(tmp_path / "clip")}},
        "retrieval_head": {"class_path": "RetrievalHead", "init_args": {"embed_dim": 16}},
    }}
    model = build_model(config)
    model.configure_model()
    model.save_pretrained(tmp_path / "fromage")
    store = _image_folder(tmp_path / "images", 6)

    index = main(["index", "build", "--model", str(tmp_path / "fromage"), "--images", str(store),
                  "--out", str(tmp_path / "index"), "--batch-size", "4", "--device", "cpu"])
    assert len(index) == 6
    loaded = RetrievalIndex.load(tmp_path / "index")
    assert loaded.meta["model"]["source"] == str(tmp_path / "fromage")
    assert loaded.meta["model"]["class"] == "mmgen.methods.fromage.FROMAGe"
    loaded.check_model(load_pretrained(tmp_path / "fromage"))
    other = build_model(config)
    other.configure_model()  # same backbones, another (untrained) image projection
    with pytest.raises(ConfigError, match="made by another model"):
        loaded.check_model(other)
    assert len(main(["index", "info", str(tmp_path / "index")])) == 6
