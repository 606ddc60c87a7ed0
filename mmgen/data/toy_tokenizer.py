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
    backend = Tokenizer(WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.add_tokens([AddedToken(word, normalized=False) for word in UNSPLIT_WORDS])
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.post_processor = TemplateProcessing(
        single="</s> $A",  # BOS first, as OPT's tokenizer does
        pair="</s> $A </s> $B:1",
        special_tokens=[("</s>", words.index("</s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


if __name__ == "__main__":
    build_toy_tokenizer().save_pretrained(TOY_TOKENIZER_DIR)
    print(f"wrote {TOY_TOKENIZER_DIR}")
