"""mmgen in the ecosystem a researcher already uses: library imports in any order in the venv,
no torchvision in mmgen's own image path, random backbones that are a function of their config's
seed, pretrained folders that are portable and load from a hub id."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_CLIP_VISION, TINY_LLAMA, TINY_OPT, TOY_TOKENIZER

ROOT = Path(__file__).resolve().parent.parent


# -- item: imports ---------------------------------------------------------------------------------
IMPORTS = {
    "peft": "import peft",
    "lightning": "import lightning.pytorch",
    "torchmetrics": "import torchmetrics",
    "diffusers": "from diffusers import StableDiffusionPipeline",
    "transformers": "from transformers import CLIPVisionModel",
}


@pytest.mark.parametrize("order", [
    ["peft", "lightning", "torchmetrics", "diffusers", "transformers"],
    ["diffusers", "torchmetrics", "transformers", "lightning", "peft"],
])
def test_libraries_import_in_any_order_without_mmgen_first(order, tmp_path):
    """A fresh interpreter of this environment that never imports mmgen itself."""
    code = "; ".join(IMPORTS[name] for name in order) + "; import sys; print('mmgen' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_mmgen_image_path_needs_no_torchvision():
    """mmgen's own image code is PIL + torch (torchvision's CUDA wheel may not load here)."""
    for folder in ("data", "methods", "inference", "components"):
        for path in sorted((ROOT / "mmgen" / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n.split(".")[0] in ("torchvision", "timm") for n in names), f"{path}: {names}"


def test_pil_image_helpers():
    from PIL import Image

    from mmgen.data.images import center_crop, resize_shorter, to_pil, to_tensor

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    resized = resize_shorter(image, 10)
    assert resized.size == (20, 10)
    cropped = center_crop(resized, 10)
    assert cropped.size == (10, 10)
    pixels = to_tensor(cropped)
    assert pixels.shape == (3, 10, 10) and pixels.dtype == torch.float32
    assert torch.equal(pixels[0], torch.ones(10, 10)) and pixels[1:].abs().sum() == 0
    assert to_pil(pixels).getpixel((3, 3)) == (255, 0, 0)


# -- item: seeded random builds ---------------------------------------------------------------------
def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _build(kind: str, seed: int):
    torch.manual_seed(1234 + seed * 7 + len(kind))  # the caller's random state must not matter
    torch.rand(17)
    if kind == "opt":
        from mmgen.components.causal_lm import CausalLM

        component = CausalLM(config=dict(TINY_OPT), tokenizer=TOY_TOKENIZER, seed=seed)
        component.configure()
        return component.model.get_base_model() if hasattr(component.model, "get_base_model") else component.model
    if kind == "llama":
        from mmgen.components.causal_lm import CausalLM

        component = CausalLM(config=dict(TINY_LLAMA), tokenizer=TOY_TOKENIZER, seed=seed)
        component.configure()
        return component.model
    if kind == "clip":
        from mmgen.components.clip_vision import CLIPVisionEncoder

        component = CLIPVisionEncoder(config=dict(TINY_CLIP_VISION), seed=seed)
        component.configure()
        return component.model
    if kind == "qformer":
        from mmgen.components.qformer import QFormerEncoder

        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        component = QFormerEncoder(config={"vision_config": dict(small, image_size=32, patch_size=8),
                                           "qformer_config": dict(small, cross_attention_frequency=2),
                                           "num_query_tokens": 4}, seed=seed)
        component.configure(embed_dim=16)
        return component
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["opt", "llama", "clip", "qformer"])
def test_random_builds_are_a_function_of_the_seed(kind):
    a, b, c = _state(_build(kind, 0)), _state(_build(kind, 0)), _state(_build(kind, 1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if a[k].is_floating_point() and a[k].numel() > 1 and a[k].std() > 0]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


def test_seeded_build_leaves_the_callers_random_state_alone():
    torch.manual_seed(5)
    expected = torch.rand(4)
    from mmgen.components.clip_vision import CLIPVisionEncoder

    torch.manual_seed(5)
    CLIPVisionEncoder(config=dict(TINY_CLIP_VISION)).configure()
    assert torch.equal(torch.rand(4), expected)


# -- item: portable pretrained folders, hub ids, push_to_hub ----------------------------------------
def _tiny_fromage():
    """configs/fromage_tiny.yaml's model (random backbones from their seeds), trained tensors moved
    away from their initialisation."""
    import yaml

    from mmgen.pretrained import build_model, trained_state

    model = build_model(yaml.safe_load(open(ROOT / "configs" / "fromage_tiny.yaml"))["model"])
    model.configure_model()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in trained_state(model):
            params[name].add_(torch.randn_like(params[name]))
    return model.eval()


@pytest.fixture(scope="module")
def saved_fromage(tmp_path_factory):
    from mmgen.pretrained import save_pretrained

    torch.manual_seed(0)
    model = _tiny_fromage()
    folder = tmp_path_factory.mktemp("run") / "fromage"
    with pytest.warns(UserWarning, match="random frozen weights"):
        save_pretrained(model, folder)
    return model, folder


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


def test_a_folder_is_self_contained_and_loads_after_a_copy(saved_fromage, tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer

    from mmgen.methods.fromage import FROMAGe

    model, folder = saved_fromage
    copy = tmp_path / "elsewhere" / "fromage"
    shutil.copytree(folder, copy)
    assert str(folder.parent) not in (copy / "config.yaml").read_text()  # nothing points at the run
    tokenizer = AutoTokenizer.from_pretrained(copy / "tokenizer" / "llm")
    assert tokenizer.convert_tokens_to_ids("[RET]") == model.llm.token_id("[RET]")
    adapter = json.loads((copy / "adapter" / "llm" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == model.llm.name_or_path  # the LLM it adapts (None: a random build)
    card = (copy / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mmgen\n")
    torch.manual_seed(123)  # whatever the caller's random state: the frozen random backbones are seeded
    _same_model(FROMAGe.from_pretrained(copy), model)


def test_adapter_names_its_base_model(tmp_path):
    """A LoRA adapter saved with the folder records the LLM it adapts (hub id or folder)."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from mmgen.pretrained import build_model, save_pretrained

    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_OPT)).save_pretrained(tmp_path / "opt")
    config = {"class_path": "FROMAGe", "init_args": {
        "llm": {"class_path": "CausalLM", "init_args": {
            "name_or_path": str(tmp_path / "opt"), "tokenizer": TOY_TOKENIZER,
            "adapter": {"class_path": "LoRA", "init_args": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}}},
        "visual_encoder": {"class_path": "CLIPVisionEncoder", "init_args": {"config": dict(TINY_CLIP_VISION)}},
        "retrieval_head": {"class_path": "RetrievalHead", "init_args": {"embed_dim": 16}}}}
    model = build_model(config)
    model.configure_model()
    with pytest.warns(UserWarning):
        save_pretrained(model, tmp_path / "lora")
    adapter = json.loads((tmp_path / "lora" / "adapter" / "llm" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "opt")
    assert adapter["peft_type"] == "LORA"


def test_run_files_are_not_in_a_folders_config():
    """A MiniGPT-5 stage-2 folder must not send a copy to the stage-1 run's checkpoint."""
    from mmgen.pretrained import portable_config

    config = {"class_path": "MiniGPT5", "init_args": {"init_from": "/runs/stage1/last.ckpt", "init_reset": ["adapter"],
                                                     "mapper": {"init_args": {"init_from": "/runs/m.ckpt"}}}}
    assert portable_config(config) == {"class_path": "MiniGPT5", "init_args": {
        "init_from": None, "init_reset": ["adapter"], "mapper": {"init_args": {"init_from": None}}}}


def _hub_cache(tmp_path, repo_id: str, folder: Path) -> Path:
    """A hub cache holding ``folder`` as the main revision of ``repo_id`` (huggingface_hub's layout)."""
    import shutil

    cache = tmp_path / "hub-cache"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The hub client offline, its cache a folder of this test (huggingface_hub reads both at call time
    from its constants, set from the environment at import)."""
    from huggingface_hub import constants

    def use(cache: Path):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    return use


def test_a_hub_id_resolves_through_the_hub_client(saved_fromage, tmp_path, offline_hub):
    from mmgen.inference.api import load_model
    from mmgen.methods.base import MultimodalLM

    model, folder = saved_fromage
    offline_hub(_hub_cache(tmp_path, "someone/fromage-tiny", folder))
    _same_model(MultimodalLM.from_pretrained("someone/fromage-tiny"), model)
    _same_model(load_model("someone/fromage-tiny", device="cpu"), model)


def test_a_hub_id_missing_offline_is_one_line_naming_it(tmp_path, offline_hub):
    from mmgen.errors import ConfigError
    from mmgen.methods.base import MultimodalLM

    offline_hub(tmp_path / "empty")
    with pytest.raises(ConfigError) as raised:
        MultimodalLM.from_pretrained("someone/not-there")
    message = str(raised.value)
    assert "someone/not-there" in message and "offline" in message and "\n" not in message


def test_from_pretrained_refuses_another_method_before_building(saved_fromage, monkeypatch):
    import mmgen.pretrained
    from mmgen.errors import ConfigError
    from mmgen.methods.gill import GILL

    def no_build(*args, **kwargs):
        raise AssertionError("built a model before checking its method")

    monkeypatch.setattr(mmgen.pretrained, "build_model", no_build)
    with pytest.raises(ConfigError, match="holds a FROMAGe, not a GILL"):
        GILL.from_pretrained(saved_fromage[1])


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records the calls, keeps uploaded files by repo."""

    repos: dict[str, Path] = {}
    calls: list[tuple] = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, repo_type=None, revision=None, commit_message=None):
        import shutil

        FakeHub.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, FakeHub.repos[repo_id], dirs_exist_ok=True)
        return type("Commit", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()


def test_push_to_hub_then_load_by_id(saved_fromage, tmp_path, monkeypatch, offline_hub):
    import huggingface_hub

    model, folder = saved_fromage
    FakeHub.repos = {"someone/pushed": tmp_path / "uploaded"}
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    with pytest.warns(UserWarning, match="random frozen weights"):
        url = model.push_to_hub("someone/pushed", private=True)  # the model: saved, then uploaded
    assert url == "https://hub.example/someone/pushed/commit/1"
    assert FakeHub.calls[0] == ("create_repo", "someone/pushed", True, True)
    uploaded = {p.relative_to(tmp_path / "uploaded").as_posix() for p in (tmp_path / "uploaded").rglob("*") if p.is_file()}
    assert {"config.yaml", "model.safetensors", "README.md", "tokenizer/llm/tokenizer.json"} <= uploaded

    from mmgen.pretrained import push_to_hub

    FakeHub.repos["someone/folder"] = tmp_path / "uploaded-folder"
    push_to_hub(folder, "someone/folder")  # a folder as it is
    offline_hub(_hub_cache(tmp_path, "someone/folder", tmp_path / "uploaded-folder"))
    from mmgen.methods.fromage import FROMAGe

    _same_model(FROMAGe.from_pretrained("someone/folder"), model)


# -- item: library code in place of hand-written copies ---------------------------------------------
def _old_lr_factor(step, warmup, schedule, decay_steps, decay_factor, total):
    """The hand-written schedule mmgen used before (the behaviour to keep)."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return decay_factor ** sum(step >= s for s in decay_steps)
    return max(0.0, (total - step) / max(total - warmup, 1))


@pytest.mark.parametrize("schedule,warmup", [("constant", 0), ("constant", 10), ("linear", 10), ("linear", 0), ("step", 5)])
def test_schedules_are_the_library_ones_with_the_same_values(schedule, warmup):
    from mmgen.methods.optim import Optim, build_optimizer

    optim = Optim(lr=0.5, warmup_steps=warmup, schedule=schedule, decay_steps=(20, 40), total_steps=60)
    weight = torch.nn.Parameter(torch.zeros(2, 2))
    built = build_optimizer(torch.nn.ParameterDict({"w": weight}), optim, 1000)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    if schedule != "step":
        assert scheduler.lr_lambdas[0].func.__module__.startswith("transformers.")  # transformers' schedule
    seen = []
    for _ in range(70):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.5 * _old_lr_factor(s, warmup, schedule, (20, 40), 0.1, 60) for s in range(70)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_min_snr_weights_come_from_diffusers():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from mmgen.components.stable_diffusion import min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(scheduler, t)
    torch.testing.assert_close(min_snr_weights(scheduler.alphas_cumprod, t, 5.0), torch.clamp(snr, max=5.0) / snr)
    alpha = scheduler.alphas_cumprod[t]
    old = torch.clamp(alpha / (1 - alpha), max=5.0) / (alpha / (1 - alpha))  # the former hand-written form
    torch.testing.assert_close(min_snr_weights(scheduler.alphas_cumprod, t, 5.0), old, rtol=1e-5, atol=1e-7)


def _old_recall(text, image, ks):
    """The former per-query loop (torchmetrics' functional recall, one query at a time)."""
    from torchmetrics.functional.retrieval import retrieval_recall as one_query

    sims = text @ image.t()
    target = torch.eye(sims.shape[0], dtype=torch.bool)
    return {f"{name}_R@{k}": float(torch.stack([one_query(m[i], target[i], top_k=k) for i in range(len(m))]).mean())
            for name, m in (("t2i", sims), ("i2t", sims.t())) for k in ks}


def _topk_recall(text, image, ks):
    """Recall@k as the papers compute it: is the match among the k best-scored."""
    sims = text @ image.t()
    out = {}
    for name, m in (("t2i", sims), ("i2t", sims.t())):
        top = m.topk(max(ks), dim=1).indices
        hit = top == torch.arange(len(m))[:, None]
        out.update({f"{name}_R@{k}": float(hit[:, :k].any(1).float().mean()) for k in ks})
    return out


def test_recall_is_torchmetrics_and_equals_the_former_numbers():
    from mmgen.methods.losses import retrieval_recall

    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.rand(40, 8), dim=-1)  # positive: every score > 0
    image = torch.nn.functional.normalize(text + 0.3 * torch.rand(40, 8), dim=-1)
    new = retrieval_recall(text, image, ks=(1, 5, 10))
    assert new == _old_recall(text, image, (1, 5, 10)) == _topk_recall(text, image, (1, 5, 10))
    assert 0 < new["t2i_R@1"] < 1
    # a chunk of 7 queries at a time (the memory bound of large galleries) gives the same numbers
    chunked = retrieval_recall(text, image, ks=(1, 5, 10), scores_per_chunk=7 * 40)
    assert chunked.keys() == new.keys() and all(abs(chunked[k] - new[k]) < 1e-6 for k in new)


def test_recall_counts_matches_with_negative_similarity():
    """torchmetrics alone counts a match only where its score is > 0; recall@k does not care."""
    from mmgen.methods.losses import retrieval_recall

    torch.manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    image = torch.nn.functional.normalize(-text + 0.2 * torch.randn(30, 8), dim=-1)  # matches anti-aligned
    assert retrieval_recall(text, image, ks=(1, 5)) == _topk_recall(text, image, (1, 5))


# -- item: quiet runs ---------------------------------------------------------------------------------
UNACTIONABLE = (
    "Tip:", "tie_word_embeddings=True", "is_gradient_checkpointing", "module(s) in eval mode",
    "enable_nested_tensor", "kept in float32: []", "LeafSpec", "LightningCLI's args parameter",
    "Found keys that are in the model state dict but not in the checkpoint",
)


def test_a_tiny_fit_and_a_dry_run_emit_no_unactionable_warning(tmp_path, monkeypatch, caplog, capsys):
    import logging
    import warnings

    from mmgen.cli import main
    from mmgen.methods.gill import GILL

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["fit", "--config", str(ROOT / "configs/gill_tiny.yaml"), "--trainer.max_steps=2",
                    "--trainer.limit_val_batches=1", "--data.init_args.n_train=32", "--data.init_args.n_val=16"])
        main(["params", "--config", str(ROOT / "configs/fromage_tiny.yaml")])
        (checkpoint,) = (tmp_path / "runs/gill_tiny").glob("lightning_logs/version_*/checkpoints/last.ckpt")
        GILL.load_from_checkpoint(checkpoint)
    assert cli.trainer.global_step == 2
    shown = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    shown.append(capsys.readouterr().err)
    for text in UNACTIONABLE:
        assert not [s for s in shown if text in s], text


