"""MiniGPT-5's samples and images, as its official data loader makes them.

Every expected string below is written out by hand from reading the official construction
(its CC3M, VIST and MMDialog datasets and its torchvision transforms), not produced by mmgen.
Where the official code draws a phrasing at random, the test lists every phrasing it can draw.
The files are written in the layout the official repository distributes them in.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmgen.errors import ConfigError, DataError

V = "[IMG0][IMG1][IMG2][IMG3][IMG4][IMG5][IMG6][IMG7]"
IMG = "<Img><ImageHere></Img>"


def _image(path, size=(8, 8), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# -- CC3M (stage 1) ------------------------------------------------------------------------------
CC3M_SYSTEM = "You will be able to generate image according to command."
CAPTION_0 = "burning candle on the background of the aquarium"
INSTRUCTION_SOURCES_0 = [
    f"{CC3M_SYSTEM}###Human: generate image with caption: {CAPTION_0} ###Assistant:",
    f"{CC3M_SYSTEM}###Human: can you give me the image with caption: {CAPTION_0} ###Assistant:",
    f"{CC3M_SYSTEM}###Human: help me to generate this image: {CAPTION_0} ###Assistant:",
    f"{CC3M_SYSTEM}###Human: generate image with according to caption: {CAPTION_0} ###Assistant:",
    f"{CC3M_SYSTEM}###Human: according to caption, generate image: {CAPTION_0} ###Assistant:",
    f"{CC3M_SYSTEM}###Human: an image with caption: {CAPTION_0} ###Assistant:",
    f"{CC3M_SYSTEM}###Human: can you visualize this caption: {CAPTION_0} ###Assistant:",
]


def test_pre_caption_cleans_like_the_official_code():
    from mmgen.data.minigpt5_samples import pre_caption

    assert pre_caption("Burning candle (on) the background: of the aquarium!") == CAPTION_0
    assert pre_caption('A "Quoted"  Tab\tcase.') == "a quoted tab\tcase"  # a lone tab stays
    assert pre_caption("x*y#z;w~v") == "x y z w v"
    assert pre_caption("  padded   caption ...  ") == "padded caption"


def _cc3m(tmp_path, n_rows=101):
    """MiniGPT-5's CC3M layout: cc3m_val.tsv (CRLF, caption<TAB>image_path), val/*.jpg."""
    rows = ["caption\timage_path", "Burning candle (on) the background: of the aquarium!\tval/000000000.jpg"]
    rows += [f"Shot {i} of the full tree.\tval/{i:09d}.jpg" for i in range(1, n_rows)]
    for i in range(n_rows):
        _image(tmp_path / "val" / f"{i:09d}.jpg")
    path = tmp_path / "cc3m_val.tsv"
    path.write_bytes(("\r\n".join(rows) + "\r\n").encode())
    return path


def test_cc3m_train_split_duplicates_every_100th_row(tmp_path):
    from mmgen.data.minigpt5_samples import CaptionGenerationDataset

    ds = CaptionGenerationDataset(str(_cc3m(tmp_path)), str(tmp_path))
    samples = ds.samples
    assert len(samples) == 101 + 2  # rows 0 and 100 are followed by an instruction sample
    plain, instruction, row1 = samples[:3]
    assert (plain.source, plain.target, plain.caption) == (CAPTION_0, f"{V} ###", CAPTION_0)
    assert instruction.source in INSTRUCTION_SOURCES_0
    assert (instruction.target, instruction.caption) == (f"{V} ###", CAPTION_0)
    assert plain.output_images == instruction.output_images == [tmp_path / "val" / "000000000.jpg"]
    assert plain.input_images == instruction.input_images == []
    assert (row1.source, row1.target) == ("shot 1 of the full tree", f"{V} ###")
    assert samples[101].source == "shot 100 of the full tree"
    assert samples[102].source.startswith(f"{CC3M_SYSTEM}###Human: ")
    assert samples[102].source.endswith(" shot 100 of the full tree ###Assistant:")
    # the phrasing is drawn from the seven, reproducibly per seed
    drawn = {CaptionGenerationDataset(str(_cc3m(tmp_path, 2)), str(tmp_path), seed=s).samples[1].source
             for s in range(100)}
    assert drawn == set(INSTRUCTION_SOURCES_0)


