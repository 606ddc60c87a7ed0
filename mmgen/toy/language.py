"""The toy world's causal LMs: an OPT-style one (FROMAGe, GILL) and a LLaMA-style one (MiniGPT-5),
trained on the world's captions, stories and dialogues in the methods' own templates."""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from mmgen.toy.training import fit, save_trained

# Small enough to train in about a minute on 2 cores; deep enough to track a story's state.
OPT_CONFIG = dict(model_type="opt", hidden_size=64, word_embed_proj_dim=64, ffn_dim=256, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=512, dropout=0.0, attention_dropout=0.0,
                  do_layer_norm_before=True)
LLAMA_CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                    tie_word_embeddings=False)
# Initial spread of the token embeddings (transformers' default for these models: 0.02). In the
# captions every value of an attribute is equally likely wherever it appears, so the values' (tied)
# embeddings receive nearly the same gradients: from 0.02 they collapsed onto one vector (cosine
# 0.98 between the colours in the first toy OPT), and the state at a caption's end barely differed
# from caption to caption beside a large part shared by all, which FROMAGe's linear maps could not
# pick up in minutes (its [RET] retrieval stayed at 0.05). From 0.1 they stay apart (cosine about
# 0.7) and FROMAGe learns (docs/toy_world.md; 0.3 spread them further but FROMAGe did worse).
EMBEDDING_STD = 0.1


def build_lm(family: str, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(OPT_CONFIG if family == "opt" else LLAMA_CONFIG)
    model_type = values.pop("model_type")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values, **ids))
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]  # in this order: reproducible
    with torch.no_grad():
        for embedding in embeddings[:1] if embeddings[1].weight is embeddings[0].weight else embeddings:  # OPT: tied
            embedding.weight.normal_(0.0, EMBEDDING_STD)
            if getattr(embedding, "padding_idx", None) is not None:  # the lm_head is a Linear
                embedding.weight[embedding.padding_idx].zero_()
    return model


def _batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")  # (b, t), "</s>" first
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return {**encoded, "labels": labels}


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], batch_size: int = 64) -> float:
    """exp(mean next-token loss over all predicted tokens of ``texts``)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = _batch(tokenizer, texts[i:i + batch_size])
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    return math.exp(total / count)


def train_lm(family: str, tokenizer, texts: list[str], out_dir: Path, steps: int = 3000, batch_size: int = 32,
             lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Train an LM of ``family`` ("opt" or "llama") on ``texts``; save it and the tokenizer to
    ``out_dir``. Returns the loop's numbers.

    The rate and length are what let the LMs answer from a caption (`answer_accuracy`), which
    FROMAGe's [RET] and GILL's [IMG] states need: at 3e-3 the OPT answered shape, colour, size and
    background at chance after 600 or 3000 steps, and did not learn to copy a value back even on
    restatements alone; at 1e-3 it learns on restatements alone in 1200 steps, and from the whole
    mix in 3000 steps (docs/toy_world.md)."""
    torch.manual_seed(seed)
    model = build_lm(family, tokenizer)
    rng = random.Random(seed)
    # Texts of similar length together: far less padding per batch.
    order = sorted(texts, key=len)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    model.train()
    result = fit(model.parameters(), lambda step: model(**_batch(tokenizer, rng.choice(chunks))).loss,
                 steps=steps, lr=lr, log=log, name=family)
    return save_trained(model, tokenizer, out_dir, result)


# -- does the LM answer from the caption? -------------------------------------------------------------
@torch.no_grad()
def answer_accuracy(model, tokenizer, captions: list[str]) -> dict[str, float]:
    """Per attribute, how often the LM's most likely value after "<caption> . what <attribute> ...
    ?" (a restatement's question, `mmgen.data.toy.RESTATE_QUESTIONS`) is the caption's own, among
    the attribute's values (first word of each; chance 1 / number of values). An LM at chance here
    does not read the caption back, whatever its perplexity."""
    from mmgen.data.toy import ATTRIBUTE_VALUES, RESTATE_QUESTIONS, parse_caption

    model.eval()
    scenes = [parse_caption(c) for c in captions]
    accuracy = {}
    for attribute, question in RESTATE_QUESTIONS.items():
        words = sorted({value.split()[0] for value in ATTRIBUTE_VALUES[attribute]})
        word_ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in words]
        asked = [f"{c} . {question.split('{')[0].strip()}" for c in captions]
        encoded = tokenizer(asked, padding=True, return_tensors="pt")  # (n, t), right-padded
        logits = model(**encoded).logits  # (n, t, vocab)
        last = encoded["attention_mask"].sum(1) - 1  # (n,)
        chosen = logits[torch.arange(len(captions)), last][:, word_ids].argmax(-1)  # (n,)
        right = [words[int(i)] == getattr(s, attribute).split()[0] for i, s in zip(chosen, scenes)]
        accuracy[attribute] = round(sum(right) / len(right), 4)
    return accuracy


