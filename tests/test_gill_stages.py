"""GILL end to end: the tiny `mmgen fit`, the full-size dry run, the decision stage."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from mmgen.data.decision_prompts import (
    DecisionPromptDataModule,
    read_decision_prompts,
    write_example_decision_prompts,
)
from mmgen.errors import ConfigError, DataError


def _metrics(root: Path) -> list[dict]:
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope="module")
def gill_run(tmp_path_factory):
    """A tiny GILL fit in-process: 2 epochs of 4 steps on 64 toy pairs."""
    from mmgen.cli import main

    root = tmp_path_factory.mktemp("gill_fit")
    main([
        "fit", "--config", "configs/gill_tiny.yaml",
        "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        f"--data.init_args.root={root / 'toy'}", "--data.init_args.n_train=64", "--data.init_args.n_val=16",
    ])
    return root


def test_tiny_fit_losses_fall(gill_run):
    train = [r for r in _metrics(gill_run) if r.get("train/loss")]
    assert len(train) == 8
    for name in ("train/loss", "train/gen", "train/contrastive"):
        values = [float(r[name]) for r in train]
        assert sum(values[-2:]) < sum(values[:2]), (name, values)
    val = [r for r in _metrics(gill_run) if r.get("val/loss")]
    assert float(val[-1]["val/loss"]) < float(val[0]["val/loss"])


def test_checkpoint_holds_trainable_parameters_only(gill_run):
    (ckpt,) = gill_run.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    keys = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert {k.split(".")[0] for k in keys} == {"llm", "visual_prefix", "retrieval_head", "gen_mapper"}
    assert any("trainable_tokens" in k for k in keys)


def test_full_size_dry_run():
    from mmgen.cli import main

    rows = dict((name, (total, trainable)) for name, total, trainable in main(["params", "--config", "configs/gill.yaml"]))
    trainable = sum(t for _, t in rows.values())
    assert abs(trainable - 50.1e6) < 0.1e6, trainable  # the paper: about 50.1M
    assert abs(rows["gen_mapper"][1] - 31.96e6) < 0.01e6
    assert rows["llm"][1] == 8 * 4096  # the [IMG] rows
    assert rows["image_generator"] == (0, 0)  # caption embeddings from the cache: SD never built


# -- the decision stage ------------------------------------------------------------------------
def test_decision_prompt_file(tmp_path):
    example = write_example_decision_prompts(tmp_path / "p.tsv")
    assert example.read_text() == Path("configs/data/decision_prompts_toy.tsv").read_text()
    prompts = read_decision_prompts(example)
    assert len(prompts) == 48 and {p.label for p in prompts} == {0, 1}
    assert prompts[0].line == 2

    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\na red circle\tretrieve\n\na blue cross\tgen\n")
    with pytest.raises(DataError, match=r"bad.tsv, line 4: label 'gen'"):
        read_decision_prompts(bad)
    bad.write_text("prompt\tdecision\n")
    with pytest.raises(DataError, match="line 1"):
        read_decision_prompts(bad)


def test_decision_stage(tmp_path, gill_run):
    """A stage of GILL: the GILL run's tensors come in through init_from, only the decision module
    trains (requires_grad, optimizer), and its checkpoint holds the whole trained GILL."""
    from mmgen.cli import build_cli, main

    (ckpt,) = gill_run.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    args = ["--config", "configs/gill_decision_tiny.yaml", f"--model.init_args.init_from={ckpt}",
            f"--data.init_args.val_file={tmp_path / '.cache' / 'val.tsv'}"]
    cli = build_cli(args + ["--trainer.logger=false"], run=False)
    model = cli.model
    cli.trainer.strategy.connect(model)
    cli.trainer.callbacks[0].setup(cli.trainer, model, "fit")  # TrainingStages: the decision stage
    model.configure_model()
    assert model.deciding
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"decision_head.head.1.weight", "decision_head.head.1.bias"}
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    loaded = model.state_dict()
    assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items())  # the GILL run's weights
    assert model.image_generator.text_encoder is None  # not needed here
    optimizer = model.configure_optimizers()["optimizer"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.decision_head.parameters()}

    data: DecisionPromptDataModule = cli.datamodule
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("decision_head")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    assert not model.llm.training and model.decision_head.training  # frozen GILL: no dropout there
    model.decision_head.eval()  # no dropout: a deterministic check that it learns
    losses = []
    for _ in range(15):
        loss = model.decision_losses(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items() if k in frozen)
    assert set(model.decide(batch["prompts"][:3])) <= {"retrieve", "generate"}

    # `mmgen fit`: a few steps; the checkpoint is a whole GILL with its decision module
    root = tmp_path / "run"
    main(["fit", *args, "--trainer.max_steps=3", "--trainer.max_epochs=1", f"--trainer.default_root_dir={root}",
          f"--trainer.logger.init_args.save_dir={root}", "--trainer.num_sanity_val_steps=0"])
    (decision_ckpt,) = root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    keys = set(torch.load(decision_ckpt, map_location="cpu", weights_only=True)["state_dict"])
    assert keys == set(saved) | {"decision_head.head.1.weight", "decision_head.head.1.bias"}
    from mmgen.inference.api import load_checkpoint

    answering = load_checkpoint(decision_ckpt)  # without the GILL run's file: all tensors are in it
    assert answering.decision_head is not None and answering.stage is None


def test_decision_stage_refuses_an_untrained_gill_or_another_models_checkpoint(tmp_path):
    from mmgen.cli import build_cli

    def configured(*extra):
        cli = build_cli(["--config", "configs/gill_decision_tiny.yaml", "--trainer.logger=false", *extra], run=False)
        cli.trainer.callbacks[0].setup(cli.trainer, cli.model, "fit")
        cli.model.configure_model()

    with pytest.raises(ConfigError, match="init_from"):
        configured()
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"state_dict": {"visual_prefix.proj.weight": torch.zeros(1)}}, bogus)
    with pytest.raises(ConfigError, match="bogus.ckpt"):
        configured(f"--model.init_args.init_from={bogus}")
