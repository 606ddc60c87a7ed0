"""Pretrained folders: any mmgen model as a config, its trained tensors and a model card.

    model.save_pretrained("out/fromage")       # or mmgen.pretrained.save_pretrained(model, dir)
    model = MultimodalLM.from_pretrained("out/fromage")   # a local folder ...
    model = MultimodalLM.from_pretrained("org/fromage-tiny")   # ... or a hub id (huggingface_hub)
    model.push_to_hub("org/fromage-tiny")      # or mmgen.pretrained.push_to_hub(folder, repo_id)

A folder holds::

    config.yaml          the model's config: {class_path, init_args}, as LightningCLI parsed it,
                         without the training run's own files (``init_from``: its tensors are
                         in model.safetensors), so a copy loads anywhere
    model.safetensors    the trained tensors only, keyed as in mmgen's checkpoints' state_dict
    adapter/<component>/ the LLM's peft adapter (LoRA, token rows) in peft's own format, with
                         ``base_model_name_or_path`` naming the LLM, for use outside mmgen
    tokenizer/<component>/ the LLM's tokenizer with the method's added tokens ([RET], [IMG0], ...)
    README.md            a model card (hub metadata: library mmgen, the method as a tag)

Loading reads config.yaml and model.safetensors; the adapter and tokenizer are there for use with
stock peft and transformers.

Why not huggingface_hub's ``ModelHubMixin``: it writes a model's ``__init__`` arguments as a flat
JSON config and rebuilds it with them, while an mmgen model is a nested ``class_path``/``init_args``
component config that must be checked against the registry before anything is imported, and the
folder stores only the trained tensors, checked key by key on load. Both of the mixin's own hooks
(``_save_pretrained``, ``_from_pretrained``) would be overridden; what remains, download and
upload, is used here directly (``snapshot_download``, ``HfApi.upload_folder``).

Frozen backbones are not copied: the config names them by hub id or local path, and loading
builds them from there (offline where they are cached or local). Weights are checked on load:
the exact key set, each shape and dtype, with errors naming the key; a damaged file is refused
before anything is copied into the model. ``mmgen convert`` writes the same folders from the
official FROMAGe, GILL and MiniGPT-5 releases, and ``mmgen export`` from a Lightning checkpoint;
a method's ``init_from`` starts a ``mmgen fit`` from one. docs/weights.md has the details.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import yaml

from mmgen.errors import ConfigError

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
#: Init arguments that name files of the training run. A folder holds their tensors, so its
#: config drops them (a copy elsewhere would otherwise look for the run's checkpoints).
RUN_FILES = ("init_from",)


# -- what a folder stores ----------------------------------------------------------------------
def model_config(model) -> dict:
    """The ``{class_path, init_args}`` config that builds ``model`` (a MultimodalLM).

    Models built by LightningCLI (``mmgen fit``), :func:`build_model`, :func:`load_pretrained` or
    ``load_from_checkpoint`` record it in their hyper-parameters. A model built in Python from
    component objects has no config to record: build it from a config instead.
    """
    hparams = dict(model.hparams)
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    objects = sorted(k for k, v in hparams.items() if isinstance(v, torch.nn.Module))
    if objects:
        raise ConfigError(
            f"{type(model).__name__} was built in Python from component objects ({', '.join(objects)}), "
            "so it has no config to save; build it from a config instead (mmgen fit, "
            "mmgen.pretrained.build_model({'class_path': ..., 'init_args': ...}) or from a YAML file)"
        )
    if class_path is None:
        class_path = f"{type(model).__module__}.{type(model).__qualname__}"
    return {"class_path": class_path, "init_args": hparams}


def weight_names(model) -> list[str]:
    """Names of the tensors a pretrained folder stores: the method's grouped parameters
    (``parameter_groups()``), trained in this run or not (MiniGPT-5's stage 2 freezes its stage-1
    ``fc``, GILL's decision stage everything but the decision module: both are still part of the
    trained model)."""
    if not hasattr(model, "trainable_state_keys"):
        return sorted(name for name, p in model.named_parameters() if p.requires_grad)
    return sorted(model.trainable_state_keys())


def portable_config(config: dict) -> dict:
    """``config`` without the training run's files (:data:`RUN_FILES`, set to None at any depth)."""
    if isinstance(config, dict):
        return {k: (None if k in RUN_FILES else portable_config(v)) for k, v in config.items()}
    if isinstance(config, list):
        return [portable_config(v) for v in config]
    return config


