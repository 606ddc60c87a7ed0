"""The report folder: generated images as PNG, answers.json in order, one self-contained
index.html with every image embedded and all text escaped; the prompt JSONL reader; the writer."""

import base64
import json
import re

import pytest
from PIL import Image

from mmgen.data.prompts import PromptDataModule, read_prompts
from mmgen.errors import ConfigError, DataError
from mmgen.inference.report import write_report
from mmgen.inference.types import Answer, GeneratedImage, ImageRef, RetrievedImage, TextPart

INJECTION = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (300, 200), (30, 30, 200)).save(folder / "blue.jpg")
    return folder


def _answers(pictures):
    conversations = [
        [ImageRef(str(pictures / "red.png")), f"what is this? {INJECTION}"],
        ["draw me a green square", Image.new("RGB", (16, 16), (0, 255, 0))],
    ]
    answers = [
        Answer([TextPart("a red square & more "), RetrievedImage(str(pictures / "blue.jpg"), 0.8125, 0),
                RetrievedImage(str(pictures / "gone.png"), 0.5, 1), TextPart(f" done {INJECTION}")]),
        Answer([TextPart("here:"), GeneratedImage(Image.new("RGB", (64, 64), (0, 200, 0)), seed=7)]),
    ]
    return answers, conversations


def test_report_writes_png_json_and_an_escaped_self_contained_page(tmp_path, pictures):
    answers, conversations = _answers(pictures)
    page = write_report(answers, conversations, tmp_path / "out", ids=["q/1", "<q2>"],
                        modes=["retrieve", "generate"], metadata={"model": "GILL"})
    out = tmp_path / "out"
    assert page == out / "index.html"

    document = json.loads((out / "answers.json").read_text())
    assert document["format"] == "mmgen-answers" and document["metadata"] == {"model": "GILL"}
    first, second = document["conversations"]
    assert first["id"] == "q/1" and first["mode"] == "retrieve"
    assert first["input"] == [{"type": "image", "path": str(pictures / "red.png")},
                              {"type": "text", "text": f"what is this? {INJECTION}"}]
    assert first["answer"][1] == {"type": "retrieved", "path": str(pictures / "blue.jpg"), "score": 0.8125, "rank": 0}
    assert first["text"] == answers[0].text  # the answer's text, images left out
    generated = second["answer"][1]
    assert generated["type"] == "generated" and generated["seed"] == 7 and generated["decision"] == "generate"
    with Image.open(out / generated["file"]) as image:  # a PNG in the folder, named safely
        assert image.format == "PNG" and image.size == (64, 64)
    assert "/" not in generated["file"].split("images/", 1)[1]
    pil_input = second["input"][1]
    assert pil_input["type"] == "image" and (out / pil_input["file"]).is_file()

    text = page.read_text()
    assert "<script>" not in text and "onerror=alert" not in text.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "&lt;q2&gt;" in text and "a red square &amp; more" in text
    assert "default-src 'none'" in text  # no scripts, no remote loads
    # every image that exists is embedded (2 inputs, 1 retrieved, 1 generated); the missing one says so
    uris = re.findall(r'src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 4
    assert {mime for mime, _ in uris} == {"image/png", "image/jpeg"}
    assert base64.b64decode(uris[0][1]) == (pictures / "red.png").read_bytes()
    assert "image not found" in text and "gone.png" in text
    assert "retrieved #1" in text and "score 0.812" in text and "seed 7" in text
    assert 'src="http' not in text and "file://" not in text


def test_report_refuses_mismatched_lists(tmp_path, pictures):
    answers, conversations = _answers(pictures)
    with pytest.raises(ValueError, match="2 answers for 1 conversations"):
        write_report(answers, conversations[:1], tmp_path)


# -- prompts ----------------------------------------------------------------------------------------
def _jsonl(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompts_resolve_images_relative_to_the_file(tmp_path, pictures):
    path = _jsonl(
        tmp_path / "p.jsonl",
        '{"id": "a", "conversation": ["hi", {"image": "pictures/red.png"}, "more"], "mode": "retrieve"}',
        "",
        '{"conversation": [{"image": "%s"}]}' % (pictures / "blue.jpg"),
    )
    first, second = read_prompts(path)
    assert first.id == "a" and first.mode == "retrieve" and first.line == 1
    assert first.conversation == ["hi", ImageRef(str(tmp_path / "pictures" / "red.png")), "more"]
    assert second.id == "line3" and second.mode is None
    assert read_prompts(_jsonl(tmp_path / "q.jsonl", '{"conversation": [{"image": "red.png"}]}'),
                        image_root=pictures)[0].conversation == [ImageRef(str(pictures / "red.png"))]


@pytest.mark.parametrize("line, message", [
    ('{"conversation": ["x"', "line 2: not valid JSON"),
    ('["x"]', "line 2: expected a JSON object"),
    ('{"conversation": ["x"], "modes": "both"}', r"line 2: unknown key\(s\) \['modes'\]"),
    ('{"conversation": []}', "line 2: 'conversation' must be a non-empty list"),
    ('{"conversation": ["x", {"img": "a.png"}]}', r"line 2: conversation\[1\] must be a string"),
    ('{"conversation": ["x", {"image": "nope.png"}]}', r"line 2: conversation\[1\]: image not found: .*nope.png"),
    ('{"conversation": ["x"], "mode": "paint"}', "line 2: 'mode' must be one of"),
    ('{"id": "a", "conversation": ["y"]}', "line 2: id 'a' already used on line 1"),
])
def test_bad_prompt_lines_are_refused_naming_file_and_line(tmp_path, line, message):
    path = _jsonl(tmp_path / "bad.jsonl", '{"id": "a", "conversation": ["fine"]}', line)
    with pytest.raises(DataError, match=rf"bad.jsonl, {message}"):
        read_prompts(path)


def test_missing_and_empty_prompt_files(tmp_path):
    with pytest.raises(DataError, match="prompts file not found"):
        read_prompts(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(_jsonl(tmp_path / "empty.jsonl", ""))


def test_shipped_toy_prompts_read():
    prompts = read_prompts("configs/data/toy_prompts.jsonl")
    assert len(prompts) >= 6
    assert {p.mode for p in prompts} >= {"retrieve", "generate", "both", "auto", None}
    assert any(isinstance(part, ImageRef) for p in prompts for part in p.conversation)


def test_prompt_batches_are_plain_lists_with_index_and_options(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", *[f'{{"id": "p{i}", "conversation": ["t{i}"]}}' for i in range(5)])
    data = PromptDataModule(str(path), batch_size=2, options={"max_new_tokens": 4})
    batches = [data.on_after_batch_transfer(b, 0) for b in data.predict_dataloader()]
    assert [b["ids"] for b in batches] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert batches[0]["conversations"] == [["t0"], ["t1"]] and batches[0]["modes"] == [None, None]
    assert batches[0]["index"] is None and batches[0]["options"] == {"max_new_tokens": 4}
    with pytest.raises(DataError, match="not both"):
        PromptDataModule(str(path), index="a", index_images="b")


def test_prompt_data_builds_the_index_with_the_model(tmp_path, pictures):
    from conftest import tiny_clip, tiny_llm
    from mmgen.methods.fromage import FROMAGe

    model = FROMAGe(tiny_llm("opt"), tiny_clip())
    model.configure_model()
    path = _jsonl(tmp_path / "p.jsonl", '{"conversation": ["x"]}')
    data = PromptDataModule(str(path), index_images=str(pictures))
    index = data.retrieval_index(model)
    assert len(index) == 2 and data.retrieval_index(model) is index  # built once
    saved = index.save(tmp_path / "index")
    torch_model = FROMAGe(tiny_llm("opt"), tiny_clip())  # another random visual encoder
    torch_model.configure_model()
    with pytest.raises(ConfigError, match="made by another model"):
        PromptDataModule(str(path), index=str(saved)).retrieval_index(torch_model)


# -- the prediction writer ------------------------------------------------------------------------
def _echo_module(output=None):
    import lightning.pytorch as pl

    class Echo(pl.LightningModule):
        def predict_step(self, batch, batch_idx):
            if output is not None:
                return output
            return [Answer([TextPart(f"echo {conversation[-1]} ({mode})"),
                            GeneratedImage(Image.new("RGB", (8, 8), (9, 9, 9)), seed=batch_idx)])
                    for conversation, mode in zip(batch["conversations"], batch["modes"])]

    return Echo()


def _predict(module, data, out):
    import lightning.pytorch as pl

    from mmgen.inference.writer import AnswerWriter

    writer = AnswerWriter(str(out))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    trainer.predict(module, datamodule=data, return_predictions=False)
    return writer


def test_answer_writer_writes_every_batch_in_order(tmp_path, pictures):
    lines = [f'{{"id": "p{i}", "conversation": [{{"image": "pictures/red.png"}}, "t{i}"], "mode": "generate"}}'
             for i in range(5)]
    data = PromptDataModule(str(_jsonl(tmp_path / "p.jsonl", *lines)), batch_size=2)
    writer = _predict(_echo_module(), data, tmp_path / "out")
    assert writer.page == tmp_path / "out" / "index.html"
    document = json.loads((tmp_path / "out" / "answers.json").read_text())
    assert [c["id"] for c in document["conversations"]] == [f"p{i}" for i in range(5)]
    assert document["conversations"][4]["text"] == "echo t4 (generate)"
    files = [c["answer"][1]["file"] for c in document["conversations"]]
    assert len(set(files)) == 5 and all((tmp_path / "out" / f).is_file() for f in files)
    assert writer.page.read_text().count('src="data:image/png') == 10  # 5 inputs + 5 generated


def test_answer_writer_refuses_other_predict_outputs(tmp_path):
    data = PromptDataModule(str(_jsonl(tmp_path / "p.jsonl", '{"conversation": ["x"]}')))
    with pytest.raises(ConfigError, match="must return a list of mmgen.inference.types.Answer"):
        _predict(_echo_module(output={"captions": ["x"]}), data, tmp_path / "out")
    with pytest.raises(ConfigError, match="returned 0 answers for a batch of 1"):
        _predict(_echo_module(output=[]), data, tmp_path / "out")


def test_modes_a_model_cannot_run_fall_back_to_auto_or_are_refused(tmp_path):
    module = _echo_module()

    def check_mode(mode, index):
        if mode == "generate":
            raise ConfigError("Echo cannot generate")

    module.check_mode = check_mode
    path = _jsonl(tmp_path / "p.jsonl", '{"id": "g", "conversation": ["x"], "mode": "generate"}',
                  '{"id": "r", "conversation": ["y"], "mode": "retrieve"}')
    with pytest.warns(UserWarning, match="mode 'generate' are answered in mode 'auto': Echo cannot generate"):
        _predict(module, PromptDataModule(str(path)), tmp_path / "out")
    texts = [c["text"] for c in json.loads((tmp_path / "out" / "answers.json").read_text())["conversations"]]
    assert texts == ["echo x (auto)", "echo y (retrieve)"]
    # "error": the model sees the mode as written (and refuses it itself)
    _predict(module, PromptDataModule(str(path), unsupported_mode="error"), tmp_path / "out2")
    texts = [c["text"] for c in json.loads((tmp_path / "out2" / "answers.json").read_text())["conversations"]]
    assert texts == ["echo x (generate)", "echo y (retrieve)"]
