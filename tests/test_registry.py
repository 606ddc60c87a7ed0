"""The registry: kinds, self-registration, listing, and configs naming components."""

import pytest

from mmgen.components.base import OutputHead, VisualEncoder
from mmgen.registry import REGISTRY, registered


def test_mmgen_components_are_registered_by_kind():
    table = registered()
    assert "CausalLM" in table["llm"]
    assert "CLIPVisionEncoder" in table["visual_encoder"]
    assert "RetrievalHead" in table["output_head"]
    assert "LinearVisualPrefix" in table["input_projection"]
    assert "LoRA" in table["adapter"]
    assert "FROMAGe" in table["method"]
    assert "image_generator" in table


def test_a_subclass_in_research_code_registers_itself_where_it_is_defined():
    class MyHead(OutputHead):
        def configure(self, **dims):
            pass

    assert REGISTRY["output_head"]["MyHead"] is MyHead
    # kind bases themselves are interfaces, not components
    assert "VisualEncoder" not in REGISTRY["visual_encoder"]
    assert issubclass(MyHead, OutputHead) and not issubclass(MyHead, VisualEncoder)


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(KeyError, match="no component kind 'nope'"):
        registered("nope")


def test_cli_lists_components(capsys):
    from mmgen.cli import main

    main(["components", "llm"])
    out = capsys.readouterr().out
    assert "llm:" in out and "mmgen.components.causal_lm.CausalLM" in out
    assert "visual_encoder" not in out


def test_a_config_may_name_a_component_by_its_short_name(tmp_path):
    from mmgen.cli import build_cli

    config = tmp_path / "short.yaml"
    config.write_text(
        (pytest.importorskip("pathlib").Path("configs/fromage_tiny.yaml").read_text())
        .replace("mmgen.components.clip_vision.CLIPVisionEncoder", "CLIPVisionEncoder")
        .replace("mmgen.methods.fromage.FROMAGe", "FROMAGe")
    )
    cli = build_cli(["--config", str(config), "--trainer.logger=false"], run=False)
    assert type(cli.model).__name__ == "FROMAGe"
    assert type(cli.model.visual_encoder).__name__ == "CLIPVisionEncoder"
    assert cli.model.llm.model is None  # parsing built nothing: weights load in configure_model
