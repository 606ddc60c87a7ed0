"""The toy world: deterministic files, a closed vocabulary the toy tokenizer covers, a reusable cache."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mmgen.data.captions import CaptionImageDataset
from mmgen.data.toy import TOY_COLORS, TOY_SHAPES, ToyCaptionDataModule, toy_vocabulary, write_toy_dataset
from mmgen.data.toy_tokenizer import TOY_TOKENIZER_DIR, build_toy_tokenizer


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def captions(root: Path) -> list[str]:
    rows = [row for name in ("train.tsv", "val.tsv") for row in (root / name).read_text().splitlines()[1:]]
    return [row.split("\t")[0] for row in rows]


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    write_toy_dataset(tmp_path / "a", n_train=12, n_val=4, seed=3)
    write_toy_dataset(tmp_path / "b", n_train=12, n_val=4, seed=3)
    write_toy_dataset(tmp_path / "c", n_train=12, n_val=4, seed=4)
    a, b, c = (file_bytes(tmp_path / name) for name in "abc")
    assert len(a) == 12 + 4 + 3  # images, two TSVs, marker
    assert a == b
    assert a["train.tsv"] != c["train.tsv"] and a["images/train_00000.png"] != c["images/train_00000.png"]


def test_toy_dataset_reads_as_caption_tsv(tmp_path: Path) -> None:
    write_toy_dataset(tmp_path, n_train=6, n_val=2, image_size=16)
    dataset = CaptionImageDataset(tmp_path / "train.tsv", tmp_path / "images", image_size=16)
    assert len(dataset) == 6 and dataset[0]["image"].shape == (3, 16, 16)


def test_captions_use_the_toy_vocabulary(tmp_path: Path) -> None:
    write_toy_dataset(tmp_path, n_train=64, n_val=16)
    vocabulary = set(toy_vocabulary())
    assert toy_vocabulary() == sorted(vocabulary) and len(vocabulary) < 40
    assert set(TOY_COLORS) | set(TOY_SHAPES) <= vocabulary
    for caption in captions(tmp_path):
        words = caption.split()
        assert set(words) <= vocabulary, caption
        assert words[1] != words[4], f"shape and background share a colour: {caption}"


def test_tokenizer_knows_every_caption_word(tmp_path: Path, tokenizer) -> None:
    write_toy_dataset(tmp_path, n_train=64, n_val=16)
    for caption in captions(tmp_path):
        ids = tokenizer(caption).input_ids
        assert tokenizer.unk_token_id not in ids, caption
        assert len(ids) == len(caption.split()) + 1  # one token per word, plus BOS


def test_tokenizer_special_tokens_like_opt(tokenizer) -> None:
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id  # OPT: both are </s>
    assert tokenizer("a red circle").input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.padding_side == "right"
    ids = tokenizer("###Human: generate an image ###Assistant:").input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) == 6  # dialogue markers are one token each


def test_marker_skips_or_regenerates(tmp_path: Path) -> None:
    write_toy_dataset(tmp_path, n_train=4, n_val=2, seed=0)
    marker = json.loads((tmp_path / "DONE").read_text())
    assert marker["n_train"] == 4 and marker["seed"] == 0

    # Same parameters: nothing is rewritten (a planted change survives).
    (tmp_path / "train.tsv").write_text("caption\timage\n")
    write_toy_dataset(tmp_path, n_train=4, n_val=2, seed=0)
    assert (tmp_path / "train.tsv").read_text() == "caption\timage\n"

    # Other parameters: regenerated, and images of the old, larger split do not linger.
    write_toy_dataset(tmp_path, n_train=3, n_val=2, seed=0)
    assert len(captions(tmp_path)) == 5
    assert not (tmp_path / "images" / "train_00003.png").exists()
    assert json.loads((tmp_path / "DONE").read_text())["n_train"] == 3

    # No marker (an interrupted write): regenerated.
    (tmp_path / "DONE").unlink()
    (tmp_path / "train.tsv").write_text("caption\timage\n")
    write_toy_dataset(tmp_path, n_train=3, n_val=2, seed=0)
    assert len(captions(tmp_path)) == 5 and (tmp_path / "DONE").is_file()


def test_toy_datamodule_generates_on_setup(tmp_path: Path) -> None:
    datamodule = ToyCaptionDataModule(
        root=str(tmp_path / "toy"), n_train=10, n_val=3, image_size=16, batch_size=4
    )
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 2 and batches[0]["images"].shape == (4, 3, 16, 16)
    assert sum(len(batch["captions"]) for batch in datamodule.val_dataloader()) == 3


def test_saved_tokenizer_equals_built_one(tokenizer) -> None:
    saved = AutoTokenizer.from_pretrained(TOY_TOKENIZER_DIR)  # a local folder: no network
    assert saved.get_vocab() == tokenizer.get_vocab()
    assert saved.all_special_tokens == tokenizer.all_special_tokens
    for text in [
        "a red circle on a blue background",
        "###Human: show me the next picture ###Assistant:",
        "zebra .",
    ]:
        assert saved(text).input_ids == tokenizer(text).input_ids
    assert (saved.bos_token_id, saved.eos_token_id, saved.pad_token_id) == (1, 1, 0)
    assert saved.padding_side == "right"


def _write_slowly(root: str) -> None:
    write_toy_dataset(Path(root), n_train=96, n_val=16)


def test_ranks_writing_on_first_use_wait_for_one_writer(tmp_path: Path) -> None:
    """Every DDP rank builds the toy data on first use; they must not read half-written files or
    delete each other's images as stale: one writes, the others wait and find it done."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(3) as pool:
        pool.map(_write_slowly, [str(tmp_path / "toy")] * 3)
    root = tmp_path / "toy"
    single = tmp_path / "single"
    write_toy_dataset(single, n_train=96, n_val=16)
    assert file_bytes(root) == file_bytes(single)  # complete, and as one writer leaves it
