"""A corpus of bad and unusual inputs, driven through mmgen's real entry points (the CLI's
``main([...])`` in-process, the readers, the loaders). Each case asserts the error type and that
the message names the file and the row, line or key at fault; none may hang or crash with a raw
library error."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmgen.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "fromage_tiny.yaml")


# -- helpers -----------------------------------------------------------------------------------
def png(path: Path, size: int = 8) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 30, 30)).save(path)
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def expect(error_type, *fragments):
    """pytest.raises that also checks every fragment is in the message."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(error_type)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            for fragment in fragments:
                assert str(fragment) in message, f"{fragment!r} not in {message!r}"
            return handled

    return _Check()


# -- caption TSVs (FROMAGe, GILL, MiniGPT-5 stage 1) -------------------------------------------
def read_tsv(path, image_dir=None, **kwargs):
    from mmgen.data.captions import read_caption_tsv

    return read_caption_tsv(Path(path), Path(image_dir or Path(path).parent), "caption", "image", **kwargs)


TSV_CASES = {
    # name: (file bytes, fragments besides the file name)
    "latin1": ("caption\timage\nun caf\xe9\ta.png\n".encode("latin-1"), ["line 2", "UTF-8"]),
    "utf16": ("caption\timage\nx\ta.png\n".encode("utf-16"), ["UTF-8"]),
    "empty": (b"", ["line 1", "header"]),
    "header_only": (b"caption\timage\n", ["no data rows"]),
    "no_image_column": (b"caption\tpicture\nx\ta.png\n", ["'image'"]),
    "repeated_column": (b"caption\timage\tcaption\nx\ta.png\ty\n", ["line 1", "'caption'"]),
    "crlf_then_bad_row": (b"caption\timage\r\nx\ta.png\r\ny\r\n", ["line 3", "fields"]),
    "field_count": (b"caption\timage\nx\ta.png\ny\n", ["line 3", "fields"]),
    "empty_caption": (b"caption\timage\n \ta.png\n", ["line 2", "'caption'"]),
    "empty_image": (b"caption\timage\nx\t \n", ["line 2", "'image'"]),
    "absolute_path": (b"caption\timage\nx\t/etc/passwd\n", ["line 2", "absolute"]),
    "climbs_out": (b"caption\timage\nx\t../../secret.png\n", ["line 2", "leaves the data folder"]),
    "climbs_out_late": (b"caption\timage\nx\ta.png\ny\timgs/../../b.png\n", ["line 3", "leaves"]),
}


@pytest.mark.parametrize("name", sorted(TSV_CASES))
def test_caption_tsv(tmp_path, name):
    data, fragments = TSV_CASES[name]
    path = tmp_path / f"{name}.tsv"
    path.write_bytes(data)
    with expect(DataError, path, *fragments):
        read_tsv(path)