def test_cc3m_test_split_has_no_instruction_samples(tmp_path):
    from mmgen.data.minigpt5_samples import CaptionGenerationDataset

    samples = CaptionGenerationDataset(str(_cc3m(tmp_path)), str(tmp_path), split="test").samples
    assert len(samples) == 101
    assert [s.source for s in samples[:2]] == [CAPTION_0, "shot 1 of the full tree"]
    assert {s.target for s in samples} == {f"{V} ###"}  # the caption stays in .caption
    assert samples[0].caption == CAPTION_0


def test_cc3m_bad_rows_are_named(tmp_path):
    from mmgen.data.minigpt5_samples import CaptionGenerationDataset

    path = tmp_path / "bad.tsv"
    path.write_text("caption\timage_path\na cat\tval/a.jpg\n...!!\tval/b.jpg\n")
    with pytest.raises(DataError, match=r"bad.tsv, line 3: caption '\.\.\.!!' is empty once cleaned"):
        CaptionGenerationDataset(str(path), str(tmp_path), check_images=False).samples


# -- VIST (stage 2) ------------------------------------------------------------------------------
VIST_SYSTEM = ("Give the following images in <Img>ImageContent</Img> format. You will be able to see the "
               "images once I provide it to you. Please understanding images and generate story.")
C0, C1, C2 = "my sister arrived early .", "every one else arrived soon after .", "dad manned the grill ."
H1 = f"{C0}{IMG}\n"
H2 = f"{C0}{IMG}{C1}{IMG}\n"


def _generate(history, caption):
    return [f"{VIST_SYSTEM}###Human:{history} Generate an image with the scene description: {caption} ###Assistant:",
            f"{VIST_SYSTEM}###Human:{history} the scene description: {caption} ###Assistant:"]


def _next(history):
    return [f"{VIST_SYSTEM}###Human:{history} Tell me the next scene with image. ###Assistant:",
            f"{VIST_SYSTEM}###Human:{history} Generate the next scene with image. ###Assistant:",
            f"{VIST_SYSTEM}###Human:{history} What should happen then? ###Assistant:"]


def _understand(history):
    return [f"{VIST_SYSTEM}###Human:{history} Tell me the next scene description by this image: {IMG} ###Assistant:",
            f"{VIST_SYSTEM}###Human:{history} What happen in the next scene image: {IMG} ###Assistant:"]


def _vist_official(tmp_path):
    """MiniGPT-5's VIST layout: val_cleaned.json, val_image_mapping.json, val_images/*.jpg."""
    steps = [{"caption": C0, "image_id": "693397887", "sequence_index": 0},
             {"caption": C1, "image_id": "695160730", "sequence_index": 1},
             {"caption": C2, "image_id": "694227508", "sequence_index": 2}]
    mapping = {"693397887": "val_images/000000005.jpg", "695160730": "val_images/000000007.jpg",
               "694227508": "val_images/000000003.jpg"}
    for image in mapping.values():
        _image(tmp_path / image)
    (tmp_path / "val_cleaned.json").write_text(json.dumps({"40470": steps}, indent=4))
    (tmp_path / "val_image_mapping.json").write_text(json.dumps(mapping, indent=4))
    return tmp_path / "val_cleaned.json"


def test_vist_train_split_samples(tmp_path):
    from mmgen.data.vist import VISTDataset

    path = _vist_official(tmp_path)
    samples = VISTDataset(str(path)).samples  # image_dir and mapping found as distributed
    i5, i7, i3 = (tmp_path / "val_images" / f"00000000{n}.jpg" for n in (5, 7, 3))
    expected = [  # (sources it may be, target, input images, output images), in order
        (_generate("", C0), f"{V} ###", [], [i5]),  # step 0: generation only, no history
        (_generate(H1, C1), f"{V} ###", [i5], [i7]),
        (_next(H1), f"{C1} {V} ###", [i5], [i7]),
        (_understand(H1), f"{C1} ###", [i5, i7], []),
        (_generate(H2, C2), f"{V} ###", [i5, i7], [i3]),
        (_next(H2), f"{C2} {V} ###", [i5, i7], [i3]),
        (_understand(H2), f"{C2} ###", [i5, i7, i3], []),
    ]
    assert len(samples) == len(expected)
    for sample, (sources, target, inputs, outputs) in zip(samples, expected):
        assert sample.source in sources
        assert (sample.target, sample.input_images, sample.output_images) == (target, inputs, outputs)
        assert sample.caption is None
    assert samples[0].source in [
        f"{VIST_SYSTEM}###Human: Generate an image with the scene description: my sister arrived early . ###Assistant:",
        f"{VIST_SYSTEM}###Human: the scene description: my sister arrived early . ###Assistant:",
    ]
    assert samples[2].source in [
        f"{VIST_SYSTEM}###Human:my sister arrived early .<Img><ImageHere></Img>\n Tell me the next scene with image. ###Assistant:",
        f"{VIST_SYSTEM}###Human:my sister arrived early .<Img><ImageHere></Img>\n Generate the next scene with image. ###Assistant:",
        f"{VIST_SYSTEM}###Human:my sister arrived early .<Img><ImageHere></Img>\n What should happen then? ###Assistant:",
    ]
    # every phrasing of each task turns up under some seed
    seen = [set() for _ in expected]
    for seed in range(30):
        for k, sample in enumerate(VISTDataset(str(path), seed=seed).samples):
            seen[k].add(sample.source)
    assert [s == set(e[0]) for s, e in zip(seen, expected)] == [True] * len(expected)


