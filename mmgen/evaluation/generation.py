"""Asking a model for an image, through the inference path users run.

A benchmark asks for an image the way the GILL evaluation does: the method's image tokens are
written after the context (FROMAGe ``[RET]``, GILL ``[IMG0..7]``, MiniGPT-5 its vokens after
``###Assistant:``). ``model.answer`` (``mmgen.methods.answering``) then answers that group from
the prompt's own hidden states, exactly as it answers a user who writes those tokens: the same
sequence format, image encoding, retrieval head, mapper and diffusion.

- :func:`rank_images`: retrieval needs the whole ranking (R@10), which ``answer`` does not return
  (it shows the best image). It runs the same pieces: ``prompt_batch``, the engine's ``decode``
  (the prompt's group states), ``retrieval_head.embed_text`` of the group's first state, and
  ``RetrievalIndex.search`` with the context images excluded.
- :func:`generate_images`: ``model.answer(mode="generate")``, resumable: every image is saved
  with the prompt and seed that made it, and reused when they match (:class:`GenerationCache`).
- :func:`baseline_images`: the papers' text-to-image baseline, the same Stable Diffusion from the
  caption alone (its own text encoder), same seeds and scheduler.

Seeds: the image of item i (in benchmark order) is generated with ``seed + i``, whatever the
batch size and whatever was cached before, so a resumed run gives the images of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from mmgen.errors import ConfigError
from mmgen.evaluation.tasks import Item
from mmgen.inference.types import GeneratedImage


def _is_minigpt5(model) -> bool:
    from mmgen.methods.formats import MiniGPT5Format

    return isinstance(model.sequence_format(), MiniGPT5Format)


def image_request(model, context: list) -> list:
    """``context`` followed by the method's image tokens (the conversation that asks for an image)."""
    ids = model.token_groups(1.0, 1.0)[0].ids
    tokens = "".join(model.llm.tokenizer.convert_ids_to_tokens(list(ids)))
    if _is_minigpt5(model):
        from mmgen.data.minigpt5_samples import ASSISTANT

        # the vokens are the assistant's answer: "###Human: {context} ###Assistant:[IMG0..7]"
        *head, last = context
        if isinstance(last, str) and not last.rstrip().endswith(ASSISTANT):
            last = f"{last} {ASSISTANT}"
        return [*head, last, tokens] if isinstance(last, str) else [*head, last, ASSISTANT, tokens]
    return [*context, tokens]


def _path_key(path) -> str:
    return os.path.normpath(os.path.abspath(str(path)))


def check_lengths(model, items: Sequence[Item], attention_mask: torch.Tensor, extra: int = 1) -> None:
    """DataError naming the first item whose prompt (plus ``extra`` new tokens) is longer than the
    LLM's position embeddings (it would fail deep inside the model with an index error)."""
    from mmgen.errors import DataError
    from mmgen.inference.engine import base_model

    limit = getattr(base_model(model.llm).config, "max_position_embeddings", None)
    if limit is None:
        return
    for item, length in zip(items, attention_mask.sum(dim=1).tolist()):
        if length + extra > limit:
            raise DataError(f"{item.origin}: the prompt is {int(length)} positions long, more than the LLM's "
                            f"{limit} position embeddings allow (use fewer rounds or captions)")


@torch.no_grad()
def rank_images(model, items: Sequence[Item], index, k: int = 10, batch_size: int = 8,
                progress: Callable | None = None) -> list[list[str]]:
    """For each item, the first ``k`` candidate images (paths, best first) for its context, the
    context's own images excluded."""
    from mmgen.inference.engine import DecodingOptions, decode

    if not getattr(model, "retrieves", False) or getattr(model, "retrieval_head", None) is None:
        raise ConfigError(f"{type(model).__name__} has no retrieval head: retrieval benchmarks need FROMAGe or GILL")
    groups = model.token_groups(1.0, 1.0)
    ranked: list[list[str]] = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        embeds, seq = model.prompt_batch([image_request(model, item.context) for item in batch])
        check_lengths(model, batch, seq.attention_mask)
        decoded = decode(model.llm, embeds, seq.attention_mask, groups, DecodingOptions(max_new_tokens=1),
                         prompt_ids=seq.input_ids)
        states = torch.stack([hits[-1].states[0] for hits in decoded.prompt_hits])  # (b, hidden): the request's
        queries = model.retrieval_head.embed_text(states.float())  # (b, e), as images_for_hits does
        results = index.search(queries, k=k, exclude=[item.shown for item in batch])
        ranked += [[_path_key(hit.path) for hit in hits] for hits in results]
        if progress:
            progress(len(batch))
    return ranked


def image_generator_of(model):
    generator = getattr(model, "image_generator", None) or getattr(model, "generator", None)
    if generator is None:
        raise ConfigError(f"{type(model).__name__} has no image generator: generation benchmarks need GILL or MiniGPT-5")
    return generator


@dataclass
class GenerationOptions:
    """How benchmark images are made (the papers: guidance 7.5, 50 PNDM steps, seed 42)."""

    seed: int = 42
    guidance_scale: float = 7.5
    num_inference_steps: int = 50
    scheduler: str | None = "pndm"

    def record(self) -> dict:
        return dict(seed=self.seed, guidance_scale=self.guidance_scale,
                    num_inference_steps=self.num_inference_steps, scheduler=self.scheduler)


def _describe(conversation: list) -> list:
    return [part if isinstance(part, str) else {"image": str(part.path)} for part in conversation]


