"""Reading checkpoint and weight files safely, and writing checkpoints so a kill cannot ruin them.

Every place mmgen reads a ``.ckpt`` / ``.pth`` / ``.bin`` / ``.safetensors`` file goes through
:func:`load_torch_file` or :func:`read_tensors` (``fit --ckpt_path``, ``validate``,
``load_from_checkpoint``, ``init_from``, ``mmgen export``,
pretrained folders, converted releases). They:

- refuse what is not a regular file (a folder, a named pipe that would block the read forever, a
  device) and empty files, before opening anything;
- unpickle with ``torch.load(weights_only=True)`` only: tensors and plain containers, never code;
- turn every failure (truncated zip, foreign pickle, text file, unsafe pickle) into a
  :class:`~mmgen.errors.ConfigError` that names the file and says what it is not;
- check the structure the caller needs (a ``state_dict`` of tensors) and that floating tensors
  are finite, naming the first bad key.

:class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the destination folder,
fsyncs it and renames it over the old one (``os.replace`` is atomic on one filesystem): a kill at
any moment leaves either the previous complete file or the new complete file. :func:`resume_path`
falls back from a damaged ``last.ckpt`` to the newest readable checkpoint next to it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from mmgen.errors import ConfigError

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".tar")


def require_regular_file(path: str | Path, what: str = "file", error=ConfigError) -> Path:
    """See :func:`mmgen.files.require_regular_file`; checkpoint faults are ConfigErrors."""
    from mmgen.files import require_regular_file as check

    return check(path, what, error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def load_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with every failure as a ConfigError
    naming the file (see the module docstring)."""
    path = require_regular_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip/pickle/EOF/unicode errors from a damaged or foreign file
        message = str(error).lower()
        if "weights only load failed" in message or "weights_only" in message:
            raise ConfigError(
                f"{path}: refused: besides tensors this {what} pickles Python objects, and mmgen reads "
                "checkpoints weights-only (unpickling objects can run code). If you trust the file, keep "
                "only its tensors: torch.save({'state_dict': torch.load(path, weights_only=False)"
                "['state_dict']}, new_path)"
            ) from error
        raise ConfigError(
            f"{path}: not a readable {what} (truncated, damaged or not a PyTorch file): {_first_line(error)}"
        ) from error


def check_tensors(state: Any, source: str, finite: bool = True) -> dict[str, torch.Tensor]:
    """``state`` if it is a non-empty {str: tensor} dict whose floating tensors are finite."""
    if not isinstance(state, dict):
        raise ConfigError(f"{source}: expected a dict of tensors, found {type(state).__name__}")
    if not state:
        raise ConfigError(f"{source}: holds no tensors")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if finite and value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            bad = "NaN" if bool(torch.isnan(value).any()) else "infinite"
            raise ConfigError(f"{source}: tensor {key!r} holds {bad} values")
    return state


def load_checkpoint(path: str | Path, what: str = "checkpoint", need_config: bool = False) -> dict:
    """A Lightning checkpoint of an mmgen run, read safely: a dict with a ``state_dict`` of
    finite tensors (and, with ``need_config``, the model config in ``hyper_parameters``)."""
    data = load_torch_file(path, what)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a {type(data).__name__}, not a Lightning {what} (a dict)")
    if "state_dict" not in data:
        keys = sorted(map(str, data))[:8]
        raise ConfigError(f"{path}: not a Lightning {what}: no 'state_dict' key (keys: {keys})")
    check_tensors(data["state_dict"], f"{path}, state_dict")
    if need_config:
        hparams = data.get("hyper_parameters")
        if not isinstance(hparams, dict) or "_class_path" not in hparams:
            raise ConfigError(f"{path}: stores no model config ('hyper_parameters' with '_class_path'): "
                              "not written by mmgen fit from a config")
    return data


def check_stored_config(checkpoint: dict, path, expected_class=None) -> None:
    """The model config stored in a checkpoint (``hyper_parameters``) may name registered mmgen
    components only, and Lightning's own instantiator: loading would import what it names.
    With ``expected_class``, the stored method must be that class or a subclass of it."""
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "_class_path" not in hparams:
        return
    instantiator = hparams.get("_instantiator")
    if instantiator not in (None, "lightning.pytorch.cli.instantiate_module"):
        raise ConfigError(f"{path}: hyper_parameters name the instantiator {instantiator!r}; refusing to import it")
    from mmgen.pretrained import check_class_paths

    config = {k: v for k, v in hparams.items() if k not in ("_class_path", "_instantiator")}
    check_class_paths({"class_path": hparams["_class_path"], "init_args": config}, f"{path} (stored model config)")
    if expected_class is not None:
        from mmgen.registry import REGISTRY

        stored = str(hparams["_class_path"]).rsplit(".", 1)[-1]
        cls = REGISTRY.get("method", {}).get(stored)
        if cls is not None and not issubclass(cls, expected_class):
            raise ConfigError(f"{path}: holds a {stored} checkpoint, not a {expected_class.__name__} one")


def read_tensors(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or the ``state_dict`` (or top level) of a torch
    file, on the CPU, checked finite."""
    path = require_regular_file(path, what)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as error:  # SafetensorError, OSError: header or data cut short
            raise ConfigError(f"{path}: not a readable safetensors file (truncated or damaged?): "
                              f"{_first_line(error)}") from error
        return check_tensors(state, str(path))
    data = load_torch_file(path, what)
    state = data.get("state_dict", data) if isinstance(data, dict) else data
    return check_tensors(state, str(path))


# -- writing ------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported (some filesystems, Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in ``path``'s folder, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


try:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
except ImportError:  # pragma: no cover  (lightning is a dependency)
    TorchCheckpointIO = object


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically on the destination filesystem and reads
    weights-only with clear errors. mmgen's CLI installs it on every trainer whose strategy uses
    Lightning's plain torch IO; remote paths (``s3://...``) keep Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path)  # on the CPU: Lightning moves the restored states itself


def install_atomic_io(trainer) -> None:
    """Swap the trainer's plain torch checkpoint IO for :class:`AtomicCheckpointIO`."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# -- resuming -----------------------------------------------------------------------------------
def resume_path(path: str | Path) -> str:
    """``path`` if it is a readable checkpoint; else the newest readable checkpoint in its
    folder, with a warning naming both; else the ConfigError of ``path``. Lightning's special
    values (``last``, ``best``, ``hpc``) and remote paths are returned as they are."""
    if str(path) in ("last", "best", "hpc", "registry") or "://" in str(path):
        return str(path)
    if not Path(path).exists():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        load_checkpoint(path)
        return str(path)
    except ConfigError as error:
        folder = Path(path).parent
        candidates = sorted(
            (p for p in folder.glob("*") if p.suffix in CHECKPOINT_SUFFIXES and p != Path(path)
             and p.is_file() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime, reverse=True,
        ) if folder.is_dir() and Path(path).suffix == ".ckpt" else []
        for candidate in candidates:
            try:
                load_checkpoint(candidate)
            except ConfigError:
                continue
            warnings.warn(f"cannot resume from {path} ({error}); resuming from {candidate}, the newest "
                          "readable checkpoint in that folder", stacklevel=2)
            return str(candidate)
        raise
