"""A word-level tokenizer for the toy world, shaped like OPT's where models depend on it.

Like OPT's tokenizer it prepends `</s>` (OPT's BOS and EOS are the same token) to every encoding,
so code paths that handle OPT's BOS are exercised by the tiny test models. The saved copy in
`mmgen/assets/toy_tokenizer/` loads offline with `AutoTokenizer.from_pretrained(TOY_TOKENIZER_DIR)`;
regenerate it with `python -m mmgen.data.toy_tokenizer` after changing the vocabulary.
"""

from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from mmgen.data.toy import toy_vocabulary

TOY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_tokenizer"

# Fixed ids first: pad 0 and BOS/EOS 1 as in OPT; unknown words map to 2.
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
# Words for prompts and dialogue templates in tests and the demo (MiniGPT-5's "###Human:" turns).
PROMPT_WORDS = [
    "image", "picture", "scene", "caption", "description", "generate", "show", "tell", "describe",
    "draw", "see", "what", "is", "in", "an", "with", "the", "this", "it", "of", "and", "by", "me", "you",
    "next", ":", ".", ",", "?", "###Human:", "###Assistant:",
]  # fmt: skip
# Words the Whitespace pre-tokenizer would split ("###Human:" -> "###", "Human", ":"); matched
# whole, before pre-tokenization, as added (non-special) tokens.
UNSPLIT_WORDS = ["###Human:", "###Assistant:"]


def build_toy_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Build the toy tokenizer in-process: special tokens, then the toy vocabulary, then prompt
    words; with ``vocab_size``, filler words ``<extra_i>`` up to that many (a stand-in for a real
    vocabulary's size in random-weight benchmarks, e.g. OPT's 50265)."""
    words = SPECIAL_TOKENS + toy_vocabulary()
    words += [word for word in PROMPT_WORDS if word not in words]
    words += [f"<extra_{i}>" for i in range(max(0, (vocab_size or 0) - len(words)))]
    return _word_level_tokenizer(words, SPECIAL_TOKENS, bos="</s>", single="</s> $A", pair="</s> $A </s> $B:1")


def _word_level_tokenizer(words: list[str], special: list[str], bos: str, single: str, pair: str,
                          model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.add_tokens([AddedToken(word, normalized=False) for word in UNSPLIT_WORDS])
    backend.add_special_tokens(special)
    backend.post_processor = TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, words.index(t)) for t in ("</s>", bos)]
    )
    extra = {"model_max_length": model_max_length} if model_max_length is not None else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        **extra,
    )


# -- the toy world's tokenizer (`mmgen toy pretrain`) ---------------------------------------------
# "<s>" is a BOS distinct from "</s>" for the CLIP text encoder, which pools at the first "</s>".
WORLD_SPECIAL_TOKENS = SPECIAL_TOKENS + ["<s>"]


def method_template_texts() -> list[str]:
    """The fixed strings the methods put around the data (MiniGPT-5's system prompts, instructions
    and task templates, the dialogue roles): the LMs must know every word of them."""
    from mmgen.data.minigpt5_samples import (
        ASSISTANT, CC3M_INSTRUCTIONS, CC3M_SYSTEM_PROMPT, END, HUMAN, IMAGE_IN_PROMPT, IMAGE_PLACEHOLDER,
    )
    from mmgen.data.mmdialog import MMDIALOG_SYSTEM_PROMPT
    from mmgen.data.vist import TEMPLATES, VIST_SYSTEM_PROMPT

    texts = [CC3M_SYSTEM_PROMPT, *CC3M_INSTRUCTIONS, MMDIALOG_SYSTEM_PROMPT, VIST_SYSTEM_PROMPT, HUMAN, ASSISTANT, END,
             IMAGE_IN_PROMPT, *(t.format(history="", caption="") for group in TEMPLATES.values() for t in group)]
    # MiniGPT-5 adds "<ImageHere>" as a token of its own: the text around it splits differently then.
    return texts + [t.replace(IMAGE_PLACEHOLDER, " ") for t in texts] + PROMPT_WORDS + toy_vocabulary()


def world_words() -> list[str]:
    """The world tokenizer's words, in id order: every piece the pre-tokenizer cuts from the
    world's texts and the method templates, sorted (so the ids do not depend on import order)."""
    from mmgen.data.toy import world_texts

    backend = Tokenizer(WordLevel(vocab={"<unk>": 0}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    pieces = set(UNSPLIT_WORDS)
    for text in world_texts() + method_template_texts():
        for chunk in text.replace(UNSPLIT_WORDS[0], " ").replace(UNSPLIT_WORDS[1], " ").split():
            pieces |= {piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(chunk)}
    return WORLD_SPECIAL_TOKENS + sorted(pieces - set(WORLD_SPECIAL_TOKENS))


def build_world_tokenizer(clip: bool = False) -> PreTrainedTokenizerFast:
    """The toy world's tokenizer. For the LMs (default) OPT-shaped like `build_toy_tokenizer`
    ("</s>" first); with ``clip`` shaped like CLIP's ("<s> ... </s>", at most 77 tokens) for the
    CLIP text encoder, which pools the hidden state at the "</s>". Same words, same ids."""
    words = world_words()
    if clip:
        return _word_level_tokenizer(words, WORLD_SPECIAL_TOKENS, bos="<s>", single="<s> $A </s>",
                                     pair="<s> $A </s> $B:1 </s>:1", model_max_length=77)
    return _word_level_tokenizer(words, WORLD_SPECIAL_TOKENS, bos="</s>", single="</s> $A",
                                 pair="</s> $A </s> $B:1")


if __name__ == "__main__":
    build_toy_tokenizer().save_pretrained(TOY_TOKENIZER_DIR)
    print(f"wrote {TOY_TOKENIZER_DIR}")
