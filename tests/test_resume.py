"""Exact resume after a real SIGKILL, atomic checkpoints, the damaged-``last.ckpt`` fallback and
resuming with a changed config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgen.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "fromage_tiny.yaml")
MMGEN = [sys.executable, "-c", "from mmgen.cli import console_main; console_main()"]


def _fit(tmp_path, run: str, losses: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """One ``mmgen fit`` of the tiny FROMAGe config in a subprocess: 8 steps an epoch, a
    mid-epoch checkpoint every 5 steps, every step's loss appended to ``losses``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "tests"), OMP_NUM_THREADS="1")
    args = MMGEN + [
        "fit", "--config", TINY, "--trainer.max_steps=20", "--trainer.logger=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path / run}",
        f"--data.init_args.root={tmp_path / 'toy'}", "--data.init_args.n_train=128", "--data.init_args.n_val=16",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=5", "--trainer.callbacks.filename=mid-{step}",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks+=resume_probe.StepLosses", f"--trainer.callbacks.path={tmp_path / losses}",
        *extra,
    ]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(path: Path) -> dict[int, str]:
    return dict((int(s), v) for s, v in (line.strip().split(",") for line in path.read_text().splitlines()))


def test_killed_run_resumes_exactly(tmp_path):
    """A deterministic run killed with SIGKILL at step 13 (mid-epoch 1) and resumed from its
    checkpoint at step 10 logs the same loss at every later step (across the next epoch
    boundary, its validation and reshuffle) as the uninterrupted run."""
    _fit(tmp_path, "full", "full.txt")
    killed = _fit(tmp_path, "run", "killed.txt", "--trainer.callbacks+=resume_probe.KillAt",
                  "--trainer.callbacks.step=13", check=False)
    assert killed.returncode in (-9, 137), killed.stderr[-2000:]  # a real SIGKILL
    checkpoint = tmp_path / "run" / "checkpoints" / "mid-step=10.ckpt"
    assert checkpoint.is_file()
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.tmp"))  # no temp files left behind
    _fit(tmp_path, "run", "resumed.txt", f"--ckpt_path={checkpoint}")
    full, resumed = _losses(tmp_path / "full.txt"), _losses(tmp_path / "resumed.txt")
    assert sorted(resumed) == list(range(11, 21))
    assert {step: full[step] for step in resumed} == resumed


# -- in-process checks on one small checkpoint ----------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from mmgen.cli import main

    tmp = tmp_path_factory.mktemp("ckpt")
    main(["fit", "--config", TINY, "--trainer.max_steps=2", "--trainer.logger=false",
          "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0",
          f"--trainer.default_root_dir={tmp}/run", f"--data.init_args.root={tmp}/toy",
          "--data.init_args.n_train=32", "--data.init_args.n_val=0"])
    path = tmp / "run" / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def _resume_args(tmp_path, ckpt, *extra):
    return ["fit", "--config", TINY, "--trainer.max_steps=3", "--trainer.logger=false",
            "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0",
            f"--trainer.default_root_dir={tmp_path}/run", f"--data.init_args.root={ckpt.parent.parent.parent}/toy",
            "--data.init_args.n_train=32", "--data.init_args.n_val=0", f"--ckpt_path={ckpt}", *extra]


def test_resume_with_changed_model_config_is_refused(tmp_path, checkpoint):
    from mmgen.cli import main

    args = _resume_args(tmp_path, checkpoint, "--model.init_args.retrieval_head.init_args.embed_dim=48",
                        "--model.init_args.max_text_length=20")
    with pytest.raises(ConfigError) as info:
        main(args)
    message = str(info.value)
    assert str(checkpoint) in message and "retrieval_head.init_args.embed_dim" in message
    assert "max_text_length" in message and "32" in message and "48" in message


def test_resume_with_changed_lr_applies_it(tmp_path, checkpoint):
    from mmgen.cli import main

    with pytest.warns(UserWarning, match="optim.lr"):
        cli = main(_resume_args(tmp_path, checkpoint, "--model.init_args.optim.init_args.lr=0.0015"))
    groups = cli.trainer.optimizers[0].param_groups
    stored = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]["param_groups"]
    assert groups[0]["initial_lr"] == pytest.approx(stored[0]["initial_lr"] / 2)


def test_damaged_last_checkpoint_falls_back_to_newest_readable(tmp_path, checkpoint):
    from mmgen.checkpoints import resume_path

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    older, newer, last = folder / "step=1.ckpt", folder / "step=2.ckpt", folder / "last.ckpt"
    shutil.copy(checkpoint, older)
    shutil.copy(checkpoint, newer)
    os.utime(older, (1, 1))
    last.write_bytes(checkpoint.read_bytes()[:100])  # cut short by a kill during a copy
    with pytest.warns(UserWarning) as record:
        assert resume_path(last) == str(newer)
    message = str(record[0].message)
    assert str(last) in message and str(newer) in message
    newer.write_bytes(b"")
    with pytest.warns(UserWarning, match="step=1.ckpt"):
        assert resume_path(last) == str(older)
    older.unlink()
    with pytest.raises(ConfigError, match="last.ckpt"):
        resume_path(last)


def test_validate_with_damaged_checkpoint_names_it(tmp_path, checkpoint):
    from mmgen.cli import main

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(checkpoint.read_bytes()[:200])
    with pytest.raises(ConfigError, match="bad.ckpt"):
        main(["validate", "--config", TINY, "--trainer.logger=false", f"--ckpt_path={bad}"])


def test_fit_resume_from_damaged_last_uses_fallback(tmp_path, checkpoint):
    from mmgen.cli import main

    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(checkpoint, folder / "step=2.ckpt")
    (folder / "last.ckpt").write_bytes(b"")
    with pytest.warns(UserWarning, match="step=2.ckpt"):
        cli = main(_resume_args(tmp_path, folder / "last.ckpt", "--trainer.max_steps=2"))
    assert cli.trainer.global_step == 2


def test_atomic_save_keeps_the_old_file_when_killed_mid_write(tmp_path, monkeypatch):
    from mmgen.checkpoints import AtomicCheckpointIO, load_checkpoint

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_cli_trainer_writes_atomically():
    from mmgen.checkpoints import AtomicCheckpointIO
    from mmgen.cli import build_cli

    cli = build_cli(["--config", TINY, "--trainer.logger=false"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_every_training_config_checkpoints_on_a_step_interval():
    import yaml

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        callbacks = (config.get("trainer") or {}).get("callbacks") or []
        if path.name.startswith("predict"):  # not a training config
            continue
        steps = [c["init_args"].get("every_n_train_steps") for c in callbacks
                 if isinstance(c, dict) and c.get("class_path", "").endswith("ModelCheckpoint")]
        assert any(steps), f"{path.name}: no step-interval ModelCheckpoint"
