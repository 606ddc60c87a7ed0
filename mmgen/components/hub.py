"""Where component weights come from: a hub id, a local folder, or a config with random weights.

Every backbone goes through :func:`pretrained_or_random`, so each one can be built three ways:
``name_or_path`` alone loads pretrained weights (hub id or local folder); ``name_or_path`` with
``random_weights=True`` builds that architecture with random weights; ``config`` alone builds a
random model from explicit config values (tiny test models). Inside :func:`random_weights_only`
(the full-size dry run) every component takes the random-weights path.

Hub configs of the models the shipped configs name are bundled below, so random full-size builds
(dry runs, GPU benchmarks) need neither the hub nor a download. A hub id not listed needs the hub
or a local folder.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from contextvars import ContextVar
from typing import Any

from mmgen.errors import ConfigError

ASSETS = Path(__file__).resolve().parent.parent / "assets"

_RANDOM_WEIGHTS_ONLY: ContextVar[bool] = ContextVar("mmgen_random_weights_only", default=False)


@contextlib.contextmanager
def random_weights_only():
    """Within this block every component builds random weights instead of loading any."""
    token = _RANDOM_WEIGHTS_ONLY.set(True)
    try:
        yield
    finally:
        _RANDOM_WEIGHTS_ONLY.reset(token)


def random_weights_requested(random_weights: bool) -> bool:
    return random_weights or _RANDOM_WEIGHTS_ONLY.get()


@contextlib.contextmanager
def seeded(seed: int):
    """Random builds inside this block draw from ``seed`` alone, and the caller's random state is
    left as it was: a component's random weights are a function of its config (its ``seed``),
    not of whatever ran before it (a checkpoint reloaded in Python without ``seed_everything``
    gets the frozen random backbone it was trained with)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


# Architecture fields of the hub configs that mmgen's shipped configs name (values as published).
_OPT_6_7B = dict(model_type="opt", vocab_size=50272, hidden_size=4096, word_embed_proj_dim=4096,
                 num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32,
                 max_position_embeddings=2048, do_layer_norm_before=True, pad_token_id=1,
                 bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
_OPT_125M = dict(_OPT_6_7B, hidden_size=768, word_embed_proj_dim=768, num_hidden_layers=12,
                 ffn_dim=3072, num_attention_heads=12)
_LLAMA_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0, tie_word_embeddings=False)
_CLIP_L14_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=24, num_attention_heads=16, image_size=224,
                        patch_size=14, projection_dim=768, hidden_act="quick_gelu")
_CLIP_B32_VISION = dict(_CLIP_L14_VISION, hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12, patch_size=32,
                        projection_dim=512)

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "facebook/opt-6.7b": _OPT_6_7B,
    "facebook/opt-125m": _OPT_125M,
    "lmsys/vicuna-7b-delta-v0": _LLAMA_7B,
    "Vision-CAIR/vicuna-7b": _LLAMA_7B,
    "huggyllama/llama-7b": _LLAMA_7B,
    "openai/clip-vit-large-patch14": _CLIP_L14_VISION,
    "openai/clip-vit-base-patch32": _CLIP_B32_VISION,
}

#: Tokenizer lengths of the same models (the embedding matrix can be larger: OPT has 50272 rows for
#: 50265 tokens), used to place new tokens when a random build has no tokenizer files.
KNOWN_TOKENIZER_LENGTHS: dict[str, int] = {
    "facebook/opt-6.7b": 50265,
    "facebook/opt-125m": 50265,
    "lmsys/vicuna-7b-delta-v0": 32000,
    "Vision-CAIR/vicuna-7b": 32000,
    "huggyllama/llama-7b": 32000,
}


def resolve_name(name_or_path: str | None) -> str | None:
    """``mmgen:NAME`` names a folder bundled in ``mmgen/assets`` (the toy tokenizer); anything
    else is a hub id or a local path, returned as it is."""
    if name_or_path is not None and name_or_path.startswith("mmgen:"):
        return str(ASSETS / name_or_path.removeprefix("mmgen:"))
    return name_or_path


def looks_local(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``~/x``, ``a/b/c``,
    an existing path) names a local folder."""
    name = str(name)
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or os.path.exists(name)


def require_local_folder(name_or_path: str | None, what: str = "model") -> None:
    """ConfigError naming ``name_or_path`` when it names a local folder that does not exist (the
    hub libraries would report a malformed repository id instead)."""
    if name_or_path is None or not looks_local(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "not found"
        raise ConfigError(f"{name_or_path}: {what} folder {state} (give an existing local folder or a hub id)")


def register_known_config(name: str, config: dict[str, Any], tokenizer_length: int | None = None):
    """Teach random builds the architecture of another hub id (research code, new shipped configs)."""
    KNOWN_CONFIGS[name] = dict(config)
    if tokenizer_length is not None:
        KNOWN_TOKENIZER_LENGTHS[name] = tokenizer_length


def resolve_config(name_or_path: str | None, overrides: dict[str, Any] | None, config_class=None):
    """A transformers config: the bundled, local or hub config of ``name_or_path``, updated by
    ``overrides``; or ``overrides`` alone (which then name ``model_type`` unless ``config_class``
    is given)."""
    from transformers import AutoConfig

    overrides = dict(overrides or {})
    bundled = name_or_path in KNOWN_CONFIGS and not os.path.isdir(name_or_path)
    if name_or_path is not None and not bundled:
        require_local_folder(name_or_path)
        config = (config_class or AutoConfig).from_pretrained(name_or_path)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    values = {**KNOWN_CONFIGS.get(name_or_path, {}), **overrides}
    if not values:
        raise ConfigError("a component needs `name_or_path` (hub id or folder) or `config`")
    model_type = values.pop("model_type", None)
    if config_class is None and model_type is None:
        raise ConfigError(f"`config` of {name_or_path or 'a random model'} needs `model_type`")
    try:
        return config_class(**values) if config_class is not None else AutoConfig.for_model(model_type, **values)
    except Exception as error:  # a mistyped value (huggingface_hub's strict dataclasses), an unknown model_type
        detail = str(error).strip().replace("\n", " ")[:300]
        raise ConfigError(f"`config` of {name_or_path or 'a random ' + str(model_type or 'model')}: {detail}") from error