def trained_state(model) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name].detach().cpu().contiguous() for name in weight_names(model)}


# -- saving -------------------------------------------------------------------------------------
def save_pretrained(model, directory: str | Path, config: dict | None = None, card_notes: str = "") -> Path:
    """Write ``model`` (configured) as a pretrained folder; returns the folder.

    ``config``: the model's config when it cannot be read from the model (converters pass the
    config they built it from). ``card_notes``: extra lines for the model card (provenance).
    """
    from safetensors.torch import save_file

    config = portable_config(config or model_config(model))
    state = trained_state(model)
    if not state:
        raise ConfigError(f"{type(model).__name__} has no trained tensors: call configure_model() before saving")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: exists and is not a folder; give a folder to write the model to")
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / CONFIG_FILE, "w") as f:
        yaml.safe_dump(_plain(config), f, sort_keys=False)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt", "class_path": config["class_path"]})
    adapters = _save_adapters(model, directory / ADAPTER_DIR)
    _save_tokenizers(model, directory / TOKENIZER_DIR)
    random_parts = _random_backbones(config)
    if random_parts:
        warnings.warn(
            f"{', '.join(random_parts)} have no name_or_path (random frozen weights, not pretrained): a reload "
            "rebuilds the same ones from the config's seed", stacklevel=2,
        )
    (directory / CARD_FILE).write_text(_model_card(config, state, adapters, random_parts, card_notes))
    return directory


def _plain(value):
    """Config values as YAML-safe builtins (tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"config value {value!r} ({type(value).__name__}) cannot be written to {CONFIG_FILE}")


def _save_adapters(model, directory: Path) -> list[str]:
    """Each component's peft model saved with peft (adapter config + weights): for use outside
    mmgen (``PeftModel.from_pretrained(base, dir)``)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency of CausalLM; without it there is no adapter
        return []
    import json

    saved = []
    for name, child in _llms(model):
        inner = getattr(child, "model", None)
        if isinstance(inner, PeftModel):
            # the new token rows are saved; the frozen (resized) embedding matrix is not copied
            inner.save_pretrained(str(directory / name), save_embedding_layers=False)
            # peft records the base model's config.name_or_path: empty for a random build, the
            # absolute path of a local folder; the component's own source is what a user loads
            config_path = directory / name / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text())
            adapter_config["base_model_name_or_path"] = getattr(child, "name_or_path", None) or adapter_config.get(
                "base_model_name_or_path") or None
            config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
            saved.append(name)
    return saved


def _llms(model) -> list[tuple[str, object]]:
    """(dotted name, component) of every LLM backbone in a model (a nested method's too)."""
    from mmgen.components.base import LLMBackbone

    return [(name, module) for name, module in model.named_modules() if name and isinstance(module, LLMBackbone)]


def _save_tokenizers(model, directory: Path) -> list[str]:
    """Each LLM's tokenizer with the method's added tokens, in transformers' format."""
    saved = []
    for name, llm in _llms(model):
        if getattr(llm, "tokenizer", None) is not None:
            llm.tokenizer.save_pretrained(str(directory / name))
            saved.append(name)
    return saved


def _components(config: dict, prefix: str = "") -> list[tuple[str, str, dict]]:
    """(dotted name, class_path, init_args) of every component in a config."""
    found = []
    for key, value in (config.get("init_args") or {}).items():
        if isinstance(value, dict) and "class_path" in value:
            name = f"{prefix}{key}"
            found.append((name, value["class_path"], value.get("init_args") or {}))
            found.extend(_components(value, prefix=f"{name}."))
    return found