def test_caption_tsv_outside_paths_allowed_by_option(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("caption\timage\nx\t../elsewhere/a.png\n", encoding="utf-8")
    (record,) = read_tsv(path, tmp_path / "images", allow_outside_paths=True)
    assert record.image_path == tmp_path / "images" / "../elsewhere/a.png"


def test_caption_tsv_unicode_line_separator_is_not_a_line_break(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("caption\timage\na\u2028b\ta.png\n", encoding="utf-8")
    assert read_tsv(path)[0].caption == "a\u2028b"


@pytest.mark.parametrize("kind", ["folder", "fifo", "missing"])
def test_caption_tsv_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "data.tsv"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        fifo(path)
    with expect(DataError, path, {"folder": "folder", "fifo": "named pipe", "missing": "not found"}[kind]):
        read_tsv(path)


def test_caption_datamodule_missing_image_named(tmp_path):
    from mmgen.data.captions import CaptionDataModule

    (tmp_path / "t.tsv").write_text("caption\timage\na\ta.png\nb\tb.png\n", encoding="utf-8")
    png(tmp_path / "a.png")
    data = CaptionDataModule(str(tmp_path / "t.tsv"), image_dir=str(tmp_path), batch_size=1)
    with expect(DataError, "t.tsv", "line 3", "b.png"):
        data.setup("fit")


def test_caption_datamodule_via_cli_names_file_and_line(tmp_path):
    from mmgen.cli import main

    tsv = tmp_path / "train.tsv"
    tsv.write_text("caption\timage\nok\t../x.png\n", encoding="utf-8")
    (tmp_path / "images").mkdir()  # a missing folder would be reported up front (mmgen.preflight)
    args = ["fit", "--config", TINY, "--trainer.logger=false", "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp_path}/run",
            "--data=mmgen.data.captions.CaptionDataModule", f"--data.train_tsv={tsv}",
            f"--data.image_dir={tmp_path}/images", "--data.batch_size=1"]
    with expect(DataError, tsv, "line 2", "leaves the data folder"):
        main(args)


# -- images ------------------------------------------------------------------------------------
def test_decompression_bomb_refused(tmp_path, monkeypatch):
    from PIL import Image

    from mmgen.data.images import load_image

    path = png(tmp_path / "big.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 pixels > the limit
    with expect(DataError, path, "decompression bomb"):
        load_image(path, 32)


def test_image_fifo_refused_without_waiting(tmp_path):
    from mmgen.data.images import load_image

    path = fifo(tmp_path / "pipe.png")
    with expect(DataError, path, "named pipe"):
        load_image(path, 32)


def test_caption_dataset_bomb_names_line(tmp_path, monkeypatch):
    from PIL import Image

    from mmgen.data.captions import CaptionImageDataset

    png(tmp_path / "a.png", size=64)
    (tmp_path / "t.tsv").write_text("caption\timage\nx\ta.png\n", encoding="utf-8")
    dataset = CaptionImageDataset(tmp_path / "t.tsv", tmp_path, image_size=16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with expect(DataError, "t.tsv", "line 2", "a.png"):
        dataset[0]


# -- decision prompts --------------------------------------------------------------------------
DECISION_CASES = {
    "bad_label": (b"text\tlabel\na dog\tmaybe\n", ["line 2", "maybe"]),
    "latin1": ("text\tlabel\ncaf\xe9\tretrieve\n".encode("latin-1"), ["line 2", "UTF-8"]),
    "header": (b"prompt\tlabel\nx\tretrieve\n", ["line 1", "header"]),
    "no_rows": (b"text\tlabel\n", ["no prompts"]),
    "fields": (b"text\tlabel\nx\tretrieve\textra\n", ["line 2", "fields"]),
    "empty": (b"", ["line 1"]),
}


@pytest.mark.parametrize("name", sorted(DECISION_CASES))
def test_decision_prompts(tmp_path, name):
    from mmgen.data.decision_prompts import read_decision_prompts

    data, fragments = DECISION_CASES[name]
    path = tmp_path / "p.tsv"
    path.write_bytes(data)
    with expect(DataError, path, *fragments):
        read_decision_prompts(path)


def test_mistyped_decision_train_file_is_not_filled_with_toy_prompts(tmp_path):
    from mmgen.data.decision_prompts import DecisionPromptDataModule

    path = tmp_path / "configs" / "data" / "my_prompts_typo.tsv"
    data = DecisionPromptDataModule(str(path), write_example=True)
    with expect(DataError, path, "not found"):
        data.setup("fit")
    assert not path.exists()


def test_decision_example_still_written_under_cache(tmp_path):
    from mmgen.data.decision_prompts import DecisionPromptDataModule

    path = tmp_path / ".cache" / "toy" / "train.tsv"
    data = DecisionPromptDataModule(str(path), write_example=True)
    data.setup("fit")
    assert path.is_file() and len(data.train_dataset) > 0


# -- VIST ----------------------------------------------------------------------------------------
def vist_files(tmp_path, stories, mapping=None):
    json_path = tmp_path / "train_cleaned.json"
    json_path.write_text(json.dumps(stories), encoding="utf-8")
    if mapping is None:
        mapping = {str(s["image_id"]): f"images/{s['image_id']}.png" for steps in stories.values()
                   if isinstance(steps, list) for s in steps if isinstance(s, dict) and "image_id" in s}
        for path in mapping.values():
            png(tmp_path / path)
    (tmp_path / "train_image_mapping.json").write_text(json.dumps(mapping), encoding="utf-8")
    return json_path


def step(caption="a red circle", image_id="1", index=0):
    return {"caption": caption, "image_id": image_id, "sequence_index": index}


VIST_CASES = {
    "null_caption": ({"s1": [step(None)]}, None, ["story s1", "'caption'", "NoneType"]),
    "list_caption": ({"s1": [step(["a", "b"])]}, None, ["story s1", "'caption'", "list"]),
    "numeric_caption": ({"s1": [step(7)]}, None, ["'caption'", "int"]),
    "order_not_numeric": ({"s1": [step(index="first")]}, None, ["story s1", "'sequence_index'"]),
    "repeated_order": ({"s1": [step(), step(image_id="2")]}, None, ["story s1", "repeated"]),
    "empty_split": ({}, {}, ["no stories"]),
    "missing_key": ({"s1": [{"caption": "x", "image_id": "1"}]}, None, ["story s1", "sequence_index"]),
    "image_outside": ({"s1": [step()]}, {"1": "../../etc/passwd"}, ["image 1", "leaves the data folder"]),
    "image_absolute": ({"s1": [step()]}, {"1": "/etc/passwd"}, ["image 1", "absolute"]),
    "unmapped_image": ({"s1": [step(image_id="9")]}, {"1": "images/1.png"}, ["story s1", "image_id 9"]),
}


@pytest.mark.parametrize("name", sorted(VIST_CASES))
def test_vist(tmp_path, name):
    from mmgen.data.vist import VISTDataset

    stories, mapping, fragments = VIST_CASES[name]
    json_path = vist_files(tmp_path, stories, mapping)
    dataset = VISTDataset(str(json_path), input_image_size=8, output_image_size=8)
    with expect(DataError, tmp_path, *fragments):
        len(dataset)


def test_vist_sis_non_numeric_order_and_null_text(tmp_path):
    from mmgen.data.vist import VISTDataset

    record = {"story_id": "7", "worker_arranged_photo_order": "zero", "text": "x", "photo_flickr_id": "1"}
    path = tmp_path / "sis.json"
    path.write_text(json.dumps({"annotations": [[record]]}), encoding="utf-8")
    with expect(DataError, path, "annotations[0]", "worker_arranged_photo_order"):
        len(VISTDataset(str(path)))
    record.update(worker_arranged_photo_order=0, text=None)
    path.write_text(json.dumps({"annotations": [[record]]}), encoding="utf-8")
    with expect(DataError, path, "annotations[0]", "'text'"):
        len(VISTDataset(str(path)))
    record.update(text="x", photo_flickr_id="../../../etc/passwd")
    path.write_text(json.dumps({"annotations": [[record]]}), encoding="utf-8")
    with expect(DataError, path, "photo_flickr_id", "leaves"):
        len(VISTDataset(str(path)))


def test_vist_bad_encoding_and_bad_json(tmp_path):
    from mmgen.data.vist import VISTDataset

    path = tmp_path / "train_cleaned.json"
    path.write_bytes('{"s": [{"caption": "caf\xe9"}]}'.encode("latin-1"))
    with expect(DataError, path, "line 1", "UTF-8"):
        len(VISTDataset(str(path)))
    path.write_text('{"s": [', encoding="utf-8")
    with expect(DataError, path, "not valid JSON"):
        len(VISTDataset(str(path)))


# -- MMDialog ------------------------------------------------------------------------------------
def dialog_line(*turns, cid="c1"):
    return json.dumps({"conversation_id": cid, "conversation": [{"turn": list(t)} for t in turns]})


MMDIALOG_CASES = {
    "null_text": ([dialog_line([{"__TEXT__": "hi"}], [{"__TEXT__": None}])], ["line 1", "turn 1", "__TEXT__"]),
    "list_text": ([dialog_line([{"__TEXT__": "hi"}], [{"__TEXT__": ["a"]}])], ["line 1", "turn 1", "list"]),
    "bad_json": (["{not json"], ["line 1", "not valid JSON"]),
    "not_object": (["[1, 2]"], ["line 1", "conversation"]),
    "media_outside": ([dialog_line([{"__TEXT__": "hi"}], [{"__TEXT__": "look"}, {"__MEDIA__": "../../x"}])],
                      ["line 1", "turn 1", "leaves the data folder"]),
    "empty_split": ([dialog_line([{"__TEXT__": "only one turn"}])], ["no samples"]),
    "late_bad_line": ([dialog_line([{"__TEXT__": "a"}], [{"__TEXT__": "b"}]), "", "{"], ["line 3"]),
}


@pytest.mark.parametrize("name", sorted(MMDIALOG_CASES))
def test_mmdialog(tmp_path, name):
    from mmgen.data.mmdialog import MMDialogDataset

    lines, fragments = MMDIALOG_CASES[name]
    path = tmp_path / "test_conversations.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset = MMDialogDataset(str(path), max_turn_tokens=None, missing_images="error")
    with expect(DataError, path, *fragments):
        len(dataset)


def test_mmdialog_empty_file_and_encoding(tmp_path):
    from mmgen.data.mmdialog import MMDialogDataset

    path = tmp_path / "c.txt"
    path.write_bytes(b"")
    with expect(DataError, path, "empty"):
        len(MMDialogDataset(str(path), max_turn_tokens=None))
    path.write_bytes('{"conversation": [{"turn": [{"__TEXT__": "caf\xe9"}]}]}\n'.encode("latin-1"))
    with expect(DataError, path, "UTF-8"):
        len(MMDialogDataset(str(path), max_turn_tokens=None))


# -- caption-embedding caches --------------------------------------------------------------------
def make_cache(tmp_path, rows=4, length=3, dim=2, array=None, manifest_changes=None):
    from mmgen.data.caption_cache import write_caption_cache

    out = tmp_path / "cache"
    write_caption_cache(out, [f"c{i}" for i in range(rows)], lambda b: torch.zeros(len(b), length, dim),
                        generator="g", text_embed_dim=dim, max_length=length, shard_size=2)
    if array is not None:
        np.save(out / "embeddings-00000.npy", array)
    if manifest_changes:
        manifest = json.loads((out / "manifest.json").read_text())
        manifest.update(manifest_changes)
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_cache_nan_rejected_naming_shard_and_row(tmp_path):
    from mmgen.data.caption_cache import CaptionCache

    bad = np.zeros((2, 3, 2), np.float16)
    bad[1, 0, 0] = np.nan
    out = make_cache(tmp_path, array=bad)
    with expect(DataError, "embeddings-00000.npy", "row 1", "NaN"):
        CaptionCache(out)


def test_cache_nan_found_when_read_in_large_caches(tmp_path, monkeypatch):
    from mmgen.data.caption_cache import CaptionCache

    bad = np.zeros((2, 3, 2), np.float16)
    bad[1, 2, 1] = np.inf
    out = make_cache(tmp_path, array=bad)
    monkeypatch.setattr(CaptionCache, "SCAN_BYTES", 0)  # too big to scan when opened
    cache = CaptionCache(out)
    cache[0]
    with expect(DataError, "embeddings-00000.npy", "row 1"):
        cache[1]


CACHE_CASES = {
    "other_dtype": (dict(array=np.zeros((2, 3, 2), np.float32)), ["embeddings-00000.npy", "dtype float32"]),
    "other_shape": (dict(array=np.zeros((2, 3, 5), np.float16)), ["embeddings-00000.npy", "shape"]),
    "no_shards": (dict(manifest_changes={"shards": []}), ["manifest.json", "'shards'"]),
    "rows_mismatch": (dict(manifest_changes={"rows": 9}), ["manifest.json", "rows"]),
    "shard_escapes": (dict(manifest_changes={"shards": [{"file": "../x.npy", "rows": 4}]}), ["manifest.json", "shards[0]"]),
    "bad_shard_entry": (dict(manifest_changes={"shards": ["embeddings-00000.npy"]}), ["manifest.json", "shards[0]"]),
    "rows_not_int": (dict(manifest_changes={"rows": "4"}), ["manifest.json", "'rows'"]),
    "missing_dim": (dict(manifest_changes={"text_embed_dim": None}), ["manifest.json", "'text_embed_dim'"]),
}


@pytest.mark.parametrize("name", sorted(CACHE_CASES))
def test_cache(tmp_path, name):
    from mmgen.data.caption_cache import CaptionCache

    kwargs, fragments = CACHE_CASES[name]
    out = make_cache(tmp_path, **kwargs)
    with expect(DataError, *fragments):
        CaptionCache(out)


def test_cache_truncated_or_missing_shard_and_bad_manifest(tmp_path):
    from mmgen.data.caption_cache import CaptionCache

    out = make_cache(tmp_path)
    shard = out / "embeddings-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-5])
    with expect(DataError, shard, "truncated"):
        CaptionCache(out)
    shard.unlink()
    with expect(DataError, shard, "not found"):
        CaptionCache(out)
    (out / "manifest.json").write_text("[1, 2]")
    with expect(DataError, out / "manifest.json", "JSON object"):
        CaptionCache(out)
    (out / "manifest.json").write_text("{")
    with expect(DataError, out / "manifest.json", "not valid JSON"):
        CaptionCache(out)


# -- checkpoints and weight files ----------------------------------------------------------------
class Payload:  # an object a hostile pickle could carry
    def __reduce__(self):
        return (print, ("payload ran",))


def bad_checkpoints(tmp_path) -> dict[str, tuple[Path, str]]:
    """name -> (file, fragment of the expected message)."""
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    files = {}
    (d / "empty.ckpt").write_bytes(b"")
    files["empty"] = (d / "empty.ckpt", "empty file")
    good = d / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2, 2)}, "hyper_parameters": {}}, good)
    (d / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated"] = (d / "truncated.ckpt", "not a readable")
    (d / "text.ckpt").write_text("this is a text file, not a checkpoint\n")
    files["text"] = (d / "text.ckpt", "not a readable")
    torch.save([1, 2, 3], d / "list.ckpt")
    files["foreign_list"] = (d / "list.ckpt", "not a Lightning")
    torch.save({"model": {"w": torch.ones(1)}}, d / "nostate.ckpt")
    files["no_state_dict"] = (d / "nostate.ckpt", "'state_dict'")
    torch.save({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, d / "nan.ckpt")
    files["nan"] = (d / "nan.ckpt", "'w'")
    torch.save({"state_dict": {"w": "not a tensor"}}, d / "str.ckpt")
    files["non_tensor"] = (d / "str.ckpt", "'w'")
    with open(d / "unsafe.ckpt", "wb") as f:
        torch.save({"state_dict": {}, "x": Payload()}, f, pickle_module=pickle)
    files["unsafe_pickle"] = (d / "unsafe.ckpt", "pickles Python objects")
    (d / "folder.ckpt").mkdir()
    files["folder"] = (d / "folder.ckpt", "folder")
    fifo(d / "pipe.ckpt")
    files["fifo"] = (d / "pipe.ckpt", "named pipe")
    files["missing"] = (d / "missing.ckpt", "not found")
    return files


CHECKPOINT_NAMES = ["empty", "truncated", "text", "foreign_list", "no_state_dict", "nan", "non_tensor",
                    "unsafe_pickle", "folder", "fifo", "missing"]


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_load_checkpoint_helper(tmp_path, name, capsys):
    from mmgen.checkpoints import load_checkpoint

    path, fragment = bad_checkpoints(tmp_path)[name]
    with expect(ConfigError, path, fragment):
        load_checkpoint(path)
    assert "payload ran" not in capsys.readouterr().out


@pytest.mark.parametrize("name", CHECKPOINT_NAMES)
def test_load_from_checkpoint(tmp_path, name):
    from mmgen.methods.fromage import FROMAGe

    path, fragment = bad_checkpoints(tmp_path)[name]
    with expect(ConfigError, path):
        FROMAGe.load_from_checkpoint(str(path))


@pytest.mark.parametrize("name", ["empty", "truncated", "foreign_list", "nan", "unsafe_pickle", "fifo", "folder"])
def test_export_cli(tmp_path, name):
    from mmgen.cli import main

    path, fragment = bad_checkpoints(tmp_path)[name]
    with expect(ConfigError, path, fragment):
        main(["export", "--ckpt_path", str(path), "--out", str(tmp_path / "out")])


def test_export_checkpoint_without_config(tmp_path):
    from mmgen.cli import main

    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    with expect(ConfigError, path, "model config"):
        main(["export", "--ckpt_path", str(path), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("name", ["empty", "truncated", "text", "nan", "unsafe_pickle", "fifo"])
def test_read_weights_and_init_from(tmp_path, name):
    from mmgen.methods.fromage import FROMAGe
    from mmgen.methods.gill import GILL
    from mmgen.methods.minigpt5 import MiniGPT5
    from mmgen.pretrained import read_weights

    path, fragment = bad_checkpoints(tmp_path)[name]
    with expect(ConfigError, path, fragment):
        read_weights(path)
    for method in (FROMAGe, GILL, MiniGPT5):  # read before the model's groups are asked for
        with expect(ConfigError, path, fragment):
            method.load_initial_weights(object.__new__(method), str(path))


def test_safetensors_truncated_and_nan(tmp_path):
    from safetensors.torch import save_file

    from mmgen.pretrained import read_weights

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4)}, str(path))
    path.write_bytes(path.read_bytes()[:-3])
    with expect(ConfigError, path, "safetensors"):
        read_weights(path)
    save_file({"a": torch.tensor([1.0, float("inf")])}, str(path))
    with expect(ConfigError, path, "'a'", "infinite"):
        read_weights(tmp_path)


def test_release_with_nan_tensor_refused(tmp_path):
    from mmgen.convert import release_state

    path = tmp_path / "pretrained_ckpt.pth.tar"
    torch.save({"state_dict": {"model.logit_scale": torch.tensor(float("nan"))}}, path)
    with expect(ConfigError, path, "model.logit_scale", "NaN"):
        release_state(path)
    fifo(tmp_path / "pipe.pth.tar")
    with expect(ConfigError, "pipe.pth.tar", "named pipe"):
        release_state(tmp_path / "pipe.pth.tar")


# -- pretrained folders ----------------------------------------------------------------------------
def test_pretrained_class_path_not_imported(tmp_path, monkeypatch):
    from mmgen.pretrained import load_pretrained

    marker = tmp_path / "imported"
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Model: pass\n")
    monkeypatch.syspath_prepend(str(package))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"class_path": "evil_module.Model", "init_args": {}}))
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(folder / "model.safetensors"))
    with expect(ConfigError, folder / "config.yaml", "evil_module.Model", "not a registered"):
        load_pretrained(folder)
    nested = {"class_path": "mmgen.methods.fromage.FROMAGe",
              "init_args": {"llm": {"class_path": "evil_module.Model", "init_args": {}}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(nested))
    with expect(ConfigError, "llm.class_path", "evil_module.Model"):
        load_pretrained(folder)
    assert not marker.exists()


PRETRAINED_CASES = {
    "no_folder": (None, "no such folder"),
    "no_config": ({}, "no config.yaml"),
    "bad_yaml": ({"config.yaml": b"class_path: [\n"}, "not valid YAML"),
    "latin1_yaml": ({"config.yaml": "class_path: caf\xe9\n".encode("latin-1")}, "UTF-8"),
    "list_yaml": ({"config.yaml": b"- 1\n"}, "class_path"),
    "no_weights": ({"config.yaml": b"class_path: mmgen.methods.fromage.FROMAGe\ninit_args: {}\n"}, "model.safetensors"),
}


@pytest.mark.parametrize("name", sorted(PRETRAINED_CASES))
def test_pretrained_folder(tmp_path, name):
    from mmgen.methods.base import MultimodalLM

    files, fragment = PRETRAINED_CASES[name]
    folder = tmp_path / "model"
    if files is not None:
        folder.mkdir()
        for file, data in files.items():
            (folder / file).write_bytes(data)
    with expect(ConfigError, folder, fragment):
        MultimodalLM.from_pretrained(folder)


# -- configs, tokenizers, model consistency -----------------------------------------------------------
CONFIG_CASES = {
    "broken_yaml": (b"trainer:\n  max_steps: [1\n", ["line", "not valid YAML"]),
    "not_mapping": (b"- a\n- b\n", ["mapping"]),
    "latin1": ("# caf\xe9\ntrainer: {}\n".encode("latin-1"), ["UTF-8"]),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_second_config_file_named(tmp_path, name):
    from mmgen.cli import main

    data, fragments = CONFIG_CASES[name]
    second = tmp_path / "override.yaml"
    second.write_bytes(data)
    with expect(ConfigError, second, *fragments):
        main(["fit", "--config", TINY, "--config", str(second)])


@pytest.mark.parametrize("kind", ["missing", "folder", "fifo"])
def test_config_file_not_regular(tmp_path, kind):
    from mmgen.cli import main

    path = tmp_path / "c.yaml"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        fifo(path)
    with expect(ConfigError, path):
        main(["validate", "--config", str(path)])


def test_missing_tokenizer_folder_named(tmp_path):
    from mmgen.components.tokenizers import load_tokenizer

    path = tmp_path / "no_such_tokenizer"
    with expect(ConfigError, path, "tokenizer folder not found"):
        load_tokenizer(str(path))


def test_position_table_shorter_than_packed_text(tmp_path):
    from mmgen.cli import build_cli

    config = yaml.safe_load(Path(TINY).read_text())
    config["model"]["init_args"]["llm"]["init_args"]["config"]["max_position_embeddings"] = 32
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(small), "--trainer.logger=false"], run=False)
    with expect(ConfigError, "max_position_embeddings=32", "packed training sequences"):
        cli.model.configure_model()