def test_vist_test_split_generates_at_every_step(tmp_path):
    from mmgen.data.vist import VISTDataset

    samples = VISTDataset(str(_vist_official(tmp_path)), split="test").samples
    assert len(samples) == 3
    for sample, (history, caption) in zip(samples, [("", C0), (H1, C1), (H2, C2)]):
        assert sample.source in _generate(history, caption) and sample.target == f"{V} ###"
    assert [len(s.input_images) for s in samples] == [0, 1, 2]


def test_vist_official_layout_errors_are_named(tmp_path):
    from mmgen.data.vist import VISTDataset

    path = _vist_official(tmp_path)
    data = json.loads(path.read_text())
    data["40470"][1]["caption"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"val_cleaned.json, story 40470, step \[1\]: 'caption' must be a string"):
        VISTDataset(str(path)).samples
    data["40470"][1].update(caption=C1, image_id="999")
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"story 40470, step 1: image_id 999 is not in .*val_image_mapping.json"):
        VISTDataset(str(path)).samples
    renamed = tmp_path / "stories.json"
    renamed.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="give `image_mapping`"):
        VISTDataset(str(renamed)).samples


# -- MMDialog (stage 2) --------------------------------------------------------------------------
MM_SYSTEM = ("Give the following images in <Img>ImageContent</Img> format. You will be able to see the "
             "images once I provide it to you. Please generate conversations with appropriate images.")


def _turn(text, media=None):
    return {"turn": [{"__TEXT__": text}] + ([{"__MEDIA__": media}] if media is not None else [])}


def _mmdialog(tmp_path, conversations, images=("-5632896413199993329", "2682085160072908899")):
    """MiniGPT-5's MMDialog layout: test/test_conversations.txt (a JSON object per line) with the
    {media id}.jpg images beside it."""
    folder = tmp_path / "test"
    for media in images:
        _image(folder / f"{media}.jpg")
    path = folder / "test_conversations.txt"
    path.write_text("\n".join(json.dumps({"conversation_id": i, "conversation": c, "negative_candidate_media_keys": []})
                              for i, c in enumerate(conversations)))
    return path


def test_mmdialog_samples_and_history_window(tmp_path):
    from mmgen.data.mmdialog import MMDialogDataset

    m1, m2 = "2682085160072908899", "-5632896413199993329"
    conversation = [_turn("look at my cat", m1), _turn("so cute"), _turn("show me yours"),
                    _turn("here it is", m2), _turn("nice"), _turn("thanks"), _turn("bye")]
    path = _mmdialog(tmp_path, [conversation])
    samples = MMDialogDataset(str(path), split="test").samples
    p1, p2 = path.parent / f"{m1}.jpg", path.parent / f"{m2}.jpg"
    expected = [  # every turn after the first, human turns too
        (f"{MM_SYSTEM} ###Human: look at my cat {IMG} ###Assistant:", "so cute ###", [p1], []),
        (f"{MM_SYSTEM} ###Human: look at my cat {IMG} ###Assistant: so cute ###Human:", "show me yours ###", [p1], []),
        (f"{MM_SYSTEM} ###Human: look at my cat {IMG} ###Assistant: so cute ###Human: show me yours ###Assistant:",
         f"here it is {V} ###", [p1], [p2]),
        # from turn 4 on, the window starts at the previous exchange
        (f"{MM_SYSTEM} ###Human: show me yours ###Assistant: here it is {IMG} ###Human:", "nice ###", [p2], []),
        (f"{MM_SYSTEM} ###Human: show me yours ###Assistant: here it is {IMG} ###Human: nice ###Assistant:",
         "thanks ###", [p2], []),
        (f"{MM_SYSTEM} ###Human: nice ###Assistant: thanks ###Human:", "bye ###", [], []),
    ]
    assert [(s.source, s.target, s.input_images, s.output_images) for s in samples] == expected
    assert all(s.caption is None for s in samples)