def _random_backbones(config: dict) -> list[str]:
    return [
        name for name, _, args in _components(config)
        if ("name_or_path" in args or "config" in args)
        and (args.get("name_or_path") is None or args.get("random_weights"))
    ]


def _model_card(config, state, adapters, random_parts, notes) -> str:
    method = config["class_path"].rsplit(".", 1)[-1]
    n_params = sum(t.numel() for t in state.values())
    lines = [
        "---", "library_name: mmgen", f"tags: [mmgen, {method.lower()}]", "---", "",
        f"# {method} (mmgen)", "",
        f"A `{config['class_path']}` model saved by mmgen. Frozen backbones are not in this folder: "
        "they load from the sources below.", "",
        "| component | class | weights from |", "|---|---|---|",
    ]
    for name, class_path, args in _components(config):
        source = args.get("name_or_path")
        if "name_or_path" not in args:
            source = "this folder (trained)" if any(k.startswith(f"{name}.") for k in state) else "built from config"
        elif source is None or args.get("random_weights"):
            source = f"random (config, seed {args.get('seed', 0)})"
        lines.append(f"| {name} | `{class_path}` | {source} |")
    lines += [
        "", f"Trained tensors in `{WEIGHTS_FILE}`: {len(state)} ({n_params:,} parameters).",
    ]
    if adapters:
        lines.append(f"peft adapters (for use outside mmgen): {', '.join(f'`{ADAPTER_DIR}/{a}`' for a in adapters)}.")
    if random_parts:
        lines.append(f"Warning: {', '.join(random_parts)} use random frozen weights (not pretrained); a reload "
                     "rebuilds the same ones from each component's seed.")
    if notes:
        lines += ["", notes.strip()]
    lines += [
        "", "## Loading", "", "```python",
        "from mmgen.methods.base import MultimodalLM",
        "model = MultimodalLM.from_pretrained('path/to/this/folder')  # or its hub id, org/name",
        "```", "",
        f"`{TOKENIZER_DIR}/` holds the LLM's tokenizer with the method's added tokens; `{ADAPTER_DIR}/` "
        "its peft adapter (`peft.PeftModel.from_pretrained(base_model, folder)`).", "",
        "Continue training: `mmgen fit --model path/to/this/folder/config.yaml --data ... "
        "--model.init_args.init_from=path/to/this/folder`.", "",
    ]
    return "\n".join(lines)


# -- loading ------------------------------------------------------------------------------------
def check_class_paths(config: dict, source: str = "model config", allow_modules: tuple[str, ...] = ()) -> None:
    """Refuse any ``class_path`` in ``config`` that is not a registered mmgen component (full
    path or short name), nor in a module of ``allow_modules`` (module names or prefixes the user
    trusts), BEFORE anything is imported: importing a module named by a downloaded config would
    run its import-time code."""
    import mmgen.components  # noqa: F401  (mmgen's own components register themselves)
    import mmgen.methods  # noqa: F401
    from mmgen.registry import REGISTRY

    known = {f"{c.__module__}.{c.__qualname__}" for kind in REGISTRY.values() for c in kind.values()}
    known |= {name for kind in REGISTRY.values() for name in kind}

    def visit(value, key: str) -> None:
        if isinstance(value, dict):
            if "class_path" in value:
                path = value["class_path"]
                if not isinstance(path, str):
                    raise ConfigError(f"{source}: {key or '(top)'}class_path must be a string, got {path!r:.80}")
                allowed = any(path == m or path.startswith(m + ".") for m in allow_modules)
                if path not in known and not allowed:
                    raise ConfigError(
                        f"{source}: {key or '(top)'}class_path {path!r} is not a registered mmgen component; "
                        "refusing to import it (pass allow_modules=[...] naming its module if you trust it)"
                    )
            for k, v in value.items():
                visit(v, f"{key}{k}.")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                visit(v, f"{key}{i}.")

    visit(config, "")


