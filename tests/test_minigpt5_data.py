"""MiniGPT-5 data in mmgen: the readers' layouts and errors, the toy data, batching and shuffling.

The official strings themselves are checked in tests/test_minigpt5_official_samples.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmgen.data.minigpt5_samples import VOKEN_STRING, caption_samples
from mmgen.errors import ConfigError, DataError

V = VOKEN_STRING  # "[IMG0][IMG1]...[IMG7]"
IMG = "<Img><ImageHere></Img>"


def _image(path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_caption_samples_plain_and_instruction():
    plain, = caption_samples("a dog", "x.jpg")
    assert (plain.source, plain.target, plain.caption) == ("a dog", f"{V} ###", "a dog")
    assert plain.input_images == [] and plain.output_images == ["x.jpg"]
    _, templ = caption_samples("a dog", "x.jpg", instruction="an image with caption:", system_prompt="")
    assert templ.source == "###Human: an image with caption: a dog ###Assistant:"


def _vist(tmp_path, records):
    (tmp_path / "img").mkdir(exist_ok=True)
    for r in records:
        _image(tmp_path / "img" / f"{r['photo_flickr_id']}.jpg")
    path = tmp_path / "sis.json"
    path.write_text(json.dumps({"annotations": [[r] for r in records]}))
    return path


def _story(n=3, story="s1"):
    # written out of order: the reader sorts by worker_arranged_photo_order
    return [{"story_id": story, "worker_arranged_photo_order": k, "text": f"cap {k}",
             "photo_flickr_id": f"{story}p{k}"} for k in reversed(range(n))]


def test_vist_sis_json_gives_the_same_samples_as_the_official_layout(tmp_path):
    from mmgen.data.vist import VISTDataset

    sis = VISTDataset(str(_vist(tmp_path, _story(3))), str(tmp_path / "img"), input_image_size=8,
                      output_image_size=8)
    steps = [{"caption": f"cap {k}", "image_id": f"s1p{k}", "sequence_index": k} for k in (2, 0, 1)]
    (tmp_path / "train_cleaned.json").write_text(json.dumps({"s1": steps}))
    (tmp_path / "train_image_mapping.json").write_text(json.dumps({f"s1p{k}": f"img/s1p{k}.jpg" for k in range(3)}))
    cleaned = VISTDataset(str(tmp_path / "train_cleaned.json"), input_image_size=8, output_image_size=8)
    assert [(s.source, s.target, s.input_images, s.output_images) for s in sis.samples] == \
           [(s.source, s.target, s.input_images, s.output_images) for s in cleaned.samples]
    assert len(sis.samples) == 1 + 2 * 3  # step 0: generate; steps 1, 2: three tasks each
    und = sis.samples[-1]
    assert any(und.source.endswith(f"###Human:cap 0{IMG}cap 1{IMG}\n {ask} {IMG} ###Assistant:") for ask in
               ("Tell me the next scene description by this image:", "What happen in the next scene image:"))
    item = sis[3]  # step 1, understand: two input images, no output image
    assert item["input_images"].shape == (2, 3, 8, 8) and item["output_images"].shape == (0, 3, 8, 8)


def test_vist_task_selection_and_last_step(tmp_path):
    from mmgen.data.vist import VISTDataset

    path = _vist(tmp_path, _story(3))
    full = VISTDataset(str(path), str(tmp_path / "img")).samples
    gen = VISTDataset(str(path), str(tmp_path / "img"), tasks=["generate"]).samples
    assert [s.source for s in gen] == [full[0].source, full[1].source, full[4].source]  # same phrasings
    last = VISTDataset(str(path), str(tmp_path / "img"), tasks=["generate"], last_step_only=True).samples
    assert [s.source for s in last] == [full[4].source]
    test_last = VISTDataset(str(path), str(tmp_path / "img"), split="test", last_step_only=True).samples
    assert [(s.target, len(s.input_images)) for s in test_last] == [(f"{V} ###", 2)]
    with pytest.raises(ConfigError, match="unknown VIST tasks"):
        VISTDataset(str(path), tasks=["caption"])
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        VISTDataset(str(path), split="val")


def test_vist_bad_records_are_named(tmp_path):
    from mmgen.data.vist import VISTDataset

    bad = _story(2)
    del bad[1]["text"]
    with pytest.raises(DataError, match=r"annotations\[1\].*missing \['text'\]"):
        VISTDataset(str(_vist(tmp_path, bad)), str(tmp_path / "img")).samples
    typed = _story(2)
    typed[0]["text"] = ["not", "text"]
    with pytest.raises(DataError, match=r"annotations\[0\] \(story s1\): 'text' must be a string, got list"):
        VISTDataset(str(_vist(tmp_path, typed)), str(tmp_path / "img")).samples
    gap = [r for r in _story(3, "s9") if r["worker_arranged_photo_order"] != 1]
    with pytest.raises(DataError, match="story s9 has photo orders"):
        VISTDataset(str(_vist(tmp_path, gap)), str(tmp_path / "img")).samples
    path = _vist(tmp_path, _story(2, "s3"))
    (tmp_path / "img" / "s3p1.jpg").unlink()
    with pytest.raises(DataError, match=r"story s3, step 1: image not found: .*s3p1.jpg"):
        VISTDataset(str(path), str(tmp_path / "img")).samples
    (tmp_path / "dup_cleaned.json").write_text(json.dumps({"7": [
        {"caption": "a", "image_id": "1", "sequence_index": 0}, {"caption": "b", "image_id": "2", "sequence_index": 0}]}))
    with pytest.raises(DataError, match=r"dup_cleaned.json, story 7: repeated sequence_index"):
        VISTDataset(str(tmp_path / "dup_cleaned.json")).samples


def test_mmdialog_images_are_found_beside_the_file_or_in_image_dir(tmp_path):
    from mmgen.data.mmdialog import MMDialogDataset

    conversation = [{"turn": [{"__TEXT__": "look"}, {"__MEDIA__": "m1"}]}, {"turn": [{"__TEXT__": "nice"}]}]
    path = tmp_path / "dialog.jsonl"
    path.write_text(json.dumps({"conversation_id": 1, "conversation": conversation}) + "\n\n")
    (tmp_path / "media").mkdir()
    _image(tmp_path / "media" / "m1.jpg")
    with pytest.raises(DataError, match="no samples"):  # m1.jpg not beside the file: stops, split empty
        MMDialogDataset(str(path), split="test").samples
    ds = MMDialogDataset(str(path), str(tmp_path / "media"), split="test", input_image_size=8)
    sample, = ds.samples
    assert sample.input_images == [tmp_path / "media" / "m1.jpg"] and sample.target == "nice ###"
    assert ds[0]["input_images"].shape == (1, 3, 8, 8)


def test_toy_data_is_read_by_the_minigpt5_readers(tmp_path):
    from mmgen.data.minigpt5_samples import ToyCaptionGenerationDataset
    from mmgen.data.vist import ToyVISTDataset

    cc3m = ToyCaptionGenerationDataset(str(tmp_path / "toy"), n_train=12, n_val=4, image_size=16,
                                       instruction_every=10)
    assert len(cc3m) == 12 + 2 and cc3m[1]["source"].endswith("###Assistant:")
    assert cc3m[0]["output_images"].shape == (1, 3, 16, 16) and cc3m[0]["input_images"].shape == (0, 3, 16, 16)
    test = ToyCaptionGenerationDataset(str(tmp_path / "toy"), split="test", n_train=12, n_val=4, image_size=16)
    assert len(test) == 4
    vist = ToyVISTDataset(str(tmp_path / "vist"), n_stories=2, n_steps=3, image_size=16)
    assert len(vist) == 2 * 7 and vist[3]["input_images"].shape == (2, 3, 16, 16)
    assert (tmp_path / "vist" / "train_cleaned.json").is_file()  # MiniGPT-5's layout, written on first use
    assert (tmp_path / "vist" / "train_image_mapping.json").is_file()


def test_training_data_is_shuffled(tmp_path):
    from mmgen.data.minigpt5_samples import MiniGPT5DataModule
    from mmgen.data.vist import VISTDataset

    records = [dict(r, text=f"{r['story_id']} {r['text']}") for s in range(6) for r in _story(2, f"s{s}")]
    ds = VISTDataset(str(_vist(tmp_path, records)), str(tmp_path / "img"), tasks=["generate"],
                     input_image_size=8, output_image_size=8)
    dm = MiniGPT5DataModule(train=ds, batch_size=12, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["sources"]) == sorted(s.source for s in ds.samples)
    assert batch["sources"] != [s.source for s in ds.samples]
    assert sorted(batch["n_input_images"]) == [0] * 6 + [1] * 6 and batch["output_images"].shape == (12, 3, 8, 8)
    assert isinstance(batch["input_images"], torch.Tensor) and batch["input_images"].shape == (6, 3, 8, 8)
    in_order = MiniGPT5DataModule(train=ds, batch_size=12, shuffle=False)  # the reference's order
    assert next(iter(in_order.train_dataloader()))["sources"] == [s.source for s in ds.samples]
