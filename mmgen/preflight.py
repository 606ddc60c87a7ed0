"""Check everything a config reads from outside before anything is built, and report it together.

A full-size run builds backbones for minutes before it would reach a missing data file, and the
hub client's own error for a model missing offline is a long traceback that never names the model.
:func:`check_sources` walks the model and data sections of a parsed config instead and raises one
ConfigError listing every problem:

- local files and folders the model reads (``name_or_path``/``tokenizer`` that look local,
  ``projection``, ``lavis_vit``, ``lavis_qformer``, ``init_from``);
- hub ids (``name_or_path``, ``tokenizer``) when the hub is offline (``HF_HUB_OFFLINE=1``): each
  must be in the local hub cache. Online, the hub itself answers, with the id in its message;
- the data section's input paths: init arguments named ``*_tsv``, ``*_json``, ``*_jsonl``,
  ``*_file``, ``*_path``, ``*_dir``, ``*_mapping`` (nested datasets too). Data classes that
  generate their files (the toy worlds, ``write_example: true``) are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmgen.errors import ConfigError

_MODEL_FILES = ("projection", "lavis_vit", "lavis_qformer", "init_from")
_MODEL_SOURCES = ("name_or_path", "tokenizer")
_DATA_SUFFIXES = ("_tsv", "_json", "_jsonl", "_file", "_path", "_dir", "_mapping")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cached(repo_id: str) -> bool:
    """Whether the local hub cache holds a snapshot of ``repo_id`` (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return False
    return True


def _components(value, where: str):
    """(dotted key, init_args) of every ``{class_path, init_args}`` inside ``value``."""
    if isinstance(value, dict):
        if "class_path" in value:
            yield where, value.get("class_path"), value.get("init_args") or {}
        for key, item in value.items():
            yield from _components(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _components(item, f"{where}.{i}")


def model_problems(model: dict | None, restoring: bool = False) -> list[str]:
    """Missing sources of a model config; ``restoring`` (a run given ``--ckpt_path``): its
    ``init_from`` is not read (the checkpoint holds every trained tensor), so it may be gone."""
    from mmgen.components.hub import KNOWN_CONFIGS, looks_local, random_weights_requested, resolve_name

    problems = []
    for where, _, args in _components(model or {}, "model"):
        random = random_weights_requested(bool(args.get("random_weights")))
        for key in _MODEL_SOURCES:
            name = args.get(key)
            if not isinstance(name, str) or (random and (key == "tokenizer" or name in KNOWN_CONFIGS)):
                continue
            path = resolve_name(name)
            if looks_local(path):
                if not Path(path).expanduser().is_dir():
                    problems.append(f"{where}.init_args.{key}: folder {name} not found")
            elif hub_offline() and not hub_cached(path):
                problems.append(f"{where}.init_args.{key}: hub model {name} is not in the local hub cache "
                                "and the hub is offline (HF_HUB_OFFLINE=1): download it first or give a folder")
        for key in _MODEL_FILES:
            name = args.get(key)
            if restoring and key == "init_from":
                continue
            if isinstance(name, str) and not random and not Path(resolve_name(name)).expanduser().exists():
                problems.append(f"{where}.init_args.{key}: {name} not found")
    return problems


def data_problems(data: dict | None) -> list[str]:
    problems = []
    for where, class_path, args in _components(data or {}, "data"):
        if "Toy" in str(class_path).rsplit(".", 1)[-1] or args.get("write_example"):
            continue  # generates its files on first use
        for key, value in args.items():
            if isinstance(value, str) and key.endswith(_DATA_SUFFIXES) and not Path(value).expanduser().exists():
                problems.append(f"{where}.init_args.{key}: {value} not found")
    return problems


def check_sources(model: dict | None = None, data: dict | None = None, source: str = "config",
                  restoring: bool = False) -> None:
    """ConfigError listing every missing file, folder or offline hub model of a parsed config."""
    problems = model_problems(model, restoring) + data_problems(data)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} missing input(s): " + "; ".join(problems))
