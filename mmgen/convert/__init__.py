"""Converters from the official releases of FROMAGe, GILL and MiniGPT-5 to mmgen pretrained
folders (``mmgen.pretrained``); the key mapping tables and options are in docs/weights.md.

    mmgen convert fromage --release path/to/fromage_model --out out/fromage
    mmgen convert gill --release path/to/gill_model --out out/gill [--config configs/gill.yaml]
    mmgen convert minigpt5 --release path/to/minigpt5 --out out/minigpt5 [--stage stage2_vist] [--config ...]

``--release`` is the release folder (files found by their official names) or one checkpoint
file; each converter has options naming each of its files. Without ``--config`` the model is
built from the official architecture with the backbones named by options (``--llm``,
``--visual_encoder``, ``--generator``; the official hub ids by default) and frozen weights in
``--dtype`` (float32 unless asked).

Each converter reads the release with ``torch.load(weights_only=True, map_location="cpu")`` (a
pickle from the internet can run code; GILL's decision head was saved on a GPU), builds the mmgen
model from a config, and feeds every source tensor through a :class:`Conversion`: each is either
placed (shape checked, dtype checked to convert without loss, values copied) or reported with the
reason it is not needed. Unknown keys, wrong shapes or dtypes, trained tensors left without a
source, and unreadable files raise ConfigError naming the file and key, before any value is
copied into the model, so there is never a half-loaded model. New token rows are found by token
(``llm.token_id("[RET]")``), never by position.
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
    from mmgen.checkpoints import require_regular_file

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: missing from the release folder")
    require_regular_file(path, "release file")
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
    from mmgen.checkpoints import check_tensors

    check_tensors(state, f"{path}, state_dict")  # NaN / inf weights are refused, named by key
    return state


def strip_module_prefix(state: dict[str, torch.Tensor], reported: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Keys without DataParallel's ``module.`` (the official training checkpoints, and prune
    scripts that keep both spellings); a duplicate spelling is added to ``reported``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix("module.")
        if name in out:
            reported.append((key, f"the same tensor as {name}" if torch.equal(out[name], tensor)
                             else f"a second spelling of {name}; the first one is used"))
            continue
        out[name] = tensor
    return out


def find_file(folder: Path, names: tuple[str, ...], what: str, option: str) -> Path:
    """The first of ``names`` present in ``folder`` (the official names, preferred first)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"{folder}: no {what} ({' or '.join(names)}); give the file as {option}")


def token_rows(model, tokens: list[str], llm_attr: str = "llm") -> list[int]:
    """Row of each token in the LLM's trainable token rows, found by the token's id (the rows
    follow peft's ``token_indices``; frozen added tokens such as ``<|image|>`` have none)."""
    llm = getattr(model, llm_attr)
    layer = llm._token_layers()[0]
    (indices,) = layer.token_indices.values()
    indices = list(indices)
    rows = []
    for token in tokens:
        token_id = llm.token_id(token)
        if token_id not in indices:
            raise ConfigError(f"{token} (id {token_id}) is not one of the LLM's trainable token rows {indices}")
        rows.append(indices.index(token_id))
    return rows


#: dtypes a converted model's frozen backbones can be built in
DTYPES = ("float32", "bfloat16", "float16")


def set_backbones(config: dict, **names: str | None) -> dict:
    """``config`` with each named component's ``name_or_path`` replaced (``llm="..."``) where a
    name is given; ``dtype=...`` sets every backbone's frozen-weight dtype."""
    import copy

    config = copy.deepcopy(config)
    args = config.setdefault("init_args", {})
    dtype = names.pop("dtype", None)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    for component, name in names.items():
        if name is not None:
            if not isinstance(args.get(component), dict):
                raise ConfigError(f"the model config has no {component} to set to {name!r}")
            args[component].setdefault("init_args", {})["name_or_path"] = name
    if dtype is not None:
        for component in ("llm", "visual_encoder", "image_generator", "generator"):
            if isinstance(args.get(component), dict):
                args[component].setdefault("init_args", {})["dtype"] = dtype
    return config


def backbone_note(config: dict) -> str:
    """``llm=facebook/opt-6.7b (float32), ...`` for the components of ``config`` that load weights."""
    parts = []
    for component, value in config.get("init_args", {}).items():
        args = value.get("init_args", {}) if isinstance(value, dict) else {}
        if args.get("name_or_path"):
            parts.append(f"{component}={args['name_or_path']} ({args.get('dtype', 'float32')})")
    return ", ".join(parts)


