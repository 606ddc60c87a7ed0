"""SentencePiece tokenizers (LLaMA / Vicuna, MiniGPT-5's LLM) load with mmgen's dependencies, and a
missing package is named instead of transformers' misleading tiktoken message."""

import subprocess
import sys

import pytest

from mmgen.errors import ConfigError


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    """A tiny SentencePiece BPE model in a LLaMA tokenizer folder (trained in milliseconds)."""
    import json

    import sentencepiece

    folder = tmp_path_factory.mktemp("llama_tokenizer")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(["a cat sits on the mat", "the dog runs in the park", "hello world"] * 40))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=40,
                                             model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                             minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    corpus.unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}))
    return folder


def test_sentencepiece_and_protobuf_are_installed():
    from mmgen.components.tokenizers import missing_packages

    assert missing_packages() == []


def test_a_sentencepiece_tokenizer_loads(llama_tokenizer):
    from mmgen.components.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(str(llama_tokenizer))
    ids = tokenizer("a cat").input_ids
    assert "Llama" in type(tokenizer).__name__ and tokenizer.decode(ids, skip_special_tokens=True) == "a cat"


def test_a_missing_package_is_named(llama_tokenizer, monkeypatch):
    from transformers import AutoTokenizer

    from mmgen.components import tokenizers

    def fails(*args, **kwargs):  # what transformers raises without sentencepiece
        raise ValueError("`tiktoken` is required to read a `tiktoken` file. Install it with `pip install tiktoken`.")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fails)
    monkeypatch.setattr(tokenizers, "missing_packages", lambda: ["sentencepiece"])
    with pytest.raises(ConfigError, match=r"llama_tokenizer\d*: its tokenizer is a SentencePiece tokenizer.model, which "
                                          r"needs the sentencepiece package: pip install sentencepiece"):
        tokenizers.load_tokenizer(str(llama_tokenizer))
    monkeypatch.setattr(tokenizers, "missing_packages", lambda: [])  # installed: transformers' error stands
    with pytest.raises(ValueError, match="tiktoken"):
        tokenizers.load_tokenizer(str(llama_tokenizer))


def test_without_sentencepiece_the_real_error_is_explained(llama_tokenizer):
    """In a process where sentencepiece cannot be imported, as in an environment without it."""
    script = ("import sys; sys.modules['sentencepiece'] = None\n"
              "import mmgen\n"
              "from mmgen.components.tokenizers import load_tokenizer\n"
              f"load_tokenizer({str(llama_tokenizer)!r})\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and "needs the sentencepiece package: pip install sentencepiece" in result.stderr
