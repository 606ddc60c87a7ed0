"""The official FROMAGe release -> mmgen's FROMAGe (REFERENCE.md sec. 2; table in docs/weights.md).

Release folder: ``model_args.json`` and ``pretrained_ckpt.pth.tar`` = ``{'state_dict': ...}``, bf16:

    model.logit_scale                  ()          -> retrieval_head.logit_scale
    model.visual_embeddings.weight     (d*k, f)    -> visual_prefix.proj.weight
    model.visual_embeddings.bias       (d*k,)      -> visual_prefix.proj.bias
    model.visual_fc.weight             (e, f)      -> retrieval_head.image_proj.weight
    model.visual_fc.bias               (e,)        -> retrieval_head.image_proj.bias
    model.text_hidden_fcs.0.0.weight   (e, d)      -> retrieval_head.text_proj.weight
    model.text_hidden_fcs.0.0.bias     (e,)        -> retrieval_head.text_proj.bias
    ret_input_embeddings.weight        (1, d)      -> the [RET] row of the LLM's new token rows
    or model.input_embeddings.weight   (V, d)      -> its [RET] row (model_args' retrieval_token_idx,
                                                      else the last); the other rows are OPT's own

d: LLM width (4096), f: CLIP feature width (1024), e: shared_emb_dim (256), k: n_visual_tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmgen.convert import Conversion, release_state, token_row_params
from mmgen.errors import ConfigError

ARGS_FILE = "model_args.json"
WEIGHTS_FILE = "pretrained_ckpt.pth.tar"

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


def read_model_args(release: str | Path) -> dict:
    path = Path(release) / ARGS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: missing from the release folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON (truncated or damaged file?): {error}") from error


def shared_components(args: dict, n_visual_tokens: int) -> dict:
    """The components FROMAGe and GILL releases share, from ``model_args.json`` (backbones by
    hub id, bf16): LLM, visual encoder, visual prefix, retrieval head."""
    return {
        "llm": {"class_path": "mmgen.components.causal_lm.CausalLM",
                "init_args": {"name_or_path": args.get("opt_version", "facebook/opt-6.7b"), "dtype": "bfloat16"}},
        "visual_encoder": {"class_path": "mmgen.components.clip_vision.CLIPVisionEncoder",
                           "init_args": {"name_or_path": args.get("visual_encoder", "openai/clip-vit-large-patch14"),
                                         "dtype": "bfloat16"}},
        "visual_prefix": {"class_path": "mmgen.components.visual_prefix.LinearVisualPrefix",
                          "init_args": {"n_tokens": int(args.get("n_visual_tokens", n_visual_tokens))}},
        "retrieval_head": {"class_path": "mmgen.components.retrieval_head.RetrievalHead",
                           "init_args": {"embed_dim": int(args.get("shared_emb_dim", 256))}},
    }


def default_config(args: dict) -> dict:
    """The mmgen config matching a release's ``model_args.json``."""
    return {"class_path": "mmgen.methods.fromage.FROMAGe", "init_args": shared_components(args, n_visual_tokens=1)}


def check_args(args: dict, model) -> None:
    """model_args fields that the tensor shapes do not show, against the mmgen model."""
    layers = args.get("text_emb_layers", [-1])
    if list(layers) != [-1]:
        raise ConfigError(f"{ARGS_FILE}: text_emb_layers={layers}; mmgen reads the last layer only ([-1])")
    n_tokens = args.get("n_visual_tokens")
    if n_tokens is not None and int(n_tokens) != model.visual_prefix.n_tokens:
        raise ConfigError(f"{ARGS_FILE}: n_visual_tokens={n_tokens}, the config's visual_prefix has "
                          f"n_tokens={model.visual_prefix.n_tokens}")


def convert(release: str | Path, config: dict | None = None):
    """Returns (configured FROMAGe holding the release's tensors, its config, Conversion)."""
    from mmgen.pretrained import build_model

    release = Path(release)
    args = read_model_args(release)
    state = release_state(release / WEIGHTS_FILE)  # read before building: a bad file fails fast
    config = config or default_config(args)
    model = build_model(config)
    model.configure_model()
    check_args(args, model)

    conversion = Conversion(model, f"{release / WEIGHTS_FILE}")
    for key, target in DIRECT.items():
        if key in state:
            conversion.place(key, state[key], target)
    rows = token_row_params(model)
    place_ret_row(conversion, state, args, rows)
    for key in state:
        if key.startswith(BACKBONE_PREFIXES):
            conversion.report(key, "frozen backbone weight: the model loads it from the backbone's source")
    conversion.apply({WEIGHTS_FILE: list(state)})
    return model, config, conversion


def place_ret_row(conversion: Conversion, state: dict, args: dict, rows: dict[str, str]) -> None:
    for target in rows.values():  # the input rows, and an untied LM head's rows (not OPT)
        if "ret_input_embeddings.weight" in state:
            conversion.place_rows("ret_input_embeddings.weight", state["ret_input_embeddings.weight"], target, [0])
        elif "model.input_embeddings.weight" in state:
            matrix = state["model.input_embeddings.weight"]  # (V, d)
            index = int(args.get("retrieval_token_idx", matrix.shape[0] - 1))
            if not 0 <= index < matrix.shape[0]:
                raise ConfigError(f"{conversion.name}: retrieval_token_idx {index} is outside "
                                  f"model.input_embeddings.weight's {matrix.shape[0]} rows")
            conversion.place_rows("model.input_embeddings.weight", matrix[index : index + 1], target, [0])
    if "model.input_embeddings.weight" in state and "ret_input_embeddings.weight" not in state:
        conversion.report("model.input_embeddings.weight", "rows other than [RET]: the base LM's frozen rows "
                          "(and the untrained <|image|> row)")
    elif "model.input_embeddings.weight" in state:
        conversion.report("model.input_embeddings.weight", "the [RET] row is taken from ret_input_embeddings.weight")
