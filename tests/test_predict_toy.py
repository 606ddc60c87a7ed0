"""`mmgen predict` on every tiny config, as a user runs it: a short `mmgen fit`, then
`mmgen predict --config <tiny> --config configs/predict_toy.yaml --ckpt_path <last.ckpt>`,
in-process; the output folder holds answers.json, index.html and the generated PNGs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from mmgen.cli import main
from mmgen.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROMPTS = CONFIGS / "data" / "toy_prompts.jsonl"
# Scale factors make the tiny models produce their image tokens, so that every answer has images.
OPTIONS = "{max_new_tokens: 12, num_inference_steps: 2, seed: 0, ret_scale_factor: 1000.0, gen_scale_factor: 1000.0}"


def _fit(config: str, *overrides: str) -> Path:
    cli = main(["fit", "--config", str(CONFIGS / config), "--trainer.logger=false",
                "--trainer.enable_progress_bar=false", *overrides])
    return Path(cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path)


def _predict(config: str, checkpoint: Path, out: str = "runs/predict_toy", *overrides: str) -> dict:
    main(["predict", "--config", str(CONFIGS / config), "--config", str(CONFIGS / "predict_toy.yaml"),
          f"--ckpt_path={checkpoint}", f"--data.init_args.prompts={PROMPTS}",
          f"--data.init_args.options={OPTIONS}", f"--trainer.callbacks.init_args.output_dir={out}", *overrides])
    out = Path(out)
    document = json.loads((out / "answers.json").read_text())
    page = (out / "index.html").read_text()
    ids = [json.loads(line)["id"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    assert [c["id"] for c in document["conversations"]] == ids  # every prompt, in order
    images = 0
    for conversation in document["conversations"]:
        for part in conversation["answer"]:
            if part["type"] == "generated":
                with Image.open(out / part["file"]) as image:
                    assert image.format == "PNG"
                images += 1
            elif part["type"] == "retrieved":
                assert Path(part["path"]).is_file() and -1.0 <= part["score"] <= 1.0
                images += 1
    inputs = sum(part["type"] == "image" for c in document["conversations"] for part in c["input"])
    assert len(re.findall(r'<img src="data:image/', page)) == images + inputs  # all embedded
    return document


def _kinds(document) -> set[str]:
    return {part["type"] for c in document["conversations"] for part in c["answer"]}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative runs/ and .cache/ folders land here
    return tmp_path


def test_predict_fromage_tiny(in_tmp):
    checkpoint = _fit("fromage_tiny.yaml", "--trainer.max_epochs=1", "--data.init_args.n_train=16",
                      "--data.init_args.n_val=8", "--data.init_args.batch_size=8")
    document = _predict("fromage_tiny.yaml", checkpoint)
    assert _kinds(document) == {"text", "retrieved"}  # FROMAGe retrieves, never generates

    # the same with a saved index made by `mmgen index build` from the checkpoint
    build = ["index", "build", "--model", str(checkpoint), "--images", ".cache/mmgen-toy/val.tsv",
             "--image-dir", ".cache/mmgen-toy/images", "--device", "cpu"]
    main([*build, "--out", "runs/toy_index"])
    saved = ["--data.init_args.index=runs/toy_index", "--data.init_args.index_images=null"]
    again = _predict("fromage_tiny.yaml", checkpoint, "runs/predict_saved", *saved)
    assert {p["path"] for c in again["conversations"] for p in c["answer"] if p["type"] == "retrieved"} <= {
        str(p) for p in Path(".cache/mmgen-toy/images").glob("val_*.png")}
    # an index made by another model (trained from another seed: another image projection) is
    # refused, naming it
    other = _fit("fromage_tiny.yaml", "--trainer.max_epochs=1", "--data.init_args.n_train=16",
                 "--data.init_args.n_val=8", "--data.init_args.batch_size=8", "--seed_everything=1",
                 "--trainer.default_root_dir=runs/other")
    assert other != checkpoint
    main([*build[:3], str(other), *build[4:], "--out", "runs/other_index"])
    with pytest.raises(ConfigError, match="retrieval index runs/other_index was made by another model"):
        _predict("fromage_tiny.yaml", checkpoint, "runs/predict_other",
                 "--data.init_args.index=runs/other_index", "--data.init_args.index_images=null")


def test_predict_gill_tiny(in_tmp):
    checkpoint = _fit("gill_tiny.yaml", "--trainer.max_epochs=1", "--data.init_args.n_train=16",
                      "--data.init_args.n_val=8", "--data.init_args.batch_size=8")
    document = _predict("gill_tiny.yaml", checkpoint)
    by_id = {c["id"]: {p["type"] for p in c["answer"]} for c in document["conversations"]}
    assert "generated" in by_id["draw-green-triangle"] and "retrieved" not in by_id["draw-green-triangle"]
    assert "retrieved" in by_id["show-blue-square"] and "generated" not in by_id["show-blue-square"]
    assert {"retrieved", "generated"} <= by_id["both-yellow-cross"]


def test_predict_minigpt5_stage1_and_stage2_tiny(in_tmp):
    stage1 = _fit("minigpt5_stage1_tiny.yaml", "--trainer.max_steps=2", "--data.init_args.batch_size=4",
                  "--data.init_args.train.init_args.n_train=8", "--data.init_args.train.init_args.n_val=0")
    no_index = ["--data.init_args.index_images=null", "--data.init_args.index_image_dir=null"]  # MiniGPT-5 does not retrieve
    document = _predict("minigpt5_stage1_tiny.yaml", stage1, "runs/predict_stage1", *no_index)
    assert "generated" in _kinds(document) and "retrieved" not in _kinds(document)  # no retrieval head
    stage2 = _fit("minigpt5_stage2_tiny.yaml", "--trainer.max_steps=2", "--data.init_args.batch_size=4",
                  f"--model.init_args.init_from={stage1}", "--data.init_args.train.init_args.n_stories=4")
    document = _predict("minigpt5_stage2_tiny.yaml", stage2, "runs/predict_stage2", *no_index)
    assert "generated" in _kinds(document) and "retrieved" not in _kinds(document)
