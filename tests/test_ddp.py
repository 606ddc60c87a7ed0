"""Two processes on CPU (gloo), as users run the full-size configs on several GPUs: each method
trains under DDP, the all-gathered contrastive loss gives one device's gradients on the same
global batch, random draws differ per process, and validation metrics exist on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MMGEN = [sys.executable, "-m", "mmgen.cli"]


def fit(tmp_path: Path, name: str, config: str, *args: str, devices: int = 2) -> list[dict]:
    """``mmgen fit`` in a subprocess (DDP re-launches it per process); the probe's records."""
    out = tmp_path / name
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = MMGEN + [
        "fit", "--config", config, f"--trainer.devices={devices}", "--trainer.accelerator=cpu",
        f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}", f"--trainer.default_root_dir={out}",
        "--trainer.logger=false",
        "--trainer.callbacks+=ddp_probe.Probe", f"--trainer.callbacks.out_dir={out / 'probe'}", *args,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [torch.load(out / "probe" / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def test_fromage_under_ddp_matches_one_device_on_the_global_batch(tmp_path):
    data = [f"--data.root={tmp_path / 'toy'}", "--data.n_train=8", "--data.n_val=7",
            "--model.init_args.pack_probability=0.5", "--trainer.max_steps=1", "--trainer.max_epochs=1"]
    one = fit(tmp_path, "one", "configs/fromage_tiny.yaml", *data, "--data.batch_size=8", devices=1)[0]
    two = fit(tmp_path, "two", "configs/fromage_tiny.yaml", *data, "--data.batch_size=4")
    # The retrieval head learns from the contrastive loss alone: over the same 8 pairs (in another
    # order, which InfoNCE ignores) its gradients must be one device's, not half of them.
    for name in ("retrieval_head.text_proj.weight", "retrieval_head.image_proj.weight", "retrieval_head.logit_scale"):
        for rank in two:
            torch.testing.assert_close(rank["grads"][name], one["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    # each process draws its own packing coins
    assert not torch.equal(two[0]["rng_state"], two[1]["rng_state"])
    # recall is logged on every process, over each validation image once (7, not the sampler's 8)
    for rank in two:
        assert rank["val_metrics"]["val/chance_R@1"] == pytest.approx(1 / 7)
        assert "val/t2i_R@1" in rank["val_metrics"]


def test_fromage_without_world_scaling_reproduces_the_official_gradient(tmp_path):
    data = [f"--data.root={tmp_path / 'toy'}", "--data.n_train=8", "--data.n_val=0",
            "--model.init_args.pack_probability=0", "--trainer.max_steps=1", "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=0"]
    one = fit(tmp_path, "one", "configs/fromage_tiny.yaml", *data, "--data.batch_size=8", devices=1)[0]
    two = fit(tmp_path, "two", "configs/fromage_tiny.yaml", *data, "--data.batch_size=4",
              "--model.init_args.scale_contrastive_by_world=false")
    name = "retrieval_head.image_proj.weight"
    torch.testing.assert_close(two[0]["grads"][name], one["grads"][name] / 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config", ["configs/gill_tiny.yaml"])
def test_gill_trains_under_ddp(tmp_path, config):
    records = fit(tmp_path, "gill", config, f"--data.root={tmp_path / 'toy'}", "--data.n_train=16", "--data.n_val=8", "--data.batch_size=4",
                  "--trainer.max_steps=2", "--trainer.max_epochs=1")
    assert all(r["world_size"] == 2 and r["grads"] for r in records)
    torch.testing.assert_close(records[0]["grads"]["retrieval_head.logit_scale"], records[1]["grads"]["retrieval_head.logit_scale"])


@pytest.mark.parametrize("config,extra", [
    ("configs/minigpt5_stage1_tiny.yaml", ["--data.batch_size=4"]),
    # batches of one: many hold a VIST "understand" sample, with no output image (mapper unused)
    ("configs/minigpt5_stage2_tiny.yaml", ["--data.batch_size=1", "--model.init_args.init_from=null"]),
], ids=["stage1", "stage2"])
def test_minigpt5_trains_under_ddp(tmp_path, config, extra):
    records = fit(tmp_path, "minigpt5", config, "--trainer.max_steps=6", *extra)
    assert all(r["world_size"] == 2 and r["grads"] for r in records)
    assert not torch.equal(records[0]["rng_state"], records[1]["rng_state"])  # CFG draws per process
    # DDP averaged the gradients: both processes hold the same ones
    for name, grad in records[0]["grads"].items():
        torch.testing.assert_close(grad, records[1]["grads"][name], msg=name)
