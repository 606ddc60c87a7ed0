"""The official FROMAGe release -> mmgen's FROMAGe (table in docs/weights.md).

Release folder: ``model_args.json`` and ``pretrained_ckpt.pth.tar`` = ``{'state_dict': ...}``, bf16
(or the official prune script's ``ckpt_pruned.pth.tar``; ``--release`` may also be the weights
file itself, with ``model_args.json`` beside it or given by ``--model_args``). A leading
``module.`` (DataParallel) on a key is ignored.

    model.logit_scale                  ()          -> retrieval_head.logit_scale
    model.visual_embeddings.weight     (d*k, f)    -> visual_prefix.proj.weight
    model.visual_embeddings.bias       (d*k,)      -> visual_prefix.proj.bias
    model.visual_fc.weight             (e, f)      -> retrieval_head.image_proj.weight
    model.visual_fc.bias               (e,)        -> retrieval_head.image_proj.bias
    model.text_hidden_fcs.0.0.weight   (e, d)      -> retrieval_head.text_proj.weight
    model.text_hidden_fcs.0.0.bias     (e,)        -> retrieval_head.text_proj.bias
    ret_input_embeddings.weight        (1, d)/(d,) -> the [RET] row of the LLM's new token rows
    or model.input_embeddings.weight   (V, d)      -> its row retrieval_token_idx (model_args;
                                                      else the id of [RET]); the other rows are
                                                      OPT's own and the untrained <|image|>

d: LLM width (4096), f: CLIP feature width (1024), e: shared_emb_dim (256), k: n_visual_tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmgen.convert import Conversion, find_file, release_state, set_backbones, strip_module_prefix, token_row_params, token_rows
from mmgen.errors import ConfigError

ARGS_FILE = "model_args.json"
#: the weights file's names, preferred first: the release's, then the official prune script's output
WEIGHTS_FILES = ("pretrained_ckpt.pth.tar", "ckpt_pruned.pth.tar")
RET_TOKEN = "[RET]"
#: the official backbones, where model_args.json does not name them
DEFAULT_LLM = "facebook/opt-6.7b"
DEFAULT_VISUAL_ENCODER = "openai/clip-vit-large-patch14"

DIRECT = {
    "model.logit_scale": "retrieval_head.logit_scale",
    "model.visual_embeddings.weight": "visual_prefix.proj.weight",
    "model.visual_embeddings.bias": "visual_prefix.proj.bias",
    "model.visual_fc.weight": "retrieval_head.image_proj.weight",
    "model.visual_fc.bias": "retrieval_head.image_proj.bias",
    "model.text_hidden_fcs.0.0.weight": "retrieval_head.text_proj.weight",
    "model.text_hidden_fcs.0.0.bias": "retrieval_head.text_proj.bias",
}
#: Key prefixes of frozen backbone weights an unpruned training checkpoint may still hold.
BACKBONE_PREFIXES = ("model.lm.", "model.visual_model.")


def release_paths(release: str | Path, model_args: str | Path | None = None,
                  names: tuple[str, ...] = WEIGHTS_FILES) -> tuple[Path, Path]:
    """(weights file, model_args.json) from ``--release`` (a folder, or the weights file) and
    ``--model_args`` (default: beside the weights file)."""
    release = Path(release)
    if release.is_dir():
        weights = find_file(release, names, "weights file", "--release")
    elif release.is_file():
        weights = release
    else:
        raise ConfigError(f"{release}: no such release folder or file")
    return weights, Path(model_args) if model_args is not None else weights.parent / ARGS_FILE


def read_model_args(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / ARGS_FILE
    if not path.exists():
        raise ConfigError(f"{path}: missing (give the release's model_args.json with --model_args)")
    from mmgen.files import read_text

    try:
        data = json.loads(read_text(path, "model_args.json", error=ConfigError))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (truncated or damaged file?): {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of model arguments, found {type(data).__name__}")
    return data


def read_weights(path: Path, reported: list[tuple[str, str]]) -> dict:
    """The release's state dict, keys without DataParallel's ``module.``."""
    return strip_module_prefix(release_state(path), reported)


def shared_components(args: dict, n_visual_tokens: int, llm: str | None = None,
                      visual_encoder: str | None = None, dtype: str = "float32") -> dict:
    """The components FROMAGe and GILL releases share: LLM, visual encoder (by hub id or folder:
    the options, else ``model_args.json``'s, else the official ones; frozen weights in
    ``dtype``), visual prefix, retrieval head."""
    return {
        "llm": {"class_path": "mmgen.components.causal_lm.CausalLM",
                "init_args": {"name_or_path": llm or args.get("opt_version", DEFAULT_LLM), "dtype": dtype}},
        "visual_encoder": {"class_path": "mmgen.components.clip_vision.CLIPVisionEncoder",
                           "init_args": {"name_or_path": visual_encoder or args.get("visual_encoder", DEFAULT_VISUAL_ENCODER),
                                         "dtype": dtype}},
        "visual_prefix": {"class_path": "mmgen.components.visual_prefix.LinearVisualPrefix",
                          "init_args": {"n_tokens": int(args.get("n_visual_tokens", n_visual_tokens))}},
        "retrieval_head": {"class_path": "mmgen.components.retrieval_head.RetrievalHead",
                           "init_args": {"embed_dim": int(args.get("shared_emb_dim", 256))}},
    }


def default_config(args: dict, llm: str | None = None, visual_encoder: str | None = None,
                   dtype: str | None = None) -> dict:
    """The mmgen config matching a release's ``model_args.json`` (float32 unless ``dtype``)."""
    components = shared_components(args, 1, llm, visual_encoder, dtype or "float32")
    return {"class_path": "mmgen.methods.fromage.FROMAGe", "init_args": components}


