"""The official GILL release -> mmgen's GILL, with its decision module when the release has one
(table in docs/weights.md).

Release folder: ``model_args.json``, ``pretrained_ckpt.pth.tar`` (bf16) and, optionally,
``decision_model.pth.tar`` (saved on a GPU; read with map_location="cpu"). ``--release`` may also
be the weights file itself; ``--model_args`` and ``--decision`` name the other files where they
are not beside it. A leading ``module.`` (DataParallel) on a key is ignored.

    model.logit_scale                        -> retrieval_head.logit_scale
    model.visual_embeddings.{weight,bias}    -> visual_prefix.proj.{weight,bias}      (d*4, f)
    model.visual_fc.{weight,bias}            -> retrieval_head.image_proj.{weight,bias}
    model.ret_text_hidden_fcs.0.model.*      -> retrieval_head.text_proj.*
    model.gen_text_hidden_fcs.0.<name>       -> gen_mapper.<name>  (fc.*, tfm.*, model.*, query_embs:
                                                GILLMapper keeps the reference's names)
    model.input_embeddings.weight (r, d)     -> the rows of [IMG0]..[IMG{r-1}] among the LLM's new token
                                                rows (found by token: mmgen's vocabulary, like the
                                                official one, also has the frozen <|image|>)
    decision_model.pth.tar 1.{weight,bias}   -> decision_head.head.1.{weight,bias}    (2, d), (2,)

With a decision model the GILL gets a ``decision_head`` (``DecisionHead``, dropout 0.5 as the
official code) holding it, and answers in mode "auto" ask it; one folder holds both.
"""

from __future__ import annotations

from pathlib import Path


from mmgen.convert import Conversion, release_state, set_backbones, token_row_params, token_rows
from mmgen.convert.fromage import (BACKBONE_PREFIXES, WEIGHTS_FILES, read_model_args, read_weights, release_paths,
                                   shared_components)
from mmgen.errors import ConfigError

DECISION_FILE = "decision_model.pth.tar"
#: the official image generator (GILL's SD v1.5)
DEFAULT_GENERATOR = "runwayml/stable-diffusion-v1-5"

DIRECT = {
    "model.logit_scale": "retrieval_head.logit_scale",
    "model.visual_embeddings.weight": "visual_prefix.proj.weight",
    "model.visual_embeddings.bias": "visual_prefix.proj.bias",
    "model.visual_fc.weight": "retrieval_head.image_proj.weight",
    "model.visual_fc.bias": "retrieval_head.image_proj.bias",
    "model.ret_text_hidden_fcs.0.model.weight": "retrieval_head.text_proj.weight",
    "model.ret_text_hidden_fcs.0.model.bias": "retrieval_head.text_proj.bias",
}
MAPPER_PREFIX = ("model.gen_text_hidden_fcs.0.", "gen_mapper.")
IMG_ROWS = "model.input_embeddings.weight"
DECISION = {"1.weight": "decision_head.head.1.weight", "1.bias": "decision_head.head.1.bias"}
DECISION_HEAD = {"class_path": "mmgen.components.decision_head.DecisionHead", "init_args": {"dropout": 0.5}}


def default_config(args: dict, llm: str | None = None, visual_encoder: str | None = None,
                   generator: str | None = None, dtype: str | None = None) -> dict:
    """The mmgen GILL config matching a release's ``model_args.json`` (backbones by the options,
    else model_args', else the official hub ids; float32 unless ``dtype``)."""
    dtype = dtype or "float32"
    return {
        "class_path": "mmgen.methods.gill.GILL",
        "init_args": {
            **shared_components(args, 4, llm, visual_encoder, dtype),
            "image_generator": {"class_path": "mmgen.components.stable_diffusion.StableDiffusion",
                                "init_args": {"name_or_path": generator or DEFAULT_GENERATOR, "dtype": dtype}},
            "n_img_tokens": int(args.get("num_tokens", 8)),
            "precomputed_captions": True,
        },
    }


def check_args(args: dict, model) -> None:
    layers = args.get("text_emb_layers", [-1])
    if list(layers) != [-1]:
        raise ConfigError(f"model_args.json: text_emb_layers={layers}; mmgen reads the last layer only ([-1])")
    for field, value in (("num_tokens", model.n_img_tokens), ("n_visual_tokens", model.visual_prefix.n_tokens)):
        if field in args and int(args[field]) != value:
            raise ConfigError(f"model_args.json: {field}={args[field]}, the config's model has {value}")
    mode = args.get("text_fc_mode", "gill_mapper")
    if mode != "gill_mapper":
        raise ConfigError(f"model_args.json: text_fc_mode={mode!r}; mmgen's GILL uses the GILLMapper")


def convert(release: str | Path, config: dict | None = None, model_args: str | Path | None = None,
            decision: str | Path | None = None, llm: str | None = None, visual_encoder: str | None = None,
            generator: str | None = None, dtype: str | None = None):
    """Returns (configured GILL holding the release's tensors, its config, Conversion). With a
    decision model (``decision``, or decision_model.pth.tar beside the weights), the GILL has a
    ``decision_head`` holding it."""
    from mmgen.pretrained import build_model

    weights, args_path = release_paths(release, model_args, WEIGHTS_FILES)
    args = read_model_args(args_path)
    duplicates: list[tuple[str, str]] = []
    state = read_weights(weights, duplicates)
    decision_path = Path(decision) if decision is not None else weights.parent / DECISION_FILE
    decision_state = release_state(decision_path) if decision is not None or decision_path.exists() else None
    if config is None:
        config = default_config(args, llm, visual_encoder, generator, dtype)
    else:
        config = set_backbones(config, llm=llm, visual_encoder=visual_encoder, image_generator=generator, dtype=dtype)
    if decision_state is not None and not config["init_args"].get("decision_head"):
        config = {**config, "init_args": {**config["init_args"], "decision_head": DECISION_HEAD}}
    model = build_model(config)
    model.configure_model()
    check_args(args, model)

    conversion = Conversion(model, str(weights))
    conversion.reported += duplicates
    for key, target in DIRECT.items():
        if key in state:
            conversion.place(key, state[key], target)
    source, target = MAPPER_PREFIX
    for key in state:
        if key.startswith(source):
            conversion.place(key, state[key], target + key[len(source):])
        elif key.startswith(BACKBONE_PREFIXES):
            conversion.report(key, "frozen backbone weight: the model loads it from the backbone's source")
    if IMG_ROWS in state:
        rows = token_rows(model, [f"[IMG{i}]" for i in range(model.n_img_tokens)])  # by token, not position
        for target in token_row_params(model).values():  # input rows; an untied LM head's too
            conversion.place_rows(IMG_ROWS, state[IMG_ROWS], target, rows)
    sources = {weights.name: list(state) + [k for k, _ in duplicates]}
    if decision_state is not None:
        for key, tensor in decision_state.items():
            if key not in DECISION:
                raise ConfigError(f"{decision_path}: key {key!r} has no place in the decision module (nothing was loaded)")
            conversion.place(f"{decision_path.name}: {key}", tensor, DECISION[key])
        sources[decision_path.name] = [f"{decision_path.name}: {k}" for k in decision_state]
    conversion.apply(sources)
    return model, config, conversion
