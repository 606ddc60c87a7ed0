"""MiniGPT-5 sample construction: CC3M (stage 1), VIST and MMDialog (stage 2)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmgen.data.minigpt5_samples import VOKEN_STRING, caption_sample
from mmgen.errors import DataError



V = VOKEN_STRING  # "[IMG0][IMG1]...[IMG7]"
IMG = "<Img><ImageHere></Img>"


def _image(path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_cc3m_sample_plain_and_instruction():
    plain = caption_sample("a dog", "x.jpg", instruction=False)
    assert (plain.source, plain.target, plain.caption) == ("a dog", f"{V} ###", "a dog")
    assert plain.input_images == [] and plain.output_images == ["x.jpg"]
    templ = caption_sample("a dog", "x.jpg", instruction=True)
    assert templ.source == "###Human: generate image with caption: a dog ###Assistant:"


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


def test_vist_sample_construction(tmp_path):
    from mmgen.data.vist import VISTDataset

    path = _vist(tmp_path, _story(3))
    ds = VISTDataset(str(path), str(tmp_path / "img"), image_size=8)
    samples = ds.samples
    assert len(samples) == 2 * 3  # steps 1 and 2, three tasks each
    gen, nxt, und = samples[3:6]  # step 2: history = steps 0 and 1
    history = f" cap 0 {IMG} cap 1 {IMG}"
    assert gen.source == f"###Human:{history} Generate an image with the scene description: cap 2 ###Assistant:"
    assert gen.target == f"{V} ###"
    assert nxt.source == f"###Human:{history} Tell me the next scene with image. ###Assistant:"
    assert nxt.target == f"cap 2 {V} ###"
    assert und.source == f"###Human:{history} Tell me the next scene description by this image: {IMG} ###Assistant:"
    assert und.target == "cap 2 ###"
    img = tmp_path / "img"
    assert gen.input_images == [img / "s1p0.jpg", img / "s1p1.jpg"] and gen.output_images == [img / "s1p2.jpg"]
    assert und.input_images == [img / "s1p0.jpg", img / "s1p1.jpg", img / "s1p2.jpg"] and und.output_images == []
    item = ds[3]
    assert item["input_images"].shape == (2, 3, 8, 8) and item["output_images"].shape == (1, 3, 8, 8)

    test = VISTDataset(str(path), str(tmp_path / "img"), tasks=["generate"], last_step_only=True)
    assert [s.source for s in test.samples] == [gen.source]


def test_vist_bad_records_are_named(tmp_path):
    from mmgen.data.vist import VISTDataset

    bad = _story(2)
    del bad[1]["text"]
    with pytest.raises(DataError, match=r"annotations\[1\].*missing \['text'\]"):
        VISTDataset(str(_vist(tmp_path, bad)), str(tmp_path / "img")).samples
    gap = [r for r in _story(3, "s9") if r["worker_arranged_photo_order"] != 1]
    with pytest.raises(DataError, match="story s9 has photo orders"):
        VISTDataset(str(_vist(tmp_path, gap)), str(tmp_path / "img")).samples
    path = _vist(tmp_path, _story(2, "s3"))
    (tmp_path / "img" / "s3p1.jpg").unlink()
    with pytest.raises(DataError, match=r"story s3, step 1: image not found: .*s3p1.jpg"):
        VISTDataset(str(path), str(tmp_path / "img")).samples


def _mmdialog(tmp_path, lines):
    (tmp_path / "media").mkdir(exist_ok=True)
    for m in ("m1", "m2"):
        _image(tmp_path / "media" / f"{m}.jpg")
    path = tmp_path / "dialog.jsonl"
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return path


def test_mmdialog_sample_construction(tmp_path):
    from mmgen.data.mmdialog import MMDialogDataset

    conv = {"conversation_id": 7, "conversation": [
        {"turn": [{"__TEXT__": "look at my cat"}, {"__MEDIA__": "m1"}]},
        {"turn": [{"__TEXT__": "so cute"}]},
        {"turn": [{"__TEXT__": "show me yours"}]},
        {"turn": [{"__TEXT__": "here it is"}, {"__MEDIA__": "m2"}]},
    ]}
    ds = MMDialogDataset(str(_mmdialog(tmp_path, [conv])), str(tmp_path / "media"), image_size=8)
    first, second = ds.samples
    assert first.source == f"###Human: look at my cat {IMG} ###Assistant:"
    assert first.target == "so cute ###" and first.output_images == []
    assert second.source == (f"###Human: look at my cat {IMG} ###Assistant: so cute "
                             "###Human: show me yours ###Assistant:")
    assert second.target == f"here it is {V} ###"
    assert second.input_images == [tmp_path / "media" / "m1.jpg"]
    assert second.output_images == [tmp_path / "media" / "m2.jpg"]
    assert ds[1]["output_images"].shape == (1, 3, 8, 8)


def test_mmdialog_bad_records_are_named(tmp_path):
    from mmgen.data.mmdialog import MMDialogDataset

    good = {"conversation_id": 1, "conversation": [{"turn": [{"__TEXT__": "hi"}]}]}
    path = _mmdialog(tmp_path, [good, "{not json"])
    with pytest.raises(DataError, match="dialog.jsonl, line 2: not valid JSON"):
        MMDialogDataset(str(path), str(tmp_path / "media")).samples
    bad = {"conversation_id": 5, "conversation": [{"turn": [{"__AUDIO__": "x"}]}]}
    path = _mmdialog(tmp_path, [good, bad])
    with pytest.raises(DataError, match=r"line 2 \(conversation 5\), turn 0, item 0"):
        MMDialogDataset(str(path), str(tmp_path / "media")).samples


def test_training_data_is_shuffled(tmp_path):
    from mmgen.data.minigpt5_samples import MiniGPT5DataModule
    from mmgen.data.vist import VISTDataset

    records = [dict(r, text=f"{r['story_id']} {r['text']}") for s in range(6) for r in _story(2, f"s{s}")]
    ds = VISTDataset(str(_vist(tmp_path, records)), str(tmp_path / "img"), tasks=["generate"], image_size=8)
    dm = MiniGPT5DataModule(train=ds, batch_size=6, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["sources"]) == sorted(s.source for s in ds.samples)
    assert batch["sources"] != [s.source for s in ds.samples]
    assert batch["n_input_images"] == [1] * 6 and batch["output_images"].shape == (6, 3, 8, 8)
    assert isinstance(batch["input_images"], torch.Tensor)
