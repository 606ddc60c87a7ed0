"""`mmgen eval` end to end, as a user runs it: a short `mmgen fit` of each method's tiny config,
then the benchmarks through the command on toy data, with tiny random measuring networks;
the results JSON, the printed table, the contact sheet, and resume from cached images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_evaluation import TINY_CLIP, _visdial, _vist

from mmgen.cli import main
from mmgen.errors import DataError
from mmgen.inference.types import ImageRef

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _fit(config: str, *overrides: str) -> Path:
    cli = main(["fit", "--config", str(CONFIGS / config), "--trainer.logger=false",
                "--trainer.enable_progress_bar=false", *overrides])
    return Path(cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative runs/ and .cache/ folders land here
    return tmp_path


def _extractors(folder: Path) -> list[str]:
    """Tiny random measuring networks, given as {class_path, init_args} files."""
    specs = {
        "clip": {"class_path": "mmgen.evaluation.extractors.CLIPFeatures",
                 "init_args": {"config": TINY_CLIP, "tokenizer": "mmgen:toy_tokenizer"}},
        "inception": {"class_path": "InceptionFeatures", "init_args": {"random_weights": True, "image_size": 75}},
        "lpips": {"class_path": "LPIPSAlex", "init_args": {"random_weights": True, "image_size": 64}},
    }
    args = []
    for name, spec in specs.items():
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        args += [f"--{name}", str(path)]
    return args


def _check_document(document: dict, task: str, settings: list[str], metric_names: set[str]):
    assert document["format"] == "mmgen-eval" and document["version"] == 1 and document["task"] == task
    assert list(document["settings"]) == settings
    for result in document["settings"].values():
        assert result["n"] > 0 and set(result["metrics"]) == metric_names
        assert all(v is None or isinstance(v, float) for v in result["metrics"].values())
    assert isinstance(document["paper"], dict) and document["options"]["batch_size"] >= 1


def test_eval_fromage_retrieval_on_vist_and_visdial(in_tmp, capsys):
    checkpoint = _fit("fromage_tiny.yaml", "--trainer.max_steps=2", "--data.init_args.n_train=16",
                      "--data.init_args.n_val=8", "--data.init_args.batch_size=8")
    vist = _vist(in_tmp)
    document = main(["eval", "--task", "vist-retrieval", "--model", str(checkpoint), "--data", str(vist),
                     "--model-seed", "0", "--device", "cpu"])
    _check_document(document, "vist-retrieval", ["1 caption", "5 captions", "5 captions + 4 images"],
                    {"R@1", "R@5", "R@10"})
    assert document["data"]["candidates"] == 20
    assert (checkpoint.parent / "eval" / "vist-retrieval.json").is_file()  # next to the model
    printed = capsys.readouterr().out
    assert "FROMAGe (paper)" in printed and "18.2" in printed and "this model" in printed
    # a percentage of 4 stories: a multiple of 25
    r10 = document["settings"]["1 caption"]["metrics"]["R@10"]
    assert 0 <= r10 <= 100 and float(r10) % 25 == 0, r10

    visdial = _visdial(in_tmp, n=4)
    args = ["eval", "--task", "visdial-retrieval", "--model", str(checkpoint), "--data", str(visdial),
            "--model-seed", "0", "--device", "cpu", "--out", "runs/eval"]
    # the tiny LLM has 64 positions: 10 rounds do not fit, and the error says which dialog
    with pytest.raises(DataError, match=r"dialogs\[0\]: the prompt is \d+ positions long, more than the LLM's 64"):
        main(args)
    document = main([*args, "--rounds", "1,2,3"])
    _check_document(document, "visdial-retrieval", ["1 round", "2 rounds", "3 rounds"], {"R@1", "R@5", "R@10"})
    # 4 candidates, nothing excluded: the true image is always in the first 10
    assert all(s["metrics"]["R@10"] == 100.0 for s in document["settings"].values())


def test_eval_gill_generation_with_baseline_resumes_from_cached_images(in_tmp, monkeypatch):
    # training logs generated images at validation epoch ends (no image logger here: PNG files)
    checkpoint = _fit("gill_tiny.yaml", "--trainer.max_epochs=1", "--data.init_args.n_train=16",
                      "--data.init_args.n_val=8", "--data.init_args.batch_size=8",
                      "--trainer.callbacks+=mmgen.evaluation.callback.LogGeneratedImages",
                      "--trainer.callbacks.prompts=[a red circle on a blue background]",
                      "--trainer.callbacks.num_inference_steps=2", "--trainer.default_root_dir=runs/gill_cb")
    logged = sorted(Path("runs/gill_cb").rglob("generated/epoch_0000/*.png"))
    assert [p.name for p in logged] == ["00_a_red_circle_on_a_blue_backgroun.png"]  # slug: 32 characters
    vist = _vist(in_tmp, n_stories=3)
    args = ["eval", "--task", "vist-generation", "--model", str(checkpoint), "--data", str(vist), "--model-seed",
            "0", "--device", "cpu", "--out", "runs/eval", "--steps", "2", "--scheduler", "dpm", "--baseline",
            "--batch-size", "2", *_extractors(in_tmp)]
    # two shards (one process per GPU) make the images with the whole run's names and seeds ...
    for shard in ("0/2", "1/2"):
        assert main([*args, "--shard", shard]) == {}
    generations = Path("runs/eval/vist-generation/generations")
    pngs = sorted(generations.rglob("*.png"))
    assert len(pngs) == 3 * 3 + 2 * 3  # 3 settings + 2 baselines (none with images) x 3 stories
    record = json.loads(pngs[0].with_suffix(".json").read_text())
    assert record["seed"] == 42 and record["prompt"] and record["options"]["num_inference_steps"] == 2
    assert json.loads(pngs[2].with_suffix(".json").read_text())["seed"] == 44

    # ... so the scoring run generates nothing: every image comes from the cache
    from mmgen.components.stable_diffusion import StableDiffusion

    def refuse(*a, **k):
        raise AssertionError("a cached image was generated again")

    with monkeypatch.context() as patch:
        patch.setattr(StableDiffusion, "generate", refuse)
        document = main(args)
    settings = ["1 caption", "5 captions", "5 captions + 4 images"]
    _check_document(document, "vist-generation", settings, {"CLIP-I", "LPIPS"})
    assert list(document["baseline"]) == ["1 caption", "5 captions"]  # no text-only baseline with images
    sheet = Path(document["data"]["sheet"]).read_text()
    assert sheet.count('<img src="data:image/') >= 15

    # an image lost (an interrupted run) is made again with its own seed; the scores do not change
    pngs[1].unlink()
    again = main(args)
    for part in ("settings", "baseline"):  # equal up to batch-size rounding in the remade image
        for name, result in document[part].items():
            assert again[part][name]["metrics"] == pytest.approx(result["metrics"], abs=1e-3)
    assert pngs[1].is_file()


def test_eval_minigpt5_cc3m_generation_and_captioning(in_tmp):
    checkpoint = _fit("minigpt5_stage1_tiny.yaml", "--trainer.max_steps=2", "--data.init_args.batch_size=4",
                      "--data.init_args.train.init_args.n_train=8", "--data.init_args.train.init_args.n_val=0")
    tsv = sorted(Path(".cache").rglob("train.tsv"))[0]  # the tiny run has no validation rows
    document = main(["eval", "--task", "cc3m", "--model", str(checkpoint), "--data", str(tsv), "--image-dir", str(tsv.parent / "images"), "--limit", "4",
                     "--model-seed", "0", "--device", "cpu", "--out", "runs/eval", "--steps", "2",
                     "--scheduler", "dpm", "--max-new-tokens", "4", *_extractors(in_tmp)])
    assert document["task"] == "cc3m" and list(document["settings"]) == ["generation", "captioning"]
    generation = document["settings"]["generation"]["metrics"]
    assert set(generation) == {"FID", "IS", "IS-std"} and generation["FID"] >= 0
    # a random Inception saturates its softmax (IS nan, written as null); a real one gives >= 1
    assert generation["IS"] is None or generation["IS"] >= 1
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(document["settings"]["captioning"]["metrics"])


def _mmdialog(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for c in range(2):
        turns = []
        for t in range(3):
            turn = [{"__TEXT__": f"a red circle number {t}"}]
            if t == 1:
                Image.new("RGB", (32, 32), (200, 40 * c, 40)).save(folder / f"m{c}{t}.jpg")
                turn.append({"__MEDIA__": f"m{c}{t}"})
            turns.append({"turn": turn})
        lines.append(json.dumps({"conversation_id": c, "conversation": turns}))
    path = folder / "test_conversations.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_eval_minigpt5_mmdialog(in_tmp):
    from mmgen.evaluation.tasks import mmdialog_items

    path = _mmdialog(in_tmp / "mmdialog")
    items = mmdialog_items(str(path))
    assert [i.target_text for i in items] == ["a red circle number 1", "a red circle number 2"] * 2
    assert items[0].target_image is not None and items[1].target_image is None
    assert [p.path for p in items[1].context if isinstance(p, ImageRef)] == [str(items[0].target_image)]  # history
    (in_tmp / "mmdialog" / "m01.jpg").unlink()
    with pytest.raises(DataError, match=r"test_conversations.txt, line 1.*turn 1: image not found"):
        mmdialog_items(str(path))
    path = _mmdialog(in_tmp / "mmdialog")

    checkpoint = _fit("minigpt5_stage1_tiny.yaml", "--trainer.max_steps=1", "--data.init_args.batch_size=4",
                      "--data.init_args.train.init_args.n_train=4", "--data.init_args.train.init_args.n_val=0")
    document = main(["eval", "--task", "mmdialog", "--model", str(checkpoint), "--data", str(path),
                     "--model-seed", "0", "--device", "cpu", "--out", "runs/eval", "--steps", "2", "--scheduler",
                     "dpm", "--max-new-tokens", "12", *_extractors(in_tmp)])
    scores = document["settings"]["responses"]["metrics"]
    assert {"BLEU-1", "BLEU-2", "ROUGE-L", "IS", "MM-Relevance"} <= set(scores)
    assert 0 <= scores["MM-Relevance"] <= 1 and document["settings"]["responses"]["n"] == 4
    assert Path("runs/eval/mmdialog/sheet/index.html").is_file()