def test_mmdialog_conversations_stop_where_the_official_code_stops(tmp_path):
    from mmgen.data.mmdialog import MMDialogDataset

    conversations = [
        [_turn("hi")],  # one turn: nothing
        [_turn("hi"), _turn("hello"), _turn("see photo.jpg"), _turn("never reached")],  # text ending .jpg
        [_turn("hi"), _turn("hello"), _turn(""), _turn("never reached")],  # empty text
        [_turn("hi"), _turn("mine", "404"), _turn("never reached")],  # missing image
        [_turn("hi"), _turn("mine", "3713630103994725971"), _turn("never")],  # a known broken image
        [_turn("hi"), _turn(" ".join(["red"] * 51)), _turn("never reached in training")],  # 51 tokens
    ]
    path = _mmdialog(tmp_path, conversations, images=("3713630103994725971",))
    test = MMDialogDataset(str(path), split="test").samples
    assert [s.target for s in test] == ["hello ###", "hello ###", " ".join(["red"] * 51) + " ###",
                                         "never reached in training ###"]
    train = MMDialogDataset(str(path), tokenizer="mmgen:toy_tokenizer").samples
    assert [s.target for s in train] == ["hello ###", "hello ###"]
    with pytest.raises(DataError, match=r"line 4 \(conversation 3\), turn 1: image not found: .*404.jpg"):
        MMDialogDataset(str(path), split="test", missing_images="error").samples


def test_mmdialog_needs_a_tokenizer_for_the_token_limit(tmp_path):
    from mmgen.data.mmdialog import MMDialogDataset

    with pytest.raises(ConfigError, match="needs the LLM's `tokenizer`"):
        MMDialogDataset(str(tmp_path / "x.txt"))
    MMDialogDataset(str(tmp_path / "x.txt"), max_turn_tokens=None)  # no limit, no tokenizer


def test_mmdialog_bad_records_are_named(tmp_path):
    from mmgen.data.mmdialog import MMDialogDataset

    path = _mmdialog(tmp_path, [[_turn("hi"), _turn(5)]])
    with pytest.raises(DataError, match=r"line 1 \(conversation 0\), turn 1, item 0: '__TEXT__' must be a string"):
        MMDialogDataset(str(path), split="test").samples
    path = _mmdialog(tmp_path, [[_turn("hi"), {"turn": [{"__MEDIA__": "x"}]}]])
    with pytest.raises(DataError, match=r"turn 1, item 0: expected \{'__TEXT__': ...\}"):
        MMDialogDataset(str(path), split="test").samples
    path = _mmdialog(tmp_path, [[_turn("hi"), _turn("ok")]])
    path.write_text(path.read_text() + "\n{not json\n")
    with pytest.raises(DataError, match=r"test_conversations.txt, line 2: not valid JSON"):
        MMDialogDataset(str(path), split="test").samples


# -- images --------------------------------------------------------------------------------------
def _official_output(path, size):
    """The official output transform for the VAE, by hand in PIL: pad to a white square (the
    picture centred, offset rounded down), bilinear resize (PIL's, antialiased), to [0, 1]."""
    image = Image.open(path).convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.resize((size, size), Image.Resampling.BILINEAR)


def _official_input(path, size):
    """The official input transform for the Q-Former: shorter side to size, bilinear, centre crop."""
    image = Image.open(path).convert("RGB")
    short, long = sorted(image.size)
    w, h = (size, int(size * long / short)) if image.width <= image.height else (int(size * long / short), size)
    image = image.resize((w, h), Image.Resampling.BILINEAR)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _pixels(image):
    return torch.tensor(list(image.getdata()), dtype=torch.float32).view(image.height, image.width, 3).permute(2, 0, 1) / 255


