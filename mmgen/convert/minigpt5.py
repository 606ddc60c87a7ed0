"""The official MiniGPT-5 release -> mmgen's MiniGPT5 (table in
docs/weights.md).

Release folder: ``stage1_cc3m.ckpt`` and, for stage 2, ``stage2_vist.ckpt`` or
``stage2_mmdialog.ckpt``: fp32 Lightning checkpoints ``{'state_dict': ...}`` pruned to the
parameters that trained in that stage. Stage 2 needs stage 1: its ``fc`` and query sequence were
frozen in stage 2 and are only in the stage-1 file; a tensor in both files comes from stage 2.
``--release`` may also be one checkpoint file (as the official ``--test_weight``): a stage-2 one
(it holds LoRA tensors) then needs ``--stage1`` or ``stage1_cc3m.ckpt`` beside it. ``--stage1`` /
``--stage2`` name the files explicitly.

MiniGPT-4's visual path is frozen and loaded by ``QFormerEncoder`` itself, so its files are named
in the written config, not copied: ``--projection`` (MiniGPT-4's ``prerained_minigpt4_7b.pth``,
sic, or ``pretrained_minigpt4_7b.pth``: ``llama_proj``), and, to load the LAVIS files MiniGPT-4
loads instead of a transformers BLIP-2 checkpoint, ``--lavis_vit`` (``eva_vit_g.pth``) and
``--lavis_qformer`` (``blip2_pretrained_flant5xxl.pth``). Each defaults to the file of that name
in the release folder, if present, and is checked before the model is built.

Keys (a leading ``model.`` before any of them is tolerated; the LLM may be wrapped by peft,
``llama_model.base_model.model.<hf name>``, with or without peft's adapter name ``.default``):

    fc.<name>                                     -> mapper.fc.<name>      (Linear, GELU, Linear)
    llm_to_t2i_mapping.<name>                     -> mapper.transformer.<name>   (nn.Transformer)
    t2i_decoder_prompt              (1, 77, d)    -> mapper.queries.weight
    model.llama_model.model.embed_tokens.weight (V, h)      the last 9 rows ([IMG0..7], <ImageHere>,
      (stage 2: ...embed_tokens.modules_to_save.default.weight)  ids V-9..V-1) -> the LLM's new
                                                    input token rows; the other rows: base LLM, frozen
    model.llama_model.lm_head.weight (V, h)       -> the same rows of the (untied) LM head
      (stage 2: ...lm_head.modules_to_save.default.weight)
    model.llama_model.base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}[.default].weight
                                                  -> llm.model.base_model.model.model.layers.N.
                                                     self_attn.{q,v}_proj.lora_{A,B}.default.weight

h: LLM width (4096), d: generator text width (1024), V: the LLM's vocabulary with the 9 new
tokens (32009 for Vicuna). Stage 1 alone leaves the LoRA at its initialisation (B = 0: the
identity), as stage 2 starts.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from mmgen.convert import Conversion, load_release_file, release_state, set_backbones, token_row_params, token_rows
from mmgen.errors import ConfigError

STAGE1_FILE = "stage1_cc3m.ckpt"
STAGE2_FILES = {"stage2_vist": "stage2_vist.ckpt", "stage2_mmdialog": "stage2_mmdialog.ckpt"}
#: MiniGPT-4's projection file, as MiniGPT-4 names it (sic) and as mmgen's configs spell it.
PROJECTION_FILES = ("prerained_minigpt4_7b.pth", "pretrained_minigpt4_7b.pth")
#: the LAVIS files MiniGPT-4 loads its visual path from (QFormerEncoder's lavis_vit / lavis_qformer)
LAVIS_FILES = {"lavis_vit": ("eva_vit_g.pth",), "lavis_qformer": ("blip2_pretrained_flant5xxl.pth",)}
#: the official backbones: Vicuna-7B v0 as MiniGPT-4 publishes it merged (MiniGPT-5's README),
#: BLIP-2 FlanT5-XXL's vision model and Q-Former, Stable Diffusion 2.1 base
DEFAULT_LLM = "Vision-CAIR/vicuna-7b"
DEFAULT_VISUAL_ENCODER = "Salesforce/blip2-flan-t5-xxl"
DEFAULT_GENERATOR = "stabilityai/stable-diffusion-2-1-base"

#: top-level names of the reference's Lightning module (``MiniGPT5_Model``) and its ``model``
TOP = ("llama_model.", "fc.", "llm_to_t2i_mapping.", "t2i_decoder_prompt")
MAPPER = {"fc.": "mapper.fc.", "llm_to_t2i_mapping.": "mapper.transformer."}
QUERIES = ("t2i_decoder_prompt", "mapper.queries.weight")
#: frozen parts an unpruned checkpoint may hold: MiniGPT-4's visual path and Stable Diffusion
FROZEN = {
    ("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens", "llama_proj."):
        "frozen MiniGPT-4 visual path: QFormerEncoder loads it (BLIP-2, MiniGPT-4's llama_proj)",
    ("unet.", "vae.", "sd_text_encoder.", "image_pipeline.", "model.unet.", "model.vae."):
        "frozen Stable Diffusion weight: loaded from the generator's name_or_path",
}
EMBED = re.compile(r"^model\.embed_tokens\.(?:modules_to_save\.(?:[\w-]+\.)?)?weight$")
HEAD = re.compile(r"^lm_head\.(?:modules_to_save\.(?:[\w-]+\.)?)?weight$")
LORA = re.compile(r"^(model\.layers\.\d+\..+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def default_config(projection: str | None = None, llm: str | None = None, visual_encoder: str | None = None,
                   generator: str | None = None, dtype: str | None = None) -> dict:
    """The full-size mmgen MiniGPT-5 model (configs/minigpt5_stage2.yaml's architecture, without
    init_from), its backbones named by the options, else the official hub ids; frozen weights
    in ``dtype`` (float32 unless asked)."""
    dtype = dtype or "float32"
    return {
        "class_path": "mmgen.methods.minigpt5.MiniGPT5",
        "init_args": {
            "llm": {"class_path": "mmgen.components.causal_lm.CausalLM",
                    "init_args": {"name_or_path": llm or DEFAULT_LLM, "dtype": dtype,
                                  "adapter": {"class_path": "mmgen.components.lora.LoRA",
                                              "init_args": {"r": 8, "alpha": 16, "dropout": 0.05,
                                                            "target_modules": ["q_proj", "v_proj"]}}}},
            "visual_encoder": {"class_path": "mmgen.components.qformer.QFormerEncoder",
                               "init_args": {"name_or_path": visual_encoder or DEFAULT_VISUAL_ENCODER,
                                             "projection": projection, "dtype": dtype}},
            "generator": {"class_path": "mmgen.components.stable_diffusion.StableDiffusion",
                          "init_args": {"name_or_path": generator or DEFAULT_GENERATOR, "dtype": dtype}},
            "mapper": {"class_path": "mmgen.components.voken_mapper.VokenMapper",
                       "init_args": {"n_queries": 77, "num_heads": 8, "num_encoder_layers": 4,
                                     "num_decoder_layers": 4, "ff_mult": 4, "cfg_drop_prob": 0.1}},
        },
    }


def stage_file(stage: str | None) -> str | None:
    """``--stage`` -> the stage-2 file name (None: stage 1 only)."""
    if stage is None or stage.removesuffix(".ckpt") in ("stage1", "stage1_cc3m", "uas"):
        return None
    name = stage.removesuffix(".ckpt")
    name = {"vist": "stage2_vist", "mmdialog": "stage2_mmdialog"}.get(name, name)
    if name not in STAGE2_FILES:
        raise ConfigError(f"MiniGPT-5 --stage {stage!r}: stages are stage1, {', '.join(sorted(STAGE2_FILES))}")
    return STAGE2_FILES[name]


def source_name(key: str) -> str | None:
    """A release key without the Lightning module's ``model.`` (None: not a MiniGPT-5 name)."""
    if key.startswith(TOP):
        return key
    if key.startswith("model.") and key[len("model."):].startswith(TOP):
        return key[len("model."):]
    return None


