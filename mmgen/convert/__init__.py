"""Converters from the official releases of FROMAGe, GILL and MiniGPT-5 to mmgen pretrained
folders (``mmgen.pretrained``); the key mapping tables are in docs/weights.md.

    mmgen convert fromage --release path/to/fromage_model --out out/fromage
    mmgen convert gill --release path/to/gill_model --out out/gill [--config configs/gill.yaml]
    mmgen convert minigpt5 --release path/to/minigpt5 --out out/minigpt5 [--stage stage2_vist] [--config ...]

Each converter reads the release with ``torch.load(weights_only=True, map_location="cpu")`` (a
pickle from the internet can run code; GILL's decision head was saved on a GPU), builds the mmgen
model from a config, and feeds every source tensor through a :class:`Conversion`: each is either
placed (shape checked, dtype checked to convert without loss, values copied) or reported with the
reason it is not needed. Unknown keys, wrong shapes or dtypes, trained tensors left without a
source, and unreadable files raise ConfigError naming the file and key, before any value is
copied into the model, so there is never a half-loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmgen.errors import ConfigError

#: release name -> converter module's ``convert(release, config=None) -> (model, config, Conversion)``
CONVERTERS: dict[str, str] = {
    "fromage": "mmgen.convert.fromage",
    "gill": "mmgen.convert.gill",
    "minigpt5": "mmgen.convert.minigpt5",
}


def load_release_file(path: str | Path) -> dict:
    """A release's ``.pth.tar``/``.ckpt`` as a dict, on the CPU, without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: missing from the release folder")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, a pickled object not allowed
        if "weights only load failed" in str(error).lower():
            raise ConfigError(
                f"{path}: cannot be read with torch.load(weights_only=True): besides tensors it pickles Python "
                "objects (a full training checkpoint, e.g. with its learning-rate scheduler, rather than the "
                "pruned release file?). mmgen does not unpickle objects from downloaded files, since that can run "
                "code; if you trust the file, keep only its tensors: torch.save({'state_dict': torch.load(path, "
                f"weights_only=False)['state_dict']}}, new_path). Refused: {error}"
            ) from error
        raise ConfigError(f"{path}: cannot be read (truncated or damaged file?): {type(error).__name__}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a dict with a 'state_dict', found {type(data).__name__}")
    return data


def release_state(path: str | Path) -> dict[str, torch.Tensor]:
    data = load_release_file(path)
    state = data.get("state_dict")
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: has no 'state_dict' (keys: {sorted(data)[:8]})")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{path}: state_dict entries that are not tensors: {bad[:8]}")
    return state


def token_row_params(model, llm_attr: str = "llm") -> dict[str, str]:
    """{"input": name, "output": name} of the parameters holding the LLM's new token rows (rows
    in the order the tokens were added); "output" only where the LM head is not tied."""
    llm = getattr(model, llm_attr)
    names = {id(m): n for n, m in model.named_modules()}
    input_modules = {id(m) for m in llm.model.get_input_embeddings().modules()}
    found = {}
    for layer in llm._token_layers():
        (adapter,) = layer.trainable_tokens_delta.keys()
        found["input" if id(layer) in input_modules else "output"] = f"{names[id(layer)]}.trainable_tokens_delta.{adapter}"
    if "input" not in found:
        raise ConfigError(f"{type(model).__name__}.{llm_attr} has no trainable token rows")
    return found