def test_mistyped_backbone_config_value_named():
    from mmgen.cli import build_cli

    cli = build_cli(["--config", TINY, "--trainer.logger=false",
                     "--model.init_args.llm.init_args.config.max_position_embeddings=many"], run=False)
    with expect(ConfigError, "config", "max_position_embeddings"):
        cli.model.configure_model()


def test_checkpoint_naming_a_foreign_class_is_not_imported(tmp_path, monkeypatch):
    from mmgen.cli import main
    from mmgen.methods.fromage import FROMAGe

    marker = tmp_path / "imported"
    (tmp_path / "evil_ckpt_module.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass M: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)},
                "hyper_parameters": {"_class_path": "evil_ckpt_module.M",
                                     "_instantiator": "lightning.pytorch.cli.instantiate_module"}}, path)
    with expect(ConfigError, path, "evil_ckpt_module.M"):
        FROMAGe.load_from_checkpoint(str(path))
    with expect(ConfigError, path, "evil_ckpt_module.M"):
        main(["validate", "--config", TINY, "--trainer.logger=false", f"--ckpt_path={path}"])
    assert not marker.exists()


def test_load_from_checkpoint_of_another_method(tmp_path):
    from mmgen.methods.fromage import FROMAGe

    path = tmp_path / "gill.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": {"_class_path": "mmgen.methods.gill.GILL"}},
               path)
    with expect(ConfigError, path, "GILL", "FROMAGe"):
        FROMAGe.load_from_checkpoint(str(path))