def classify(key: str, model, rows: dict[str, str]) -> tuple[str, str | None, str | None]:
    """("place", target, None), ("rows", "input"/"output", None), ("report", None, reason) or
    ("unknown", None, why) for one release key."""
    name = source_name(key)
    if name is None:
        for prefixes, reason in FROZEN.items():
            if key.startswith(prefixes) or key.removeprefix("model.").startswith(prefixes):
                return "report", None, reason
        return "unknown", None, "not a MiniGPT-5 name"
    for source, target in MAPPER.items():
        if name.startswith(source):
            return "place", target + name[len(source):], None
    if name == QUERIES[0]:
        return "place", QUERIES[1], None
    hf = name[len("llama_model."):]
    hf = hf.removeprefix("base_model.model.")  # peft's wrapper (stage 2)
    if EMBED.match(hf):
        return "rows", "input", None
    if HEAD.match(hf):
        if "output" not in rows:
            return "unknown", None, "the config's LLM ties its LM head to the input embedding"
        return "rows", "output", None
    match = LORA.match(hf)
    if match:
        path, half = match.groups()
        return "place", f"llm.model.base_model.model.{path}.lora_{half}.{adapter_name(model)}.weight", None
    if ".original_module." in hf:
        return "report", None, "peft's frozen copy of the base matrix beside modules_to_save"
    if "lora" in hf or "modules_to_save" in hf or "prefix" in hf or "prompt" in hf:
        return "unknown", None, "an adapter tensor mmgen has no place for"
    return "report", None, "frozen LLM weight: the model loads it from the LLM's name_or_path"