# -- item: stages and tiny configs ---------------------------------------------------------------------
def test_decision_stage_starts_from_a_gill_folder_and_refuses_nothing_to_start_from(tmp_path, monkeypatch):
    import yaml

    from mmgen.cli import main
    from mmgen.errors import ConfigError
    from mmgen.pretrained import build_model, save_pretrained

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs/gill_decision_tiny.yaml"), "--trainer.logger=false",
            "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
            "--data.init_args.train_file=" + str(ROOT / "configs/data/decision_prompts_toy.tsv")]
    with pytest.raises(ConfigError, match="init_from"):
        main(args)
    gill = build_model(yaml.safe_load(open(ROOT / "configs/gill_tiny.yaml"))["model"])
    gill.configure_model()
    with torch.no_grad():
        gill.gen_mapper.fc.weight.add_(1.0)  # "trained"
    with pytest.warns(UserWarning, match="random frozen weights"):
        save_pretrained(gill, tmp_path / "gill")
    cli = main(args + [f"--model.init_args.init_from={tmp_path / 'gill'}"])  # a pretrained folder
    assert cli.trainer.global_step == 1
    assert torch.equal(cli.model.gen_mapper.fc.weight, gill.gen_mapper.fc.weight)


def test_stage2_with_prefix_tuning_starts_from_a_lora_stage1(tmp_path):
    """The token rows move across peft's different nesting; stage 1's (identity) LoRA is dropped."""
    import copy

    import yaml
    from safetensors.torch import save_file

    from mmgen.pretrained import build_model

    config = yaml.safe_load(open(ROOT / "configs/minigpt5_stage1_tiny.yaml"))["model"]
    stage1 = build_model(config)
    stage1.configure_model()
    params = dict(stage1.named_parameters())
    with torch.no_grad():
        for name in stage1.trainable_state_keys():
            params[name].add_(torch.randn_like(params[name]))
    save_file({k: params[k].detach().contiguous() for k in stage1.trainable_state_keys()}, str(tmp_path / "s1.safetensors"))

    config2 = copy.deepcopy(config)
    config2["init_args"]["llm"]["init_args"]["adapter"] = {
        "class_path": "mmgen.components.prefix_tuning.PrefixTuning", "init_args": {"num_virtual_tokens": 4}}
    config2["init_args"].update(init_from=str(tmp_path / "s1.safetensors"), init_reset=["adapter"])
    stage2 = build_model(config2)
    stage2.configure_model()
    rows1 = stage1.llm.parameter_groups()["tokens"]
    rows2 = stage2.llm.parameter_groups()["tokens"]
    assert len(rows1) == len(rows2) and all(torch.equal(a, b) for a, b in zip(rows1, rows2))
    p2 = dict(stage2.named_parameters())
    assert torch.equal(p2["mapper.queries.weight"], params["mapper.queries.weight"])