# -- does the LM's state carry the caption? ---------------------------------------------------------
@torch.no_grad()
def caption_states(model, tokenizer, captions: list[str], suffix: str = "", layer: int = -1,
                   batch_size: int = 256) -> torch.Tensor:
    """(n, hidden) hidden states of ``layer`` at the last token of each "caption + suffix": with no
    suffix, the caption's last word; with ``suffix=" ."`` the separator after it (where FROMAGe's
    [RET] and GILL's [IMG] tokens sit: right after the caption)."""
    model.eval()
    states = []
    for i in range(0, len(captions), batch_size):
        encoded = tokenizer([c + suffix for c in captions[i:i + batch_size]], padding=True,
                            return_tensors="pt")  # (b, t), right-padded
        hidden = model(**encoded, output_hidden_states=True).hidden_states[layer]  # (b, t, d)
        last = encoded["attention_mask"].sum(1) - 1  # (b,)
        states.append(hidden[torch.arange(len(last)), last])
    return torch.cat(states)


def probe_recall(states: torch.Tensor, features: torch.Tensor, val_states: torch.Tensor,
                 val_features: torch.Tensor, fit: str = "contrastive", steps: int = 400, seed: int = 0) -> float:
    """Held-out text-to-image recall@1 of a linear probe from text ``states`` (n, d) to image
    ``features`` (n, f) (the i-th state describes the i-th image; the held-out ones likewise):

    - ``"contrastive"``: FROMAGe's retrieval head and optimiser on the raw states, as the toy
      config trains them: two linear maps into a shared 64-d space, InfoNCE with a learned
      temperature, AdamW (lr 3e-3, betas 0.9/0.95), ``steps`` batches of 32, gradients clipped at 1.
      It fails where the states differ from caption to caption only in a small part beside a large
      shared one (what FROMAGe met on the first toy LMs: 0.05).
    - ``"least_squares"``: a ridge regression from the standardised states onto the image
      features, ranked by cosine: how much is linearly there at all, whatever its scale. It is
      stricter than retrieval needs in one way: CLIP's image features are not additive in the five
      attributes (from a one-hot code of them it reaches about 0.73; with their pairwise products,
      0.99), so it also asks the states for the attributes' interactions.

    Written by hand: a few lines of torch, and no library probes frozen states against images."""
    from mmgen.methods.losses import symmetric_infonce  # (mmgen.methods imports every method)

    generator = torch.Generator().manual_seed(seed)
    if fit == "least_squares":
        mean, std = states.mean(0), states.std(0) + 1e-6  # statistics of the training pairs
        x, x_val = (torch.nn.functional.pad((h - mean) / std, (0, 1), value=1.0) for h in (states, val_states))
        weights = torch.linalg.solve(x.T @ x + 1e-3 * len(x) * torch.eye(x.shape[1]), x.T @ features)  # (d+1, f)
        text, image = x_val @ weights, val_features  # (m, f), (m, f)
    elif fit == "contrastive":
        torch.manual_seed(seed)
        text_proj, image_proj = torch.nn.Linear(states.shape[1], 64), torch.nn.Linear(features.shape[1], 64)
        logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        params = [*text_proj.parameters(), *image_proj.parameters(), logit_scale]
        optimizer = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
        with torch.enable_grad():
            for _ in range(steps):
                batch = torch.randperm(len(states), generator=generator)[:32]
                t = torch.nn.functional.normalize(text_proj(states[batch]), dim=-1)  # (32, 64)
                v = torch.nn.functional.normalize(image_proj(features[batch]), dim=-1)  # (32, 64)
                loss = symmetric_infonce(t, v, logit_scale)  # FROMAGe's contrastive loss
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
        text, image = text_proj(val_states), image_proj(val_features)
    else:
        raise ValueError(f"fit must be 'contrastive' or 'least_squares', not {fit!r}")
    similarity = torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(image, dim=-1).T
    return round((similarity.argmax(1) == torch.arange(len(similarity))).float().mean().item(), 4)


@torch.no_grad()
def caption_probe_recall(model, tokenizer, world: Path, clip_dir: Path | None = None, suffix: str = "",
                         layer: int = -1, n_train: int = 4096) -> dict:
    """How much of the caption a frozen LM's state carries, in FROMAGe's terms: linear probes
    (`probe_recall`, both kinds) from the LM's state at the caption's end (`caption_states`) to
    the frozen CLIP vision features (FROMAGe's visual encoder, ``clip_dir``, default the shipped
    one) of the caption's image, fitted on ``n_train`` training pairs of ``world``, scored by
    text-to-image recall@1 among its held-out images. A check of seconds, to iterate on LMs
    before minutes of FROMAGe. Returns {"contrastive_R@1", "least_squares_R@1", "n"}."""
    from mmgen.components.clip_vision import CLIPVisionEncoder
    from mmgen.toy import TOY_WORLD_DIR
    from mmgen.toy.data import caption_pairs

    encoder = CLIPVisionEncoder(name_or_path=str(clip_dir or TOY_WORLD_DIR / "clip"))
    encoder.configure()

    def pairs(split, n=None):
        images, captions = caption_pairs(world, split)
        images, captions = images[:n], captions[:n]
        features = torch.cat([encoder(images[i:i + 256])[:, 0] for i in range(0, len(images), 256)])  # (n, f)
        return caption_states(model, tokenizer, captions, suffix, layer).float(), features.float()  # (n, d), (n, f)

    train, val = pairs("train", n_train), pairs("val")
    return {f"{fit}_R@1": probe_recall(*train, *val, fit=fit) for fit in ("contrastive", "least_squares")} | {
        "n": len(val[0])}