def build_model(config: dict, source: str = "model config", allow_modules: tuple[str, ...] = ()):
    """Instantiate (not configure) the MultimodalLM of a ``{class_path, init_args}`` config, so
    that it records the config as its hyper-parameters exactly as LightningCLI does. Every
    ``class_path`` must name a registered mmgen component (or be in ``allow_modules``)."""
    import mmgen.components  # noqa: F401  (registers components so class paths resolve)
    import mmgen.methods  # noqa: F401
    from jsonargparse import ArgumentParser

    from mmgen.methods.base import MultimodalLM

    if not isinstance(config, dict) or "class_path" not in config:
        raise ConfigError(f"{source}: a model config needs 'class_path' and 'init_args', got {type(config).__name__} "
                          f"with keys {sorted(config) if isinstance(config, dict) else '-'}")
    check_class_paths(config, source, tuple(allow_modules))
    from mmgen.preflight import check_sources

    check_sources(model=config, source=source)  # every missing model file / offline hub id, named, at once
    for module in allow_modules:  # trusted by the caller: import so its components register
        import importlib

        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"{source}: allowed module {module!r} cannot be imported: {error}") from error
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(MultimodalLM, "model", fail_untyped=False, required=True)
    try:
        parsed = parser.parse_object({"model": config})
    except Exception as error:  # jsonargparse's ArgumentError/ValueError: name the config's fault
        raise ConfigError(f"{source}: invalid model config for {config.get('class_path')}: {error}") from error
    dumped = yaml.safe_load(parser.dump(parsed, skip_none=False))["model"]
    hparams = {"_class_path": dumped["class_path"], **(dumped.get("init_args") or {})}
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context
    except ImportError:  # older Lightning: the model records its component objects instead
        return parser.instantiate_classes(parsed).model
    with _given_hyperparameters_context(hparams=hparams, instantiator="lightning.pytorch.cli.instantiate_module"):
        return parser.instantiate_classes(parsed).model