def adapter_name(model) -> str:
    names = {n.split(".lora_A.", 1)[1].split(".", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    return names.pop() if len(names) == 1 else "default"


def check_projection(path: str | Path) -> list[str]:
    """MiniGPT-4's projection file, read as QFormerEncoder reads it (clear errors before the model
    is built); returns its keys."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: the visual encoder's projection file (MiniGPT-4's llama_proj) does not exist")
    data = load_release_file(path)
    state = data["model"] if isinstance(data.get("model"), dict) else data
    for key in ("llama_proj.weight", "llama_proj.bias"):
        if not isinstance(state.get(key), torch.Tensor):
            raise ConfigError(f"{path}: no {key} tensor (keys: {sorted(state)[:8]})")
    return [f"model.{k}" if state is not data else k for k in state]


def release_files(release: str | Path, stage: str | None = None, stage1: str | Path | None = None,
                  stage2: str | Path | None = None, read=release_state) -> tuple[Path, list[Path]]:
    """(the folder other files default to, [stage-1 file, stage-2 file if any]) from ``--release``
    (a folder, or the checkpoint to convert), ``--stage``, ``--stage1`` and ``--stage2``.
    ``read(path)``: the state-dict reader (the caller's, so a checkpoint is read once)."""
    release = Path(release)
    second = stage_file(stage)
    if release.is_file():
        if stage2 is not None or second is not None:
            raise ConfigError(f"{release}: --release is a checkpoint file, so it is the one converted; "
                              "--stage / --stage2 name a file of a release folder")
        if stage1 is None and not _is_stage2(read(release)):
            return release.parent, [release]
        return release.parent, [Path(stage1) if stage1 else release.parent / STAGE1_FILE, release]
    if not release.is_dir():
        raise ConfigError(f"{release}: no such release folder or checkpoint file")
    if stage2 is not None and second is not None:
        raise ConfigError("give --stage or --stage2, not both")
    files = [Path(stage1) if stage1 else release / STAGE1_FILE]
    if stage2 is not None or second is not None:
        files.append(Path(stage2) if stage2 else release / second)
    return release, files


def _is_stage2(state: dict) -> bool:
    """A stage-2 checkpoint holds LoRA (or peft's modules_to_save) tensors; stage 1 none."""
    return any(".lora_" in k or "modules_to_save" in k for k in state)


def prepare_config(config: dict, folder: Path, files: dict[str, str | None]) -> tuple[dict, dict[str, Path]]:
    """The config to build: ``init_from`` dropped (the release is the initialisation) and the
    visual encoder's files (``projection``, ``lavis_vit``, ``lavis_qformer``) set from ``files``
    (the options), else kept from the config, else the release folder's file of that name.
    Returns the config and the files it names, each checked to exist."""
    config = copy.deepcopy(config)
    args = config.setdefault("init_args", {})
    args["init_from"] = None
    encoder = args.get("visual_encoder")
    named: dict[str, Path] = {}
    if not isinstance(encoder, dict):
        if any(files.values()):
            raise ConfigError(f"the model has no visual_encoder to load {sorted(k for k, v in files.items() if v)} into")
        return config, named
    encoder_args = encoder.setdefault("init_args", {})
    defaults = {"projection": PROJECTION_FILES, **LAVIS_FILES}
    for option, names in defaults.items():
        path = files.get(option) or encoder_args.get(option)
        if path is None:
            found = next((folder / n for n in names if (folder / n).is_file()), None)
            path = str(found.resolve()) if found is not None else None
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"{path}: the visual encoder's {option} file does not exist")
            encoder_args[option] = str(path)
            named[option] = Path(path)
    return config, named


def convert(release: str | Path, config: dict | None = None, stage: str | None = None,
            stage1: str | Path | None = None, stage2: str | Path | None = None,
            projection: str | Path | None = None, lavis_vit: str | Path | None = None,
            lavis_qformer: str | Path | None = None, llm: str | None = None, visual_encoder: str | None = None,
            generator: str | None = None, dtype: str | None = None):
    """Returns (configured MiniGPT5 holding the release's tensors, its config, Conversion).
    ``stage``: None (stage 1 only), ``stage2_vist`` or ``stage2_mmdialog``; or the files by
    ``stage1`` / ``stage2`` / a checkpoint file as ``release``."""
    from mmgen.pretrained import build_model

    read: dict[Path, dict] = {}

    def read_once(path: Path) -> dict:
        if path not in read:
            read[path] = release_state(path)
        return read[path]

    folder, paths = release_files(release, stage, stage1, stage2, read_once)
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ConfigError(f"the stage-1 and stage-2 files have the same name ({names[0]}): rename one")
    states = {p.name: read_once(p) for p in paths}  # read first: bad files fail fast
    if config is None:
        config = default_config(llm=llm, visual_encoder=visual_encoder, generator=generator, dtype=dtype)
    else:
        config = set_backbones(config, llm=llm, visual_encoder=visual_encoder, generator=generator, dtype=dtype)
    config, visual_files = prepare_config(config, folder, {"projection": projection, "lavis_vit": lavis_vit,
                                                           "lavis_qformer": lavis_qformer})
    projection_keys = check_projection(visual_files["projection"]) if "projection" in visual_files else []
    model = build_model(config)
    model.configure_model()

    conversion = Conversion(model, str(folder))
    rows = token_row_params(model)
    new_rows = _new_row_order(model)
    plan: dict[str, tuple[str, str, torch.Tensor]] = {}  # target -> (label, how, tensor)
    unknown = []
    for name in names:  # stage 2 after stage 1: its tensors take precedence
        for key, tensor in states[name].items():
            label = f"{name}:{key}"
            kind, target, why = classify(key, model, rows)
            if kind == "unknown":
                unknown.append(f"{label} ({why})")
            elif kind == "report":
                conversion.report(label, why)
            else:
                if kind == "rows":
                    tensor = _voken_rows(conversion, label, tensor, model, target)
                    target = rows[target]
                if target in plan:
                    conversion.report(plan[target][0], f"superseded by {label}")
                plan[target] = (label, kind, tensor)
    if unknown:
        raise ConfigError(f"{folder}: keys with no place in the mmgen model (nothing was loaded): {unknown[:10]}")
    for target, (label, kind, tensor) in plan.items():
        if kind == "rows":
            conversion.place_rows(label, tensor, target, new_rows)
        else:
            conversion.place(label, tensor, target)
    for key in projection_keys:
        conversion.report(f"{visual_files['projection'].name}:{key}", "frozen: QFormerEncoder loads it from this file "
                          "(visual_encoder.projection in the config)")
    for option in LAVIS_FILES:
        if option in visual_files:
            conversion.report(visual_files[option].name, f"frozen: QFormerEncoder loads it (visual_encoder.{option} in "
                              "the config; mmgen.components.lavis maps its keys)")
    adapter = {n for n, p in model.named_parameters() if id(p) in {id(q) for q in model.parameter_groups()["adapter"].params}}
    conversion.apply({name: [f"{name}:{k}" for k in states[name]] for name in names},
                     allow_fresh=tuple(sorted(adapter)) if len(paths) == 1 else ())
    return model, config, conversion


def _new_row_order(model) -> list[int]:
    """Row of each new token ([IMG0..7], <ImageHere>: the reference's order) in the LLM's
    trainable token rows, found by token."""
    from mmgen.data.minigpt5_samples import IMAGE_PLACEHOLDER, VOKENS

    return token_rows(model, VOKENS + [IMAGE_PLACEHOLDER])


def _voken_rows(conversion: Conversion, label: str, matrix: torch.Tensor, model, which: str) -> torch.Tensor:
    """The reference's new rows of its resized (V, h) matrix, in token order ([IMG0..7],
    <ImageHere>), picked by their ids: the config's tokenizer must be the reference's, which the
    matrix size checks (ids 32000..32008 for Vicuna, the last 9 rows)."""
    from mmgen.data.minigpt5_samples import IMAGE_PLACEHOLDER, VOKENS

    tokens = VOKENS + [IMAGE_PLACEHOLDER]
    llm = model.llm.model
    full = (llm.get_input_embeddings() if which == "input" else llm.get_output_embeddings()).weight.shape
    if matrix.dim() != 2 or tuple(matrix.shape) != tuple(full):
        raise ConfigError(f"{conversion.name}: {label} has shape {tuple(matrix.shape)}, the config's LLM has "
                          f"{tuple(full)} ({full[0] - len(tokens)} base tokens + {VOKENS[0]}..{VOKENS[-1]}, "
                          f"{IMAGE_PLACEHOLDER}): a different LLM or tokenizer")
    ids = [model.llm.token_id(t) for t in tokens]
    conversion.report(label, f"rows other than {ids[0]}..{ids[-1]}: the base LLM's frozen rows")
    return matrix[ids]
