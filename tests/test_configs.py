"""Every shipped config parses and builds its (lazy) model, trainer and data module, offline."""

from pathlib import Path

import pytest

from mmgen.cli import build_cli
from mmgen.methods.base import MultimodalLM

# Whole configs; add-on configs (configs/predict_toy.yaml: data and writer for `mmgen predict`,
# given after a training config) have no model section of their own.
CONFIGS = sorted(str(p) for p in Path("configs").glob("*.yaml") if "\nmodel:" in "\n" + p.read_text())


def test_configs_are_shipped():
    assert "configs/fromage.yaml" in CONFIGS and "configs/fromage_tiny.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_config_parses_and_builds_nothing_heavy(config):
    cli = build_cli(["--config", config, "--trainer.logger=false"], run=False)
    assert isinstance(cli.model, MultimodalLM)
    assert sum(p.numel() for p in cli.model.parameters()) < 100_000  # weights load in configure_model


def test_help_and_print_config_work_offline(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", "configs/fromage.yaml", "--print_config"])
    assert exit_info.value.code == 0
    assert "facebook/opt-6.7b" in capsys.readouterr().out