def resolve_folder(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A pretrained folder from a local path or a hub id (``org/name``, downloaded or found in the
    hub cache by ``huggingface_hub.snapshot_download``). Offline without a cached copy, or a
    repository that does not exist: a ConfigError naming the id."""
    from mmgen.components.hub import looks_local

    path = Path(name_or_path).expanduser()
    if path.is_dir() or looks_local(str(name_or_path)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        from mmgen.preflight import hub_offline

        why = ("not in the local hub cache and the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline()
               else f"not found on the hub ({type(error).__name__})")
        raise ConfigError(f"{name_or_path}: no such local folder, and as a hub model it is {why}") from None
    except HFValidationError as error:
        raise ConfigError(f"{name_or_path}: not a local folder nor a valid hub id: {error}") from None


def method_class(config: dict):
    """The registered class a config's ``class_path`` names (full path or short name), without
    building anything; None where it is not registered (research code in ``allow_modules``)."""
    import mmgen.methods  # noqa: F401  (registers the methods)
    from mmgen.registry import REGISTRY

    path = config.get("class_path")
    for kind in REGISTRY.values():
        for name, cls in kind.items():
            if path in (name, f"{cls.__module__}.{cls.__qualname__}"):
                return cls
    return None


def read_config(directory: str | Path) -> dict:
    from mmgen.checkpoints import require_regular_file

    if not Path(directory).is_dir():
        raise ConfigError(f"{directory}: not a pretrained folder (no such folder)")
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{directory}: not a pretrained folder (no {CONFIG_FILE})")
    require_regular_file(path, "model config")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}): {error.reason}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(config, dict) or "class_path" not in config:
        raise ConfigError(f"{path}: expected a model config with 'class_path' and 'init_args'")
    return config


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a pretrained folder, a ``.safetensors`` file or a Lightning
    checkpoint (its ``state_dict``), on the CPU, read weights-only. A missing, empty, damaged,
    truncated or foreign file, or a non-finite tensor, raises ConfigError naming it."""
    from mmgen.checkpoints import read_tensors

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    return read_tensors(path, "weights file")


def load_weights_into(model, state: dict[str, torch.Tensor], source: str, allow_missing: bool = False) -> list[str]:
    """Copy ``state`` into ``model``'s stored tensors (:func:`weight_names`), after checking
    every key, shape and dtype first, so a mismatch leaves the model untouched. Returns the names
    left missing (only where ``allow_missing``)."""
    params = dict(model.named_parameters())
    expected = set(weight_names(model))
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    if unexpected or (missing and not allow_missing):
        raise ConfigError(
            f"{source} does not match {type(model).__name__}'s trained tensors: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for name, tensor in state.items():
        param = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ConfigError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
        if tensor.dtype != param.dtype:
            raise ConfigError(f"{source}: {name} has dtype {tensor.dtype}, the model expects {param.dtype}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return missing


def load_pretrained(name_or_path: str | Path, allow_modules: tuple[str, ...] = (), expected: type | None = None,
                    revision: str | None = None):
    """Build, configure and fill the model of a pretrained folder (a local path or a hub id);
    returned in eval mode.

    The config's ``class_path`` entries must be registered mmgen components; ``allow_modules``
    names modules (research code) you trust to be imported for it. ``expected``: the class the
    folder must hold (checked before any backbone is built). ``revision``: of a hub id."""
    directory = resolve_folder(name_or_path, revision)
    config = read_config(directory)
    found = method_class(config)
    if expected is not None and found is not None and not issubclass(found, expected):
        raise ConfigError(f"{name_or_path} holds a {found.__name__}, not a {expected.__name__}")
    state = read_weights(directory / WEIGHTS_FILE)  # read (and checked readable) before building
    model = build_model(config, str(directory / CONFIG_FILE), allow_modules)
    model.configure_model()
    load_weights_into(model, state, str(directory / WEIGHTS_FILE))
    return model.eval()


def model_from_checkpoint(ckpt_path: str | Path):
    """The model of a Lightning checkpoint of an mmgen run, rebuilt from the config it stores and
    filled with its trained tensors: (model, its config, the checkpoint, names that came from the
    config's ``init_from`` instead). The run's own files are read only when the checkpoint lacks
    tensors: the previous stage's checkpoint may no longer exist where the run found it."""
    from mmgen.checkpoints import load_checkpoint

    ckpt_path = Path(ckpt_path)
    checkpoint = load_checkpoint(ckpt_path, need_config=True)
    hparams = dict(checkpoint["hyper_parameters"])
    class_path = hparams.pop("_class_path")
    hparams.pop("_instantiator", None)
    config = {"class_path": class_path, "init_args": hparams}
    source = f"{ckpt_path} (its stored model config)"
    model = build_model(portable_config(config), source)
    model.configure_model()
    from_run_files = bool(set(weight_names(model)) - set(checkpoint["state_dict"])) and config != portable_config(config)
    if from_run_files:  # tensors the checkpoint lacks come from init_from after all
        model = build_model(config, source)
        model.configure_model()
    missing = load_weights_into(model, checkpoint["state_dict"], str(ckpt_path), allow_missing=from_run_files)
    return model, config, checkpoint, missing


def export_checkpoint(ckpt_path: str | Path, out: str | Path) -> Path:
    """A Lightning checkpoint of an mmgen run -> a pretrained folder (:func:`model_from_checkpoint`)."""
    model, config, checkpoint, missing = model_from_checkpoint(ckpt_path)
    notes = f"Exported from the Lightning checkpoint `{Path(ckpt_path).name}` (global step {checkpoint.get('global_step')})."
    if missing:
        notes += f" {len(missing)} tensors not in the checkpoint come from its init_from."
    return save_pretrained(model, out, config=config, card_notes=notes)


def push_to_hub(model_or_folder, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, revision: str | None = None) -> str:
    """Upload a model (saved to a temporary folder first) or a pretrained folder to the hub
    repository ``repo_id`` (created if missing); returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_folder, (str, Path)):
            folder = Path(model_or_folder)
            read_config(folder)  # a pretrained folder, or a clear error before any upload
            read_weights(folder)
        else:
            folder = save_pretrained(model_or_folder, Path(tmp) / "model")
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                   commit_message=commit_message or "Upload mmgen model")
    return str(getattr(commit, "commit_url", commit))
