"""The `mmgen` command as a user meets it: the command list, --version, one-line user errors
(exit code 2) with tracebacks kept for bugs, up-front checks of a config's inputs, and no LightningCLI
option that would bypass mmgen's optimizer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmgen.cli import LIGHTNING_COMMANDS, TOOLS, console_main, main, tool
from mmgen.errors import ConfigError


def run_console(monkeypatch, capsys, *args):
    """console_main() with these arguments: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["mmgen", *args])
    try:
        console_main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_command_from_the_registry(capsys, monkeypatch):
    @tool("zz-probe")
    def probe(args):
        """A tool added later. It documents itself."""

    try:
        main(["--help"])
        text = capsys.readouterr().out
    finally:
        TOOLS.pop("zz-probe")
    for name in [*LIGHTNING_COMMANDS, *TOOLS, "zz-probe"]:
        assert f"\n  {name} " in text, name
    assert "A tool added later" in text and "It documents itself" not in text  # first sentence only
    for name in ("params", "components", "export", "convert", "cache-captions"):
        assert name in text


def test_version(capsys):
    from mmgen import __version__

    main(["--version"])
    assert capsys.readouterr().out.strip() == f"mmgen {__version__}"


def test_user_errors_are_one_line_with_exit_code_2(monkeypatch, capsys):
    code, out, err = run_console(monkeypatch, capsys, "components", "foo")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mmgen: error: no component kind 'foo'")
    assert "Traceback" not in err

    code, _, err = run_console(monkeypatch, capsys, "frobnicate")
    assert code == 2 and "unknown command 'frobnicate'" in err and err.count("\n") == 1


def test_debug_keeps_the_traceback(monkeypatch, capsys):
    with pytest.raises(ConfigError, match="no component kind"):
        run_console(monkeypatch, capsys, "--debug", "components", "foo")
    monkeypatch.setenv("MMGEN_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_console(monkeypatch, capsys, "components", "foo")


def test_bugs_keep_their_traceback(monkeypatch, capsys):
    @tool("zz-bug")
    def bug(args):
        """Raises a programming error."""
        raise ZeroDivisionError("a bug")

    try:
        with pytest.raises(ZeroDivisionError):
            run_console(monkeypatch, capsys, "zz-bug")
    finally:
        TOOLS.pop("zz-bug")


@pytest.mark.parametrize("option", ["--optimizer=Adam", "--lr_scheduler=StepLR", "--optimizer.lr=0.1"])
def test_optimizer_options_are_refused(option):
    with pytest.raises(ConfigError, match=r"not supported by mmgen.*optim"):
        main(["fit", "--config", "configs/fromage_tiny.yaml", option])


def test_fit_help_has_no_optimizer_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "--optimizer" not in text and "--lr_scheduler" not in text
    assert "--model" in text and "--trainer" in text  # the model and trainer options are there


def test_missing_inputs_are_reported_together(tmp_path, monkeypatch):
    """Every missing data file and offline hub model in one error, before any backbone is built."""
    from huggingface_hub import constants

    # the hub client reads its constants at import: the environment alone would not reach it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError) as raised:
        main(["fit", "--config", "configs/fromage.yaml", "--trainer.logger=false",
              f"--data.init_args.train_tsv={tmp_path}/none.tsv"])
    message = str(raised.value)
    assert "\n" not in message
    for part in ("facebook/opt-6.7b", "openai/clip-vit-large-patch14", f"{tmp_path}/none.tsv",
                 "data/cc3m/val.tsv", "data/cc3m/images", "5 missing"):
        assert part in message, part


def test_console_script_end_to_end():
    """The installed command: help exits 0; a user error is one line on stderr with exit code 2."""
    mmgen = [sys.executable, "-c", "from mmgen.cli import console_main; console_main()"]
    done = subprocess.run([*mmgen, "components", "nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no component kind 'nope'" in done.stderr