def token_row_params(model, llm_attr: str = "llm") -> dict[str, str]:
    """{"input": name, "output": name} of the parameters holding the LLM's trainable token rows
    (row order: :func:`token_rows`); "output" only where the LM head is not tied."""
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
    notes: list[str] = field(default_factory=list)  # how the model was built, printed first
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
        lines = list(self.notes) + [f"{self.name}: {len(self.placed)} tensors placed, {len(self.reported)} not used"]
        lines += [f"  {k} -> {t}" for k, t in self.placed]
        lines += [f"  {k}: not used ({why})" for k, why in self.reported]
        lines += [f"  {t}: kept at its initialisation (not in this release)" for t in getattr(self, "fresh", [])]
        return "\n".join(lines)


def model_section(config_path: str | Path) -> dict:
    """The ``model`` section of a training config (or a model config / pretrained folder's)."""
    import yaml

    from mmgen.files import read_text

    path = Path(config_path)
    if path.is_dir():
        path = path / "config.yaml"
    try:
        data = yaml.safe_load(read_text(path, "config file", error=ConfigError))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    config = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(config, dict) or "class_path" not in config:
        raise ConfigError(f"{config_path}: no model config (class_path, init_args) in it")
    return config


#: ``mmgen convert`` options beyond --release/--out/--config: (flag, help). Each is passed to the
#: converters that take it (a converter refuses options it does not take, naming them).
OPTIONS: dict[str, str] = {
    "dtype": "dtype of the frozen backbones when the model is built without --config: float32 (default), "
             "bfloat16 or float16; with --config, overrides the config's",
    "llm": "LLM hub id or folder (default: the official one: FROMAGe/GILL model_args.json's opt_version, "
           "else facebook/opt-6.7b; MiniGPT-5 Vision-CAIR/vicuna-7b, Vicuna-7B v0)",
    "visual_encoder": "visual encoder hub id or folder (default: FROMAGe/GILL model_args.json's visual_encoder, "
                      "else openai/clip-vit-large-patch14; MiniGPT-5 Salesforce/blip2-flan-t5-xxl)",
    "generator": "Stable Diffusion hub id or folder (default: GILL runwayml/stable-diffusion-v1-5; "
                 "MiniGPT-5 stabilityai/stable-diffusion-2-1-base)",
    "model_args": "FROMAGe/GILL: model_args.json (default: beside the weights file)",
    "decision": "GILL: the decision model (default: decision_model.pth.tar beside the weights, if present)",
    "stage": "MiniGPT-5 with a release folder: stage2_vist or stage2_mmdialog (default: stage 1 only)",
    "stage1": "MiniGPT-5: the stage-1 checkpoint (default: stage1_cc3m.ckpt in the release folder)",
    "stage2": "MiniGPT-5: a stage-2 checkpoint (default: from --stage)",
    "projection": "MiniGPT-5: MiniGPT-4's checkpoint with llama_proj (default: prerained_minigpt4_7b.pth or "
                  "pretrained_minigpt4_7b.pth in the release folder)",
    "lavis_vit": "MiniGPT-5: LAVIS's EVA ViT-g file (default: eva_vit_g.pth in the release folder, if present)",
    "lavis_qformer": "MiniGPT-5: LAVIS's BLIP-2 Q-Former file (default: blip2_pretrained_flant5xxl.pth in the "
                     "release folder, if present)",
}


def add_arguments(parser) -> None:
    """The ``mmgen convert`` command line (mmgen/cli.py calls this)."""
    parser.add_argument("release", choices=sorted(CONVERTERS), help="which method's release")
    parser.add_argument("--release", dest="path", required=True,
                        help="the release folder (files found by their official names) or its weights file")
    parser.add_argument("--out", required=True, help="pretrained folder to write")
    parser.add_argument("--config", help="training or model config whose model section to build (default: the "
                        "official architecture, backbones from the options below)")
    for name, help_text in OPTIONS.items():
        parser.add_argument(f"--{name}", help=help_text)


def run(options) -> tuple:
    """``mmgen convert`` with parsed ``options``: convert, write, print the summary."""
    config = model_section(options.config) if options.config else None
    extra = {name: getattr(options, name) for name in OPTIONS if getattr(options, name) is not None}
    model, conversion = convert(options.release, options.path, options.out, config=config, **extra)
    print(conversion.summary())
    print(f"-> {options.out}")
    return model, conversion


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
    if options.get("dtype") not in (None, *DTYPES):
        raise ConfigError(f"--dtype {options['dtype']!r}: choose one of {', '.join(DTYPES)}")
    given = config is not None
    model, config, conversion = module.convert(path, config=config, **options)
    if not given:  # say what was chosen for the user: backbones and their dtype
        conversion.notes.append("built without --config: " + backbone_note(config))
    if out is not None:
        notes = f"Converted by `mmgen convert {release}` from the official release in `{path}`.\n\n" + "```\n" + conversion.summary() + "\n```"
        save_pretrained(model, out, config=config, card_notes=notes)
    return model, conversion