def _noise(path, size):
    torch.manual_seed(0)
    array = (torch.rand(size[1], size[0], 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(array).save(path)


@pytest.mark.parametrize("size", [(90, 40), (37, 61)])
def test_images_match_the_official_transforms(tmp_path, size):
    from mmgen.data.images import load_image

    path = tmp_path / "noise.png"
    _noise(path, size)
    out = load_image(path, 24, fit="pad", interpolation="bilinear")
    torch.testing.assert_close(out, _pixels(_official_output(path, 24)), atol=1e-6, rtol=0)
    inp = load_image(path, 16, fit="crop", interpolation="bilinear")
    torch.testing.assert_close(inp, _pixels(_official_input(path, 16)), atol=1e-6, rtol=0)
    flipped = load_image(path, 16, fit="crop", interpolation="bilinear", flip=True)
    assert torch.equal(flipped, inp.flip(-1))


def test_output_images_are_padded_white_and_inputs_cropped(tmp_path):
    from mmgen.data.images import load_image

    path = tmp_path / "wide.png"
    _image(path, (40, 20), (200, 10, 10))  # wide and red
    padded = load_image(path, 20, fit="pad", interpolation="bilinear")
    assert torch.equal(padded[:, :4], torch.ones(3, 4, 20))  # white band above ...
    assert torch.equal(padded[:, -4:], torch.ones(3, 4, 20))  # ... and below
    torch.testing.assert_close(padded[:, 10], torch.tensor([200 / 255, 10 / 255, 10 / 255])[:, None].expand(3, 20))
    cropped = load_image(path, 20, fit="crop", interpolation="bilinear")
    assert (cropped[0] > 0.7).all() and (cropped[1] < 0.1).all()  # red everywhere, nothing padded


def test_downscaling_is_antialiased(tmp_path):
    from mmgen.data.images import load_image

    path = tmp_path / "stripes.png"
    stripes = torch.zeros(48, 48, 3, dtype=torch.uint8)
    stripes[:, ::2] = 255  # one-pixel vertical stripes
    Image.fromarray(stripes.numpy()).save(path)
    for interpolation in ("bilinear", "bicubic"):
        small = load_image(path, 16, interpolation=interpolation)  # 3x smaller
        # filtered: close to the mean grey; point sampling would give pure black and white columns
        assert (small - 0.5).abs().max() < 0.2, interpolation


def _vist_wide(tmp_path):
    steps = [{"caption": f"step {k} .", "image_id": str(k), "sequence_index": k} for k in range(2)]
    (tmp_path / "train_cleaned.json").write_text(json.dumps({"1": steps}))
    (tmp_path / "train_image_mapping.json").write_text(json.dumps({"0": "a.png", "1": "b.png"}))
    left_red = torch.zeros(20, 40, 3, dtype=torch.uint8)
    left_red[:, :20, 0] = 255  # left half red, right half black: a flip shows
    for name in ("a.png", "b.png"):
        Image.fromarray(left_red.numpy()).save(tmp_path / name)
    return tmp_path / "train_cleaned.json"


def test_dataset_preprocesses_inputs_and_outputs_by_role_and_flips_only_in_training(tmp_path):
    from mmgen.data.vist import VISTDataset

    path = _vist_wide(tmp_path)
    test = VISTDataset(str(path), split="test", input_image_size=16, output_image_size=24)
    item = test[1]  # step 1: one input image, one output image
    assert item["input_images"].shape == (1, 3, 16, 16) and item["output_images"].shape == (1, 3, 24, 24)
    assert item["input_images"].min() < 0.01  # centre crop: no white
    assert torch.equal(item["output_images"][0, :, 0], torch.ones(3, 24))  # padded white
    for _ in range(5):  # never mirrored in the test split: red stays on the left
        assert test[1]["output_images"][0, 0, 12, 2] > 0.9

    train = VISTDataset(str(path), input_image_size=16, output_image_size=24)
    torch.manual_seed(0)
    red_left = [bool(train[1]["output_images"][0, 0, 12, 2] > 0.9) for _ in range(30)]
    assert 5 < sum(red_left) < 25  # mirrored about half the time
    never = VISTDataset(str(path), input_image_size=16, output_image_size=24, random_flip=False)
    assert all(never[1]["output_images"][0, 0, 12, 2] > 0.9 for _ in range(5))


def test_clip_preprocessing_stays_available(tmp_path):
    from mmgen.data.images import load_image
    from mmgen.data.vist import VISTDataset

    path = _vist_wide(tmp_path)
    clip = VISTDataset(str(path), split="test", input_image_size=16, output_image_size=16, image_preprocessing="clip")
    item = clip[1]
    torch.testing.assert_close(item["output_images"][0], load_image(tmp_path / "b.png", 16))
    assert item["output_images"].min() < 0.01  # cropped, not padded
    with pytest.raises(ConfigError, match="unknown image_preprocessing"):
        VISTDataset(str(path), image_preprocessing="blip")
