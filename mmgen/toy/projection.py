"""The toy world's ``llama_proj``: MiniGPT-4's first stage, which MiniGPT-5 starts from.

MiniGPT-4 trains one linear layer between a frozen Q-Former and a frozen LLM so that the LLM
describes images; MiniGPT-5 loads it frozen (``QFormerEncoder(projection=...)``). Here the
frozen parts are the toy ``qformer/`` and ``llama/``, the images are the world's, and each one is
asked about in the world's own dialogue template, built by the MMDialog reader's sample code:

    <system prompt> ###Human: what is in this picture ? <Img>[4 query tokens]</Img> ###Assistant:
        --> "<caption> ###"  (the only supervised tokens)

Saved as MiniGPT-4 saves it (``{"model": {"llama_proj.weight", "llama_proj.bias"}}``), which
``QFormerEncoder`` reads like the real ``prerained_minigpt4_7b.pth``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from mmgen.toy.training import fit

PROJECTION_FILE = "llama_proj.pth"


def dialogue_samples(captions: list[str]):
    """One MiniGPT-5 sample per caption: its image asked about, the caption answered."""
    from mmgen.data.mmdialog import conversation_samples
    from mmgen.data.toy import DIALOGUE_QUESTION

    placeholder = Path("image")  # the sample code only needs to know a turn has an image
    return [conversation_samples([(DIALOGUE_QUESTION, placeholder), (caption, None)])[0] for caption in captions]


def _captioning(qformer_dir: Path, llama_dir: Path, captions: list[str], projection_file: Path | None = None,
                seed: int = 0):
    """(frozen LLM, QFormerEncoder sized for it, the captions' sample sequences, pad id): the
    MiniGPT-5 model's frozen parts and input format, for training or scoring ``llama_proj``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmgen.components.qformer import QFormerEncoder
    from mmgen.methods.formats import MiniGPT5Format

    llm = AutoModelForCausalLM.from_pretrained(llama_dir).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    encoder = QFormerEncoder(name_or_path=str(qformer_dir), dtype="float32", seed=seed,
                             projection=str(projection_file) if projection_file else None)
    encoder.configure(embed_dim=llm.config.hidden_size)
    fmt = MiniGPT5Format(tokenizer, encoder.n_tokens, voken_ids=[])
    sequences = [fmt.source_segments(s.source) + fmt.target_segments(s.target) for s in dialogue_samples(captions)]
    return llm, encoder, sequences, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _caption_loss(llm, sequences: list, pad_id: int, image_tokens: torch.Tensor) -> torch.Tensor:
    """The LM loss of the captions given each image's (n, q, d) tokens."""
    from mmgen.data.interleave import collate

    seq = collate(sequences, pad_id)
    embeds = seq.embed(llm.get_input_embeddings(), image_tokens)  # (b, t, d)
    return llm(inputs_embeds=embeds, attention_mask=seq.attention_mask, labels=seq.labels).loss


def train_projection(qformer_dir: Path, llama_dir: Path, images: torch.Tensor, captions: list[str], out_file: Path,
                     steps: int = 400, batch_size: int = 32, lr: float = 1e-2, seed: int = 0, log=print) -> dict:
    """Train ``llama_proj`` (Q-Former width -> LLM width) by captioning through the frozen
    LLM; write it to ``out_file``. ``images``: (n, 3, s, s) in [0, 1]."""
    torch.manual_seed(seed)
    llm, encoder, sequences, pad_id = _captioning(qformer_dir, llama_dir, captions, seed=seed)
    with torch.no_grad():  # the frozen visual path, once: (n, q, d_qformer)
        features = torch.cat([encoder.query_features(images[i:i + 256]) for i in range(0, len(images), 256)])
    projection = encoder.llama_proj.requires_grad_(True)
    rng = random.Random(seed)

    def loss(step: int) -> torch.Tensor:
        chosen = rng.sample(range(len(sequences)), batch_size)
        return _caption_loss(llm, [sequences[i] for i in chosen], pad_id, projection(features[chosen]))

    result = fit(projection.parameters(), loss, steps=steps, lr=lr, log=log, name="llama_proj")
    state = {f"llama_proj.{k}": v.detach().clone() for k, v in projection.state_dict().items()}
    torch.save({"model": state}, out_file)
    result["parameters"] = sum(v.numel() for v in state.values())
    return result


@torch.no_grad()
def caption_loss(qformer_dir: Path, llama_dir: Path, images: torch.Tensor, captions: list[str],
                 projection_file: Path | None) -> float:
    """Mean caption loss (nats per token) of held-out images through ``projection_file`` (None:
    the random projection MiniGPT-5 would otherwise get)."""
    llm, encoder, sequences, pad_id = _captioning(qformer_dir, llama_dir, captions, projection_file)
    return round(float(_caption_loss(llm, sequences, pad_id, encoder(images))), 4)