@pytest.mark.parametrize("name", ["fromage_tiny", "gill_tiny", "gill_decision_tiny", "minigpt5_stage1_tiny",
                                  "minigpt5_stage2_tiny"])
def test_tiny_configs_print_progress_validate_and_keep_their_checkpoints(name):
    import yaml

    config = yaml.safe_load(open(ROOT / "configs" / f"{name}.yaml"))
    callbacks = config["trainer"]["callbacks"]
    printers = [c for c in callbacks if c["class_path"] == "mmgen.callbacks.PrintMetrics"]
    assert printers and printers[0]["init_args"]["every_n_steps"] > 0
    for callback in callbacks:  # the logger's versioned folder: a second run writes next to the first
        if callback["class_path"].endswith("ModelCheckpoint"):
            assert "dirpath" not in (callback.get("init_args") or {})
    data = config["data"]["init_args"]
    assert any(data.get(k) for k in ("val", "val_file", "n_val")), "no validation data"
    assert "version_0" not in (ROOT / "configs" / f"{name}.yaml").read_text()


def test_recall_over_a_gathered_set_keeps_each_item_once():
    """What a distributed sampler's padding repeats is dropped by dataset index before scoring."""
    from mmgen.methods.losses import retrieval_recall
    from mmgen.methods.retrieval_metrics import _first_occurrences

    torch.manual_seed(2)
    text = torch.nn.functional.normalize(torch.randn(7, 8), dim=-1)
    image = torch.nn.functional.normalize(text + 0.5 * torch.randn(7, 8), dim=-1)
    index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])  # two ranks of 4: the sampler repeated item 0
    keep = _first_occurrences(index)
    padded_text, padded_image = torch.cat([text, text[:1]]), torch.cat([image, image[:1]])
    assert retrieval_recall(padded_text[keep], padded_image[keep]) == retrieval_recall(text, image)