class GenerationCache:
    """Generated images of one setting in a folder: ``{n:05d}_{id}.png`` and, beside each,
    ``.json`` with the prompt (conversation or caption), seed, options and the model. An image is
    reused only when its record matches the request exactly."""

    def __init__(self, folder: str | Path, model_source: str):
        self.folder = Path(folder)
        self.model_source = model_source

    def _stem(self, n: int, item: Item) -> Path:
        from mmgen.inference.report import slug

        return self.folder / f"{n:05d}_{slug(item.id)}"

    def record(self, prompt, seed: int, options: GenerationOptions) -> dict:
        return {"prompt": prompt, "seed": seed, "options": options.record(), "model": self.model_source}

    def get(self, n: int, item: Item, record: dict) -> Path | None:
        stem = self._stem(n, item)
        png, meta = stem.with_suffix(".png"), stem.with_suffix(".json")
        if not (png.is_file() and meta.is_file()):
            return None
        try:
            stored = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # damaged by an interrupted run: made again
        stored.pop("id", None)
        return png if stored == record else None

    def put(self, n: int, item: Item, image: Image.Image, record: dict) -> Path:
        stem = self._stem(n, item)
        self.folder.mkdir(parents=True, exist_ok=True)
        png = stem.with_suffix(".png")
        tmp = png.with_suffix(".tmp.png")
        image.save(tmp, format="PNG")
        os.replace(tmp, png)  # the record is written after the image: a record means a whole image
        stem.with_suffix(".json").write_text(json.dumps({"id": item.id, **record}, indent=1))
        return png


def _contiguous_runs(indices: list[int], size: int) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < size:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _produce(items: Sequence[Item], cache: GenerationCache, options: GenerationOptions, prompts: list,
             make: Callable[[list[int], int], list[Image.Image]], batch_size: int,
             progress: Callable | None) -> tuple[list[Path], int]:
    """Cached images where they match, ``make(indices, first_seed)`` for the rest; (paths, made)."""
    paths: list[Path | None] = []
    for n, item in enumerate(items):
        paths.append(cache.get(n, item, cache.record(prompts[n], options.seed + n, options)))
    todo = [n for n, p in enumerate(paths) if p is None]
    if progress and len(items) - len(todo):
        progress(len(items) - len(todo))
    for run in _contiguous_runs(todo, batch_size):
        images = make(run, options.seed + run[0])
        if len(images) != len(run):
            raise RuntimeError(f"asked for {len(run)} images, got {len(images)}")
        for n, image in zip(run, images):
            paths[n] = cache.put(n, items[n], image, cache.record(prompts[n], options.seed + n, options))
        if progress:
            progress(len(run))
    return paths, len(todo)


def generate_images(model, items: Sequence[Item], cache: GenerationCache, options: GenerationOptions,
                    batch_size: int = 8, progress: Callable | None = None) -> tuple[list[Path], int]:
    """The model's image for each item's context (its image tokens appended), via ``model.answer``;
    (image paths, number newly generated)."""
    image_generator_of(model)
    mode = "auto" if _is_minigpt5(model) else "generate"
    conversations = [image_request(model, item.context) for item in items]

    def make(run: list[int], first_seed: int) -> list[Image.Image]:
        # the prompts' lengths from their tokens alone (answer() encodes the images once, below)
        fmt = model.sequence_format()
        seq = fmt.collate([fmt.prompt(conversations[n])[0] for n in run], padding_side="left")
        check_lengths(model, [items[n] for n in run], seq.attention_mask)
        answers = model.answer([conversations[n] for n in run], mode=mode, max_new_tokens=1, seed=first_seed,
                               guidance_scale=options.guidance_scale,
                               num_inference_steps=options.num_inference_steps, scheduler=options.scheduler)
        images = []
        for n, answer in zip(run, answers):
            made = [p for p in answer.parts if isinstance(p, GeneratedImage)]
            if not made:
                raise RuntimeError(f"{items[n].origin}: the model answered the image request without an image")
            images.append(made[0].image)
        return images

    return _produce(items, cache, options, [_describe(c) for c in conversations], make, batch_size, progress)


@torch.no_grad()
def baseline_images(model, items: Sequence[Item], cache: GenerationCache, options: GenerationOptions,
                    batch_size: int = 8, progress: Callable | None = None) -> tuple[list[Path], int]:
    """The text-to-image baseline: the model's Stable Diffusion from each item's caption alone."""
    from mmgen.data.images import to_pil

    generator = image_generator_of(model)
    missing = [item.origin for item in items if not item.caption]
    if missing:
        raise ConfigError(f"{missing[0]}: no caption for the text-to-image baseline")

    def make(run: list[int], first_seed: int) -> list[Image.Image]:
        captions = [items[n].caption for n in run]
        prompt = generator.encode_captions(captions)  # (b, 77, d): SD's own conditioning
        images = generator.generate(prompt, None, num_inference_steps=options.num_inference_steps,
                                    guidance_scale=options.guidance_scale, scheduler=options.scheduler,
                                    seeds=[first_seed + j for j in range(len(run))])
        return [to_pil(image.cpu()) for image in images]

    return _produce(items, cache, options, [item.caption for item in items], make, batch_size, progress)


def answer_texts(model, conversations: list, batch_size: int = 8, seed: int = 42, max_new_tokens: int = 32,
                 progress: Callable | None = None) -> list:
    """``model.answer`` for each conversation with the method's decoding defaults; the Answers."""
    answers = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        answers += model.answer(batch, max_new_tokens=max_new_tokens, seed=seed + start)
        if progress:
            progress(len(batch))
    return answers

