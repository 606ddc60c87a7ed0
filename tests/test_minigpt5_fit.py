"""MiniGPT-5 end to end: tiny stage-1 and stage-2 runs in-process, a stage switch within one run,
and the full-size dry run's parameter counts."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from mmgen.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"




def _metrics(root: Path) -> list[dict]:
    path = sorted(root.glob("lightning_logs/version_*/metrics.csv"))[-1]
    return [r for r in csv.DictReader(path.open()) if r.get("train/text")]


def _fit(config: str, *overrides: str):
    return main(["fit", "--config", str(CONFIGS / config), "--trainer.log_every_n_steps=1",
                 "--data.init_args.batch_size=4", "--data.init_args.val=null", *overrides])


def test_tiny_stage1_then_stage2_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative runs/ and .cache/ folders land here
    _fit("minigpt5_stage1_tiny.yaml", "--trainer.max_steps=8",
         "--data.init_args.train.init_args.n_train=32", "--data.init_args.train.init_args.n_val=0")
    rows = _metrics(tmp_path / "runs/minigpt5_stage1_tiny")
    text = [float(r["train/text"]) for r in rows]
    caption = [float(r["train/caption"]) for r in rows]
    assert len(text) == 8 and text[-1] < text[0] and caption[-1] < caption[0]
    (checkpoint,) = (tmp_path / "runs/minigpt5_stage1_tiny").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    stage1 = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert not any("lora_B" in k and v.abs().sum() > 0 for k, v in stage1.items())  # LoRA frozen in UAS

    # Stage 2 starts from that checkpoint (init_from, as the config's comment says): fc and queries as
    # stage 1 left them, fresh LoRA; it trains LoRA, vokens and the mapper transformer.
    cli2 = _fit("minigpt5_stage2_tiny.yaml", "--trainer.max_steps=6",
                "--data.init_args.train.init_args.n_stories=4", f"--model.init_args.init_from={checkpoint}")
    model = cli2.model
    params = dict(model.named_parameters())
    torch.testing.assert_close(params["mapper.queries.weight"], stage1["mapper.queries.weight"].to(params["mapper.queries.weight"]))
    assert not torch.equal(params["mapper.transformer.decoder.norm.weight"], stage1["mapper.transformer.decoder.norm.weight"])
    assert any("lora_B" in k and p.abs().sum() > 0 for k, p in params.items())
    rows = _metrics(tmp_path / "runs/minigpt5_stage2_tiny")
    text = [float(r["train/text"]) for r in rows]
    assert len(text) == 6 and "train/caption" not in rows[0] or not rows[0]["train/caption"]

    # the text loss of a fixed batch fell from the stage-1 initialisation to the trained model
    batch = next(iter(cli2.datamodule.train_dataloader()))
    before = main(["fit", "--config", str(CONFIGS / "minigpt5_stage2_tiny.yaml"), "--trainer.max_steps=0",
                   "--trainer.logger=false", f"--model.init_args.init_from={checkpoint}"]).model  # built and initialised, not trained
    model.eval(), before.eval()
    with torch.no_grad():
        assert model.compute_losses(batch, train=False)["text"] < before.compute_losses(batch, train=False)["text"]


def test_stage_switch_within_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    switch = tmp_path / "switch.yaml"
    switch.write_text("trainer:\n  callbacks:\n    - class_path: mmgen.methods.stages.TrainingStages\n"
                      "      init_args: {stages: [uas, mls], switch_steps: [2]}\n")
    cli = _fit("minigpt5_stage1_tiny.yaml", "--config", str(switch), "--trainer.max_steps=3",
               "--data.init_args.train.init_args.n_train=16", "--data.init_args.train.init_args.n_val=0")
    model = cli.model
    assert model.stage.name == "mls"
    groups = model.parameter_groups()
    assert all(p.requires_grad for p in groups["adapter"]) and not any(p.requires_grad for p in groups["fc"])
    optimizer = cli.trainer.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in groups["adapter"]} <= in_optimizer and not {id(p) for p in groups["fc"]} & in_optimizer
    # the schedule restarted at the switch (as a separate stage-2 run would): one step since
    assert cli.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 1


def test_full_size_dry_run_counts(capsys):
    rows = main(["params", "--config", str(CONFIGS / "minigpt5_stage2.yaml")])
    table = {name: (total, trainable) for name, total, trainable in rows}
    assert abs(table["mapper"][0] - 122.9e6) < 0.05e6
    # LoRA alone: r=8 on q_proj and v_proj of 32 layers of width 4096
    lora = table["llm"][1] - 9 * 4096 * 2  # minus the 9 new rows of embed_tokens and lm_head
    assert abs(lora - 4.19e6) < 0.01e6
    assert table["visual_encoder"][1] == 0 and table["generator"][1] == 0
    assert "122,899,456" in capsys.readouterr().out
