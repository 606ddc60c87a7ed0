"""The official GILL release -> mmgen's GILL and its decision stage (REFERENCE.md sec. 3; table in
docs/weights.md).

Release folder: ``model_args.json``, ``pretrained_ckpt.pth.tar`` (bf16) and, optionally,
``decision_model.pth.tar`` (saved on a GPU; read with map_location="cpu"):

    model.logit_scale                        -> retrieval_head.logit_scale
    model.visual_embeddings.{weight,bias}    -> visual_prefix.proj.{weight,bias}      (d*4, f)
    model.visual_fc.{weight,bias}            -> retrieval_head.image_proj.{weight,bias}
    model.ret_text_hidden_fcs.0.model.*      -> retrieval_head.text_proj.*
    model.gen_text_hidden_fcs.0.<name>       -> gen_mapper.<name>  (fc.*, tfm.*, model.*, query_embs:
                                                GILLMapper keeps the reference's names)
    model.input_embeddings.weight (r, d)     -> the [IMG0..r-1] rows of the LLM's new token rows
    decision_model.pth.tar 1.{weight,bias}   -> decision_head.head.1.{weight,bias}    (2, d), (2,)

The GILL model is written to ``out``; with a decision model, a GILLDecisionStage folder is
written to ``out/decision`` (its ``gill_checkpoint``, ``out/decision/gill.ckpt``, holds the GILL
tensors in mmgen's checkpoint layout).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmgen.convert import Conversion, release_state, token_row_params
from mmgen.convert.fromage import BACKBONE_PREFIXES, read_model_args, shared_components
from mmgen.errors import ConfigError

WEIGHTS_FILE = "pretrained_ckpt.pth.tar"
DECISION_FILE = "decision_model.pth.tar"

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


def default_config(args: dict) -> dict:
    """The mmgen GILL config matching a release's ``model_args.json`` (backbones by hub id)."""
    return {
        "class_path": "mmgen.methods.gill.GILL",
        "init_args": {
            **shared_components(args, n_visual_tokens=4),
            "image_generator": {"class_path": "mmgen.components.stable_diffusion.StableDiffusion",
                                "init_args": {"name_or_path": "runwayml/stable-diffusion-v1-5"}},
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


def convert(release: str | Path, config: dict | None = None):
    """Returns (configured GILL holding the release's tensors, its config, Conversion). With a
    decision model in the release, the Conversion's ``decision`` is (GILLDecisionStage, config)."""
    from mmgen.pretrained import build_model

    release = Path(release)
    args = read_model_args(release)
    state = release_state(release / WEIGHTS_FILE)
    decision_state = release_state(release / DECISION_FILE) if (release / DECISION_FILE).exists() else None
    config = config or default_config(args)
    model = build_model(config)
    model.configure_model()
    check_args(args, model)

    conversion = Conversion(model, f"{release / WEIGHTS_FILE}")
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
        for rows in token_row_params(model).values():  # input rows; an untied LM head's too
            conversion.place_rows(IMG_ROWS, state[IMG_ROWS], rows, list(range(model.n_img_tokens)))
    decision = None
    if decision_state is not None:  # checked in full before anything is copied
        decision = _decision_stage(config, model, decision_state, release / DECISION_FILE)
    conversion.apply({WEIGHTS_FILE: list(state)})
    if decision is not None:
        decision[2].apply({DECISION_FILE: list(decision_state)})
        conversion.decision = decision
    return model, config, conversion


def _decision_stage(gill_config: dict, gill, state: dict, path: Path):
    """A GILLDecisionStage around a GILL built from the same config, with the decision tensors
    planned (not yet copied)."""
    from mmgen.pretrained import build_model

    config = {"class_path": "mmgen.methods.gill_decision.GILLDecisionStage",
              "init_args": {"gill": gill_config, "gill_checkpoint": None}}
    stage = build_model(config)
    stage.gill = gill  # the converted GILL itself: no second copy of the backbones
    trained = [p for p in gill.parameters() if p.requires_grad]
    stage.configure_model()  # freezes the GILL: the stage's own tensors are the decision head's
    conversion = Conversion(stage, str(path))
    for param in trained:  # the GILL model is still saved as a model of its own
        param.requires_grad_(True)
    for key, tensor in state.items():
        if key not in DECISION:
            raise ConfigError(f"{path}: key {key!r} has no place in the decision module (nothing was loaded)")
        conversion.place(key, tensor, DECISION[key])
    return stage, config, conversion


def save_decision(conversion: Conversion, out: str | Path) -> Path | None:
    """Write the decision stage (if the release had one) to ``out/decision``."""
    from mmgen.pretrained import save_pretrained, trained_state

    if getattr(conversion, "decision", None) is None:
        return None
    stage, config, decision_conversion = conversion.decision
    folder = Path(out) / "decision"
    folder.mkdir(parents=True, exist_ok=True)
    gill_ckpt = folder / "gill.ckpt"
    torch.save({"state_dict": trained_state(conversion.model)}, gill_ckpt)
    config = {**config, "init_args": {**config["init_args"], "gill_checkpoint": str(gill_ckpt.resolve())}}
    trained = [p for p in stage.gill.parameters() if p.requires_grad]
    stage.gill.requires_grad_(False)  # as the stage trains: the decision head only
    try:
        return save_pretrained(stage, folder, config=config,
                               card_notes="```\n" + decision_conversion.summary() + "\n```")
    finally:
        for param in trained:
            param.requires_grad_(True)