def model_config(config: dict | None, args: dict, llm=None, visual_encoder=None, dtype=None) -> dict:
    """``--config``'s model (backbone options override it), or the official architecture."""
    if config is None:
        return default_config(args, llm, visual_encoder, dtype)
    return set_backbones(config, llm=llm, visual_encoder=visual_encoder, dtype=dtype)


def check_args(args: dict, model) -> None:
    """model_args fields that the tensor shapes do not show, against the mmgen model."""
    layers = args.get("text_emb_layers", [-1])
    if list(layers) != [-1]:
        raise ConfigError(f"{ARGS_FILE}: text_emb_layers={layers}; mmgen reads the last layer only ([-1])")
    n_tokens = args.get("n_visual_tokens")
    if n_tokens is not None and int(n_tokens) != model.visual_prefix.n_tokens:
        raise ConfigError(f"{ARGS_FILE}: n_visual_tokens={n_tokens}, the config's visual_prefix has "
                          f"n_tokens={model.visual_prefix.n_tokens}")


def convert(release: str | Path, config: dict | None = None, model_args: str | Path | None = None,
            llm: str | None = None, visual_encoder: str | None = None, dtype: str | None = None):
    """Returns (configured FROMAGe holding the release's tensors, its config, Conversion)."""
    from mmgen.pretrained import build_model

    weights, args_path = release_paths(release, model_args)
    args = read_model_args(args_path)
    duplicates: list[tuple[str, str]] = []
    state = read_weights(weights, duplicates)  # read before building: a bad file fails fast
    config = model_config(config, args, llm, visual_encoder, dtype)
    model = build_model(config)
    model.configure_model()
    check_args(args, model)

    conversion = Conversion(model, str(weights))
    conversion.reported += duplicates
    for key, target in DIRECT.items():
        if key in state:
            conversion.place(key, state[key], target)
    place_ret_row(conversion, state, args, model)
    for key in state:
        if key.startswith(BACKBONE_PREFIXES):
            conversion.report(key, "frozen backbone weight: the model loads it from the backbone's source")
    conversion.apply({weights.name: list(state) + [k for k, _ in duplicates]})
    return model, config, conversion


def place_ret_row(conversion: Conversion, state: dict, args: dict, model) -> None:
    """The [RET] row, into the row mmgen's LLM keeps for ``[RET]`` (found by token, not position)."""
    (row,) = token_rows(model, [RET_TOKEN])
    for target in token_row_params(model).values():  # the input rows, and an untied LM head's rows (not OPT)
        if "ret_input_embeddings.weight" in state:
            vector = state["ret_input_embeddings.weight"]  # (1, d); the prune script's is (d,)
            conversion.place_rows("ret_input_embeddings.weight", vector.reshape(1, -1) if vector.dim() == 1 else vector,
                                  target, [row])
        elif "model.input_embeddings.weight" in state:
            matrix = state["model.input_embeddings.weight"]  # (V, d)
            index = int(args.get("retrieval_token_idx", model.llm.token_id(RET_TOKEN)))
            if not 0 <= index < matrix.shape[0]:
                raise ConfigError(f"{conversion.name}: retrieval_token_idx {index} is outside "
                                  f"model.input_embeddings.weight's {matrix.shape[0]} rows")
            conversion.place_rows("model.input_embeddings.weight", matrix[index : index + 1], target, [row])
    if "model.input_embeddings.weight" in state and "ret_input_embeddings.weight" not in state:
        conversion.report("model.input_embeddings.weight", "rows other than [RET]: the base LM's frozen rows "
                          "(and the untrained <|image|> row)")
    elif "model.input_embeddings.weight" in state:
        conversion.report("model.input_embeddings.weight", "the [RET] row is taken from ret_input_embeddings.weight")