@dataclass
class Conversion:
    """Source tensors -> a model's trained tensors, checked in full before anything is copied.

    ``place(key, tensor, target)`` plans a copy (checking shape and a lossless dtype);
    ``report(key, reason)`` records a tensor that is deliberately not used; ``apply(sources)``
    checks that every source key was handled and every trained tensor of the model has a value,
    then copies them all.
    """

    model: torch.nn.Module
    name: str  # the release, for messages
    placed: list[tuple[str, str]] = field(default_factory=list)  # (source key, target name)
    reported: list[tuple[str, str]] = field(default_factory=list)  # (source key, why not used)
    _values: dict[str, torch.Tensor] = field(default_factory=dict)
    _rows: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        from mmgen.pretrained import weight_names

        params = dict(self.model.named_parameters())
        self.targets = {n: params[n] for n in weight_names(self.model)}

    def _check(self, key: str, tensor: torch.Tensor, target: str, shape: tuple) -> None:
        if target not in self.targets:
            raise ConfigError(f"{self.name}: {key} maps to {target}, which {type(self.model).__name__} does not train")
        if tuple(tensor.shape) != tuple(shape):
            raise ConfigError(f"{self.name}: {key} has shape {tuple(tensor.shape)}, {target} needs {tuple(shape)}")
        dtype = self.targets[target].dtype
        if not tensor.is_floating_point() or torch.finfo(tensor.dtype).bits > torch.finfo(dtype).bits:
            raise ConfigError(f"{self.name}: {key} has dtype {tensor.dtype}, which does not convert "
                              f"without loss to {target}'s {dtype}")

    def place(self, key: str, tensor: torch.Tensor, target: str) -> None:
        self._check(key, tensor, target, self.targets[target].shape)
        if target in self._values or target in self._rows:
            raise ConfigError(f"{self.name}: {key} would overwrite {target}, already given")
        self._values[target] = tensor
        self.placed.append((key, target))

    def place_rows(self, key: str, tensor: torch.Tensor, target: str, rows: list[int]) -> None:
        """Rows ``rows`` of a (n, d) target from ``tensor`` (len(rows), d)."""
        full = self.targets.get(target)
        if full is None:
            raise ConfigError(f"{self.name}: {key} maps to {target}, which {type(self.model).__name__} does not train")
        self._check(key, tensor, target, (len(rows), full.shape[1]))
        given = self._rows.setdefault(target, {})
        for i, row in zip(rows, tensor):
            if i in given:
                raise ConfigError(f"{self.name}: {key} would overwrite row {i} of {target}, already given")
            given[i] = row
        self.placed.append((key, f"{target}[{rows[0]}:{rows[-1] + 1}]" if rows == list(range(rows[0], rows[-1] + 1)) else f"{target}{rows}"))

    def report(self, key: str, reason: str) -> None:
        self.reported.append((key, reason))

    def apply(self, sources: dict[str, list[str]], allow_fresh: tuple[str, ...] = ()) -> None:
        """``sources``: file name -> its keys; ``allow_fresh``: prefixes of target names that may
        keep the model's own initialisation (reported as such)."""
        handled = {k for k, _ in self.placed} | {k for k, _ in self.reported}
        unknown = [f"{file}: {k}" for file, keys in sources.items() for k in keys if k not in handled]
        if unknown:
            raise ConfigError(f"{self.name}: keys with no place in the mmgen model (nothing was loaded): {unknown[:10]}")
        for target, rows in self._rows.items():
            n = self.targets[target].shape[0]
            if sorted(rows) != list(range(n)):
                raise ConfigError(f"{self.name}: {target} needs rows 0..{n - 1}, the release gives {sorted(rows)}")
            self._values[target] = torch.stack([rows[i] for i in range(n)])
        unfilled = sorted(set(self.targets) - set(self._values))
        fresh = [t for t in unfilled if t.startswith(tuple(allow_fresh))] if allow_fresh else []
        missing = sorted(set(unfilled) - set(fresh))
        if missing:
            raise ConfigError(f"{self.name}: the release has no value for {missing[:10]} (nothing was loaded)")
        with torch.no_grad():
            for target, tensor in self._values.items():
                self.targets[target].copy_(tensor)
        self.fresh = fresh

    def summary(self) -> str:
        lines = [f"{self.name}: {len(self.placed)} tensors placed, {len(self.reported)} not used"]
        lines += [f"  {k} -> {t}" for k, t in self.placed]
        lines += [f"  {k}: not used ({why})" for k, why in self.reported]
        lines += [f"  {t}: kept at its initialisation (not in this release)" for t in getattr(self, "fresh", [])]
        return "\n".join(lines)


def model_section(config_path: str | Path) -> dict:
    """The ``model`` section of a training config (or a model config / pretrained folder's)."""
    import yaml

    path = Path(config_path)
    if path.is_dir():
        path = path / "config.yaml"
    data = yaml.safe_load(path.read_text())
    config = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(config, dict) or "class_path" not in config:
        raise ConfigError(f"{config_path}: no model config (class_path, init_args) in it")
    return config


def convert(release: str, path: str | Path, out: str | Path | None = None, config: dict | None = None, **options):
    """Convert a release folder into an mmgen model; with ``out``, also write it as a pretrained
    folder. Returns (model, Conversion)."""
    import importlib
    import inspect

    from mmgen.pretrained import save_pretrained

    if release not in CONVERTERS:
        raise ConfigError(f"no converter for {release!r}; releases are {sorted(CONVERTERS)}")
    module = importlib.import_module(CONVERTERS[release])
    accepted = set(inspect.signature(module.convert).parameters)
    extra = sorted(k for k, v in options.items() if v is not None and k not in accepted)
    if extra:
        raise ConfigError(f"{release}: the converter takes no {', '.join(extra)} option")
    model, config, conversion = module.convert(path, config=config, **options)
    if out is not None:
        notes = f"Converted by `mmgen convert {release}` from the official release in `{path}`.\n\n" + "```\n" + conversion.summary() + "\n```"
        save_pretrained(model, out, config=config, card_notes=notes)
        if release == "gill":
            module.save_decision(conversion, out)
    return model, conversion