def test_image_path_that_is_a_pipe_or_folder_named_at_setup(tmp_path):
    from mmgen.data.captions import CaptionImageDataset

    fifo(tmp_path / "a.png")
    (tmp_path / "b.png").mkdir()
    (tmp_path / "t.tsv").write_text("caption\timage\nx\ta.png\n", encoding="utf-8")
    with expect(DataError, "t.tsv", "line 2", "named pipe"):
        CaptionImageDataset(tmp_path / "t.tsv", tmp_path)
    (tmp_path / "t.tsv").write_text("caption\timage\nx\tb.png\n", encoding="utf-8")
    with expect(DataError, "t.tsv", "line 2", "folder"):
        CaptionImageDataset(tmp_path / "t.tsv", tmp_path)


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_weights_only_checkpoint_given_to_the_cli(tmp_path, subcommand):
    from mmgen.cli import main

    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, path)
    with expect(ConfigError, path, "not a Lightning training checkpoint"):
        main([subcommand, "--config", TINY, "--trainer.logger=false", f"--ckpt_path={path}"])


OPTIM_CASES = {"lr": "-1", "warmup_steps": "-5", "schedule": "cosine", "eps": "0", "betas": "[0.9, 1.5]"}


@pytest.mark.parametrize("key", sorted(OPTIM_CASES))
def test_optimizer_settings_checked_when_the_config_is_read(key):
    from mmgen.cli import build_cli

    # ConfigError, or jsonargparse's ValueError carrying its message: the key is named either way
    with pytest.raises(ValueError) as info:
        build_cli(["--config", TINY, "--trainer.logger=false",
                   f"--model.init_args.optim.init_args.{key}={OPTIM_CASES[key]}"], run=False)
    assert f"optim.{key}" in str(info.value)


def test_batch_size_and_image_size_checked(tmp_path):
    from mmgen.data.captions import CaptionDataModule
    from mmgen.data.loading import shuffled_loader

    with expect(ConfigError, "batch_size", "0"):
        CaptionDataModule("t.tsv", batch_size=0)
    with expect(ConfigError, "image_size"):
        CaptionDataModule("t.tsv", image_size=-3)
    with expect(ConfigError, "batch_size"):
        shuffled_loader([1, 2], batch_size=0, seed=0)


@pytest.mark.parametrize("component", ["llm", "generator"])
def test_missing_backbone_folder_named(tmp_path, component):
    from mmgen.components.causal_lm import CausalLM
    from mmgen.components.stable_diffusion import StableDiffusion

    path = tmp_path / "weights" / "no_such_model"
    part = CausalLM(str(path), tokenizer="mmgen:toy_tokenizer") if component == "llm" else StableDiffusion(str(path))
    with expect(ConfigError, path, "folder not found"):
        part.configure(**({} if component == "llm" else {"parts": ("text_encoder",)}))