def test_export_pushes_to_the_hub_from_the_command_line(saved_fromage, tmp_path, monkeypatch):
    import huggingface_hub

    from mmgen.cli import main
    from mmgen.pretrained import trained_state

    model, _ = saved_fromage
    ckpt = {"state_dict": trained_state(model), "hyper_parameters": dict(model.hparams), "global_step": 3,
            "pytorch-lightning_version": "2"}
    torch.save(ckpt, tmp_path / "last.ckpt")
    FakeHub.repos = {"someone/cli": tmp_path / "uploaded"}
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    with pytest.warns(UserWarning, match="random frozen weights"):
        main(["export", "--ckpt_path", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "out"),
              "--push_to_hub", "someone/cli", "--private"])
    assert ("create_repo", "someone/cli", True, True) in FakeHub.calls
    assert (tmp_path / "uploaded" / "model.safetensors").is_file()


def test_a_minigpt5_stage2_folder_loads_without_the_stage1_checkpoint(tmp_path):
    import yaml
    from safetensors.torch import save_file

    from mmgen.pretrained import build_model, load_pretrained, save_pretrained

    stage1 = build_model(yaml.safe_load(open(ROOT / "configs/minigpt5_stage1_tiny.yaml"))["model"])
    stage1.configure_model()
    params = dict(stage1.named_parameters())
    save_file({k: params[k].detach().contiguous() for k in stage1.trainable_state_keys()}, str(tmp_path / "s1.safetensors"))

    config = yaml.safe_load(open(ROOT / "configs/minigpt5_stage2_tiny.yaml"))["model"]
    config["init_args"]["init_from"] = str(tmp_path / "s1.safetensors")
    stage2 = build_model(config)
    stage2.configure_model()
    with pytest.warns(UserWarning, match="random frozen weights"):
        save_pretrained(stage2, tmp_path / "folder")
    (tmp_path / "s1.safetensors").unlink()  # the stage-1 run is gone
    assert yaml.safe_load((tmp_path / "folder" / "config.yaml").read_text())["init_args"]["init_from"] is None
    _same_model(load_pretrained(tmp_path / "folder"), stage2.eval())
