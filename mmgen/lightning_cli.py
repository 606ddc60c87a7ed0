"""mmgen's LightningCLI: the checks that make a crash cost minutes and bad input a clear answer.

On top of Lightning's own CLI, :class:`MMGenCLI`

- reads every ``--config`` file before parsing, so a missing, non-regular, non-UTF-8 or broken
  YAML file is named (jsonargparse's message does not say which of several files failed);
- checks the ``--ckpt_path`` of every subcommand with :mod:`mmgen.checkpoints` (weights-only,
  the file named in every error); for ``fit``, a damaged checkpoint falls back to the newest
  readable one in its folder, with a warning naming both;
- on resume compares the run's model config with the one stored in the checkpoint: what may
  change (the learning rate and its schedule, where initial weights came from) is applied; any
  other difference is refused with the list of keys (Lightning would otherwise silently rebuild
  the checkpoint's model and drop the change);
- refuses ``--optimizer`` / ``--lr_scheduler``: the methods build their own optimizer groups and
  schedule, which those would silently replace (MiniGPT-5's stage freezing with them);
- checks every data path, local model file and (offline) hub model of the config up front and
  reports them together (:mod:`mmgen.preflight`);
- writes checkpoints atomically (:class:`mmgen.checkpoints.AtomicCheckpointIO`).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from mmgen.errors import ConfigError

#: Model config keys (under init_args, dotted) that a resumed run may change; see _compare.
RESUMABLE_CHANGES = (
    "optim.lr", "optim.warmup_steps", "optim.schedule", "optim.decay_steps", "optim.decay_factor",
    "optim.total_steps", "init_from", "init_reset",
)
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")
#: LightningCLI options that would bypass mmgen's optimizer and stages (see parse_arguments).
_REFUSED = ("--optimizer", "--lr_scheduler")


def config_files(args: list[str]) -> list[str]:
    """The values of ``--config`` / ``-c`` options in ``args`` (both spellings, ``=`` or not)."""
    found = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
    return found


def check_config_file(value: str) -> None:
    """A ``--config`` value that names a file must be a regular UTF-8 file of valid YAML mapping;
    inline YAML (``--config '{...}'``) is left to the parser."""
    from mmgen.files import read_text

    looks_inline = value.lstrip().startswith(("{", "[")) or "\n" in value
    if looks_inline or (not Path(value).exists() and ":" in value):
        return
    text = read_text(value, "config file", error=ConfigError, allow_empty=True)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{value}{where}: not valid YAML: {getattr(error, 'problem', None) or error}") from error
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{value}: a config file must hold a mapping of settings, found {type(data).__name__}")


def _flatten(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list) and any(isinstance(v, (dict, list, tuple)) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}{i}."))
        return out or {prefix.rstrip("."): []}
    return {prefix.rstrip("."): value}


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def compare_model_configs(stored: dict, given: dict) -> list[tuple[str, object, object]]:
    """(dotted key, checkpoint's value, config's value) of every difference between two
    ``{class_path, init_args}`` configs."""
    a, b = _flatten(stored), _flatten(given)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va is missing and vb is None or vb is missing and va is None:
            continue  # a default of None spelled out on one side only
        if not _same(va, vb):
            diffs.append((key, "(absent)" if va is missing else va, "(absent)" if vb is missing else vb))
    return diffs


def _resumable(key: str) -> bool:
    key = key.removeprefix("init_args.")
    if key.rsplit(".", 1)[-1] == "dtype":  # a component's storage dtype: the trained tensors do not change
        return True
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)


def _plain_dict(value):
    """A jsonargparse Namespace (a parsed config section) as nested dicts."""
    return value.as_dict() if hasattr(value, "as_dict") else value


class MMGenCLI(LightningCLI):
    """LightningCLI with mmgen's file, checkpoint and resume checks (module docstring)."""

    def parse_arguments(self, parser, args) -> None:
        given = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        options = [str(a).split("=", 1)[0] for a in given]  # "--optimizer.lr=0.1" -> "--optimizer.lr"
        refused = sorted({o for o in options if o.split(".", 1)[0] in _REFUSED})
        if refused:
            raise ConfigError(
                f"{', '.join(refused)}: not supported by mmgen; each method builds its own AdamW parameter groups "
                "and learning-rate schedule (and MiniGPT-5's stages rebuild them): set model.init_args.optim.* "
                "instead (e.g. --model.init_args.optim.lr=1e-4, schedule constant|step|linear)"
            )
        for value in config_files([str(a) for a in given]):
            check_config_file(value)
        with warnings.catch_warnings():
            # mmgen's main() always passes the arguments explicitly (its tools build the CLI with
            # their own); Lightning's warning about sys.argv being set too says nothing useful then.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """Every missing data file, local model file and offline hub model, in one error
        (:mod:`mmgen.preflight`), before minutes of building backbones."""
        from mmgen.preflight import check_sources

        subcommand = self.config.get("subcommand")
        if not subcommand:
            return  # run=False (mmgen params): random weights on the meta device, no data read
        section = self.config[subcommand]
        model, data = (_plain_dict(section.get(key)) for key in ("model", "data"))
        configs = ", ".join(map(str, section.get("config") or [])) or "arguments"
        check_sources(model, data, source=f"mmgen {subcommand} ({configs})", restoring=bool(section.get("ckpt_path")))

    def _run_subcommand(self, subcommand: str) -> None:
        # A run restoring a checkpoint gets every trained tensor from it: the model's init_from
        # is not read (the previous stage's file may be gone by the time a run resumes).
        if self.config[subcommand].get("ckpt_path") and hasattr(self.model, "restores_checkpoint"):
            self.model.restores_checkpoint = True
        super()._run_subcommand(subcommand)

    def _parse_ckpt_path(self) -> None:
        from mmgen.checkpoints import check_stored_config, load_checkpoint, resume_path

        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in _SPECIAL_CKPT or "://" in str(ckpt_path):
            return super()._parse_ckpt_path()
        if subcommand == "fit":
            ckpt_path = resume_path(ckpt_path)  # a damaged last.ckpt: the newest readable one, warned
            self.config[subcommand]["ckpt_path"] = ckpt_path
        checkpoint = load_checkpoint(ckpt_path)
        check_stored_config(checkpoint, ckpt_path)  # Lightning would import what it names
        needed = ["pytorch-lightning_version"] + (["optimizer_states", "loops"] if subcommand == "fit" else [])
        missing = [key for key in needed if key not in checkpoint]
        if missing:
            raise ConfigError(
                f"{ckpt_path}: not a Lightning training checkpoint (no {', '.join(map(repr, missing))}): "
                + ("a run cannot be resumed from it; start a new one from its weights with "
                   "model.init_args.init_from" if subcommand == "fit" else "give a checkpoint written by mmgen fit")
            )
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if "_class_path" not in hparams:
            return  # not written from a config: the model is the run's own
        stored = {"class_path": hparams.pop("_class_path"), "init_args": hparams}
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        given = (dumped.get(subcommand) or {}).get("model")
        if not isinstance(given, dict) or "class_path" not in given:
            return super()._parse_ckpt_path()  # no model in the config: the checkpoint's
        diffs = compare_model_configs(stored, given)
        refused = [d for d in diffs if not _resumable(d[0])]
        if refused:
            listed = "; ".join(f"{k}: checkpoint {a!r:.60}, config {b!r:.60}" for k, a, b in refused[:12])
            more = f" (and {len(refused) - 12} more)" if len(refused) > 12 else ""
            raise ConfigError(
                f"{ckpt_path}: the model config differs from the one this checkpoint was trained with, so it "
                f"cannot be resumed or evaluated with it: {listed}{more}. Use the checkpoint's model config "
                f"(only {', '.join(RESUMABLE_CHANGES)} and components' dtype may change), or start a new run from its weights "
                "(model.init_args.init_from)"
            )
        if diffs:
            rank_zero_warn(f"{subcommand} with {ckpt_path}: applying the changed "
                           + ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in diffs))
        # The run's model config is the checkpoint's up to the changes allowed: keep it as given.

    def instantiate_trainer(self, **kwargs):
        from mmgen.checkpoints import install_atomic_io
        from mmgen.quiet import quiet_training_run

        quiet_training_run()  # Lightning's notices about what mmgen does on purpose (mmgen.quiet)

        trainer = super().instantiate_trainer(**kwargs)
        install_atomic_io(trainer)
        return trainer
