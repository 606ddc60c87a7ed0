"""Loading a tokenizer, with a clear error when a SentencePiece tokenizer lacks its packages.

LLaMA / Vicuna (MiniGPT-5's LLM) ship a SentencePiece ``tokenizer.model``. transformers reads it
with the ``sentencepiece`` package (and ``protobuf`` for some conversions); without them it falls
back to reading the file as a tiktoken vocabulary and reports that *tiktoken* is missing, which
sends users after the wrong package. Both are mmgen dependencies, so this only happens in an
environment installed without them (``pip install --no-deps``, a prepared GPU image).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mmgen.errors import ConfigError

#: import name -> pip name of what a SentencePiece tokenizer needs
SENTENCEPIECE_PACKAGES = {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}
#: words in transformers' error messages when it could not read a SentencePiece model
_SYMPTOMS = ("tiktoken", "sentencepiece", "protobuf")


def missing_packages() -> list[str]:
    """pip names of the SentencePiece packages that are not installed."""
    missing = []
    for module, pip_name in SENTENCEPIECE_PACKAGES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # the parent package (google) is missing
            found = False
        if not found:
            missing.append(pip_name)
    return missing


def dependency_error(name_or_path: str, error: Exception) -> ConfigError | None:
    """The clear error for ``error`` (raised while loading ``name_or_path``'s tokenizer) if it
    comes from a missing SentencePiece package; None if it does not."""
    missing = missing_packages()
    if not missing or not any(word in str(error).lower() for word in _SYMPTOMS):
        return None
    folder = Path(name_or_path)
    what = ("a SentencePiece tokenizer.model" if (folder / "tokenizer.model").is_file()
            else "a SentencePiece tokenizer (LLaMA / Vicuna)")
    return ConfigError(
        f"{name_or_path}: its tokenizer is {what}, which needs the {' and '.join(missing)} package"
        f"{'s' if len(missing) > 1 else ''}: pip install {' '.join(missing)} (they are mmgen dependencies; "
        f"transformers' own message, about tiktoken, names the wrong package). It said: {error}"
    )


def load_tokenizer(name_or_path: str, **kwargs):
    """``AutoTokenizer.from_pretrained(name_or_path, **kwargs)``; a missing SentencePiece package
    raises ConfigError saying which and how to install it."""
    from transformers import AutoTokenizer

    from mmgen.components.hub import require_local_folder

    name = str(name_or_path)
    require_local_folder(name, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (ImportError, ValueError, OSError) as error:
        explained = dependency_error(name, error)
        if explained is not None:
            raise explained from error
        raise ConfigError(f"{name}: cannot load the tokenizer (not a local folder with tokenizer files, and "
                          f"not available from the model hub offline?): {str(error).splitlines()[0][:300]}") from error
