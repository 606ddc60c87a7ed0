"""Answering conversations: the inference path FROMAGe, GILL and MiniGPT-5 share.

    conversations --format.prompt--> segments + input images --collate(left)--> ids, mask
    input images --encode_input_images--> (n, k, d), scattered into the image slots
    --mmgen.inference.engine.decode (generate + KV cache, token groups)--> new tokens and,
      per completed group, its hidden states (r, hidden)
    --images_for_hits (the method's own part)--> retrieved and/or generated images per group
    --> Answer(parts=[TextPart, RetrievedImage | GeneratedImage, TextPart, ...]) per conversation

A method supplies its sequence format, how it encodes input images, its token group and decoding
defaults, and what a group becomes (:meth:`AnswersConversations.images_for_hits`). Everything
else, including ``predict_step`` on ``{"conversations": [...], "ids": [...], "index": ...,
"options": {...}}`` batches, is here.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mmgen.errors import ConfigError, DataError

MODES = ("auto", "retrieve", "generate", "both")


@dataclass
class ImageOptions:
    """How images are generated.

    Args:
        guidance_scale: Classifier-free guidance scale (the papers: 7.5).
        num_inference_steps: Denoising steps (25 with DPM-Solver; the papers: 50 with PNDM).
        scheduler: "dpm", "pndm", "ddim", "euler", a diffusers scheduler class name, or None
            for the generator's own.
        seed: Seed of the first generated image of a call; image i gets seed + i. None: random
            seeds (still reported in each ``GeneratedImage.seed``).
    """

    guidance_scale: float = 7.5
    num_inference_steps: int = 25
    scheduler: str | None = "dpm"
    seed: int | None = None

    def seeds(self, n: int) -> list[int]:
        if self.seed is not None:
            return [self.seed + i for i in range(n)]
        return torch.randint(0, 2**31 - 1, (n,)).tolist()


@dataclass
class AnswerContext:
    """What ``images_for_hits`` may need besides the hits."""

    conversations: list
    index: Any  # a RetrievalIndex (mmgen.inference.index) or None
    mode: str
    image_options: ImageOptions
    extra: dict = field(default_factory=dict)  # method-specific (GILL: decision_head)

    def shown_paths(self, row: int) -> set[str]:
        """Image files the conversation already shows (never retrieved again)."""
        from mmgen.inference.types import ImageRef

        return {part.path for part in self.conversations[row] if isinstance(part, ImageRef)}


class AnswersConversations:
    """Mixin of the method LightningModules: ``answer(conversations, ...) -> list[Answer]`` and
    ``predict_step``. Subclasses implement the hooks below."""

    #: DecodingOptions fields that differ from the engine's defaults for this method.
    decoding_defaults: dict = {}
    #: Whether the method retrieves images (uses a retrieval index); one that does not ignores it.
    retrieves: bool = True

    # -- hooks ---------------------------------------------------------------------------------
    def sequence_format(self):
        raise NotImplementedError

    def encode_input_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) in [0, 1] -> (n, k, d) LLM input embeddings."""
        raise NotImplementedError

    def input_image_size(self) -> int:
        return int(self.visual_encoder.image_size)

    def token_groups(self, ret_scale_factor: float, gen_scale_factor: float) -> list:
        raise NotImplementedError

    def check_mode(self, mode: str, index) -> None:
        """ConfigError for a mode this method cannot run."""

    def images_for_hits(self, hits: list, context: AnswerContext) -> list[list]:
        """For each ``(row, GroupHit)``, the answer parts (RetrievedImage / GeneratedImage) that
        stand where the group was produced."""
        raise NotImplementedError

    # -- answering -----------------------------------------------------------------------------
    @torch.no_grad()
    def answer(
        self,
        conversations: Sequence,
        index=None,
        mode: str = "auto",
        *,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        repetition_penalty: float | None = None,
        stop_strings: Sequence[str] | None = None,
        ret_scale_factor: float = 1.0,
        gen_scale_factor: float = 1.0,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 25,
        scheduler: str | None = "dpm",
        seed: int | None = None,
        logits_processors: list | None = None,
        decision_head=None,
    ) -> list:
        """Answer each conversation (a list of str / ``ImageRef`` / PIL parts) with text,
        retrieved and generated images, in one batch. Decoding options left None take the
        method's defaults (``decoding_defaults``); ``mode`` says which images GILL makes
        ("auto": a decision module, ``decision_head``, by default the model's own);
        ``index`` is a ``RetrievalIndex`` for retrieval. docs/inference.md lists the options."""
        from mmgen.inference.engine import DecodingOptions, decode

        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, not {mode!r}")
        conversations = list(conversations)
        if not conversations:
            return []
        if not self.retrieves:
            index = None
        self.check_mode(mode, index)
        if index is not None:
            self._check_index(index)
        given = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, top_p=top_p, temperature=temperature,
                     repetition_penalty=repetition_penalty,
                     stop_strings=tuple(stop_strings) if stop_strings is not None else None)
        settings = {**self.decoding_defaults, **{k: v for k, v in given.items() if v is not None}}
        options = DecodingOptions(**settings, seed=seed, logits_processors=list(logits_processors or []))
        groups = self.token_groups(ret_scale_factor, gen_scale_factor)

        embeds, seq = self.prompt_batch(conversations)
        decoded = decode(self.llm, embeds, seq.attention_mask, groups, options, prompt_ids=seq.input_ids)

        # groups the prompt already holds ("a caption [RET]") are answered first, then the new ones
        flat = [(row, hit) for row in range(len(conversations))
                for hit in decoded.prompt_hits[row] + decoded.hits[row]]
        context = AnswerContext(conversations, index, mode,
                                ImageOptions(guidance_scale, num_inference_steps, scheduler, seed),
                                {"decision_head": decision_head or getattr(self, "decision_head", None)})
        images = self.images_for_hits(flat, context) if flat else []
        by_hit = {id(hit): parts for (_, hit), parts in zip(flat, images)}
        return [self._assemble(tokens, hits, prompt_hits, groups, options.stop_strings, by_hit)
                for tokens, hits, prompt_hits in zip(decoded.tokens, decoded.hits, decoded.prompt_hits)]

    def prompt_inputs(self, conversations: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings (b, t, d) and attention mask (b, t) of conversations."""
        embeds, seq = self.prompt_batch(conversations)
        return embeds, seq.attention_mask

    def prompt_batch(self, conversations: list):
        """Left-padded prompt embeddings (b, t, d) and the collated batch (ids, mask) they came from."""
        from mmgen.methods.formats import pixels_of

        fmt = self.sequence_format()
        prompts = [fmt.prompt(c) for c in conversations]
        seq = fmt.collate([segments for segments, _ in prompts], padding_side="left", device=self.device)
        images = [image for _, row_images in prompts for image in row_images]
        image_embeds = None
        if images:
            pixels = pixels_of(images, self.input_image_size()).to(self.device)
            image_embeds = self.encode_input_images(pixels)  # (n, k, d)
        return seq.embed(self.llm.embed, image_embeds), seq

    def _assemble(self, tokens, hits, prompt_hits, groups, stop_strings, by_hit):
        from mmgen.inference.engine import GroupHit, split_text
        from mmgen.inference.types import Answer, TextPart

        parts = [part for hit in prompt_hits for part in by_hit.get(id(hit), [])]
        for piece in split_text(self.llm.tokenizer, tokens, hits, groups, stop_strings):
            if isinstance(piece, GroupHit):
                parts.extend(by_hit.get(id(piece), []))
            else:
                parts.append(TextPart(piece))
        return Answer(parts)

    def _check_index(self, index) -> None:
        checked = self.__dict__.setdefault("_checked_indexes", weakref.WeakSet())
        if index not in checked:
            index.check_model(self)  # raises naming the index if another model made it
            checked.add(index)

    # -- shared pieces of images_for_hits --------------------------------------------------------
    def retrieve(self, queries: torch.Tensor, rows: list[int], context: AnswerContext) -> list:
        """The best image for each query (n, e) from ``context.index``, never one the
        conversation shows or one already retrieved earlier in the same answer."""
        counts: dict[int, int] = {}
        for row in rows:
            counts[row] = counts.get(row, 0) + 1
        k = max(counts.values())  # enough candidates to skip the row's own earlier picks
        results = context.index.search(queries, k=k, exclude=[context.shown_paths(row) for row in rows])
        used: dict[int, set[str]] = {}
        picks = []
        for row, hits in zip(rows, results):
            taken = used.setdefault(row, set())
            pick = next((h for h in hits if h.path not in taken), None)
            if pick is not None:
                taken.add(pick.path)
            picks.append(pick)
        return picks

    def generated_images(self, images: torch.Tensor, seeds: list[int], decision: str) -> list:
        """(n, 3, h, w) in [0, 1] -> GeneratedImage objects (PIL)."""
        from mmgen.data.images import to_pil
        from mmgen.inference.types import GeneratedImage

        return [GeneratedImage(to_pil(image), seed, decision) for image, seed in zip(images, seeds)]

    # -- Lightning -------------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx=0):
        """``{"conversations": [...], "ids": [...], "modes": [str | None] (optional), "index":
        RetrievalIndex | None, "options": {answer keyword arguments}}`` -> list[Answer], one per
        conversation (``mmgen.data.prompts.PromptDataModule`` makes such batches). A row's mode
        overrides ``options["mode"]`` (default "auto"); rows are answered in one call per mode."""
        if not isinstance(batch, dict) or "conversations" not in batch:
            raise DataError("predict batches are {'conversations': [...], 'ids': [...]} "
                            "(mmgen.data.prompts.PromptDataModule)")
        options = dict(batch.get("options") or {})
        default_mode = options.pop("mode", "auto")
        conversations = list(batch["conversations"])
        modes = [m or default_mode for m in (batch.get("modes") or [None] * len(conversations))]
        index = batch.get("index") if self.retrieves else None
        modes = [self._usable_mode(m, index) for m in modes]
        answers = [None] * len(conversations)
        for mode in dict.fromkeys(modes):  # distinct modes in order of appearance
            rows = [i for i, m in enumerate(modes) if m == mode]
            for i, answer in zip(rows, self.answer([conversations[i] for i in rows], index=index,
                                                   mode=mode, **options)):
                answers[i] = answer
        return answers

    def _usable_mode(self, mode: str, index) -> str:
        """A prompt file is shared by every method: a mode this model cannot run (FROMAGe asked
        to generate, retrieval without an index) falls back to "auto", with a warning."""
        if mode not in MODES:
            raise DataError(f"mode must be one of {MODES}, not {mode!r}")
        try:
            self.check_mode(mode, index)
        except ConfigError as error:
            warn_once(self, f"mode-{mode}", f"{error}; answering those prompts in mode 'auto'")
            return "auto"
        return mode


def warn_once(model, key: str, message: str) -> None:
    """A warning shown once per model (not on every batch of a long predict run)."""
    seen = model.__dict__.setdefault("_warned", set())
    if key not in seen:
        seen.add(key)
        warnings.warn(message, stacklevel=3)


# -- the three methods ---------------------------------------------------------------------------
class FROMAGeAnswers(AnswersConversations):
    """FROMAGe answers with text and, wherever it produces ``[RET]``, the image of the index
    closest to the ``[RET]`` state's text embedding. It cannot generate images."""

    decoding_defaults = dict(max_new_tokens=32, stop_strings=("\n",))  # the reference cuts at a newline

    def sequence_format(self):
        from mmgen.methods.formats import FROMAGeFormat

        return FROMAGeFormat(self.llm.tokenizer, self.visual_prefix.n_tokens, self.ret_id, self.max_text_length)

    def encode_input_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_prefix(self.visual_encoder(pixels))  # (n, 1, f) -> (n, k, d)

    def token_groups(self, ret_scale_factor: float, gen_scale_factor: float) -> list:
        from mmgen.inference.engine import TokenGroup

        return [TokenGroup((self.ret_id,), states="at", scale_factor=ret_scale_factor)]

    def check_mode(self, mode: str, index) -> None:
        if mode in ("generate", "both"):
            raise ConfigError(f"FROMAGe retrieves images and cannot generate them (mode={mode!r}); use 'auto' or 'retrieve'")
        if mode == "retrieve" and index is None:
            raise ConfigError("mode='retrieve' needs a retrieval index (mmgen index build)")

    def images_for_hits(self, hits: list, context: AnswerContext) -> list[list]:
        if context.index is None:
            warn_once(self, "no-index", "FROMAGe produced [RET] but no retrieval index was given: "
                                        "the answer has no images (pass index=RetrievalIndex.load(...))")
            return [[] for _ in hits]
        states = torch.stack([hit.states[0] for _, hit in hits])  # (n, hidden) at [RET]
        queries = self.retrieval_head.embed_text(states.float())  # (n, e)
        picks = self.retrieve(queries, [row for row, _ in hits], context)
        return [[pick] if pick is not None else [] for pick in picks]


class GILLAnswers(AnswersConversations):
    """GILL answers with text and, wherever it produces ``[IMG0..r-1]``, a retrieved image, a
    generated one or both: as the caller's ``mode`` says, or ("auto") as its decision module
    decides from the raw ``[IMG0]`` state. Without a decision module, "auto" retrieves when an
    index is given and generates otherwise. Only what is needed runs."""

    decoding_defaults = dict(max_new_tokens=32, stop_strings=("\n",))  # the reference cuts at a newline

    def sequence_format(self):
        from mmgen.methods.formats import GILLFormat

        return GILLFormat(self.llm.tokenizer, self.visual_prefix.n_tokens, self.img_ids, self.max_text_length)

    def encode_input_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_prefix(self.visual_encoder(pixels))  # (n, 1, f) -> (n, 4, d)

    def token_groups(self, ret_scale_factor: float, gen_scale_factor: float) -> list:
        from mmgen.inference.engine import TokenGroup

        # [IMG0] serves retrieval and generation: both factors scale it, as in the reference.
        return [TokenGroup(tuple(self.img_ids), states="at", scale_factor=ret_scale_factor * gen_scale_factor)]

    def check_mode(self, mode: str, index) -> None:
        if mode in ("retrieve", "both") and index is None:
            raise ConfigError(f"mode={mode!r} needs a retrieval index (mmgen index build)")
        if mode in ("generate", "both") and self.image_generator is None:
            raise ConfigError(f"mode={mode!r} needs the model's image_generator")

    def decisions(self, img0_states: torch.Tensor, context: AnswerContext) -> list[str]:
        """"retrieve", "generate" or "both" for each group, from its raw [IMG0] state (n, hidden)."""
        n = img0_states.shape[0]
        if context.mode != "auto":
            return [context.mode] * n
        head = context.extra.get("decision_head")
        if head is None:
            if context.index is None and self.image_generator is None:
                raise ConfigError("GILL has neither a retrieval index nor an image generator to answer [IMG] with")
            return ["retrieve" if context.index is not None else "generate"] * n
        chosen = head.decide(img0_states.float())
        if context.index is None and "retrieve" in chosen:
            warn_once(self, "no-index", "GILL's decision module chose retrieval but no index was given: generating instead")
            chosen = ["generate"] * n
        if self.image_generator is None and "generate" in chosen:
            if context.index is None:
                raise ConfigError("GILL's decision module chose generation but the model has no image_generator")
            warn_once(self, "no-generator", "GILL's decision module chose generation but the model has no "
                                            "image_generator: retrieving instead")
            chosen = ["retrieve"] * n
        return chosen

    def images_for_hits(self, hits: list, context: AnswerContext) -> list[list]:
        states = torch.stack([hit.states for _, hit in hits])  # (n, r, hidden) at [IMG0..r-1]
        rows = [row for row, _ in hits]
        chosen = self.decisions(states[:, 0], context)
        parts: list[list] = [[] for _ in hits]

        retrieve = [i for i, d in enumerate(chosen) if d in ("retrieve", "both")]
        if retrieve:
            queries = self.retrieval_head.embed_text(states[retrieve, 0].float())  # (m, e) from [IMG0]
            for i, pick in zip(retrieve, self.retrieve(queries, [rows[i] for i in retrieve], context)):
                if pick is not None:
                    parts[i].append(pick)

        generate = [i for i, d in enumerate(chosen) if d in ("generate", "both")]
        if generate:
            ids = torch.tensor(self.img_ids, device=states.device)
            img_embeds = self.llm.embed(ids)[None].expand(len(generate), -1, -1)  # (m, r, d)
            prompt = self.gen_mapper(states[generate].float(), img_embeds.float())  # (m, 77, text dim)
            opts = context.image_options
            seeds = opts.seeds(len(generate))
            # negative_prompt_embeds=None: SD's own empty-prompt embedding, as GILL uses
            images = self.image_generator.generate(prompt, None, num_inference_steps=opts.num_inference_steps,
                                                   guidance_scale=opts.guidance_scale, scheduler=opts.scheduler,
                                                   seeds=seeds)
            label = {"auto": "auto", "both": "both"}.get(context.mode, "generate")
            for i, image in zip(generate, self.generated_images(images, seeds, label)):
                parts[i].append(image)
        return parts


class MiniGPT5Answers(AnswersConversations):
    """MiniGPT-5 answers with text and, wherever it produces its vokens ``[IMG0..7]``, an image
    generated from the mapper's output for the hidden states that predicted them (negative
    prompt: the mapper's output for zero features). Defaults as the reference: top-p 0.9
    sampling at temperature 1, repetition penalty 2.0, stop at ``###``."""

    decoding_defaults = dict(max_new_tokens=64, do_sample=True, top_p=0.9, temperature=1.0,
                             repetition_penalty=2.0, stop_strings=("###",))
    retrieves = False

    def sequence_format(self):
        from mmgen.methods.formats import MiniGPT5Format

        return MiniGPT5Format(self.llm.tokenizer, self.n_image_tokens, self.voken_ids)

    def encode_input_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_encoder(pixels)  # (n, 32, d)

    def input_image_size(self) -> int:
        if self.visual_encoder is None:
            raise DataError("this MiniGPT-5 has no visual_encoder: its conversations cannot hold images")
        return int(self.visual_encoder.image_size)

    def token_groups(self, ret_scale_factor: float, gen_scale_factor: float) -> list:
        from mmgen.inference.engine import TokenGroup

        return [TokenGroup(tuple(self.voken_ids), states="predict", scale_factor=gen_scale_factor)]

    def check_mode(self, mode: str, index) -> None:
        if mode in ("retrieve", "both"):
            raise ConfigError(f"MiniGPT-5 generates images and cannot retrieve them (mode={mode!r}); use 'auto' or 'generate'")

    def images_for_hits(self, hits: list, context: AnswerContext) -> list[list]:
        features = torch.stack([hit.states for _, hit in hits])  # (n, 8, hidden) predicting the vokens
        n, k = features.shape[:2]
        prompt = self.mapper(features.float())  # (n, 77, text dim)
        negative = self.mapper.negative_embedding(n, k)  # (n, 77, text dim): mapper(zeros)
        opts = context.image_options
        seeds = opts.seeds(n)
        images = self.generator.generate(prompt, negative, num_inference_steps=opts.num_inference_steps,
                                         guidance_scale=opts.guidance_scale, scheduler=opts.scheduler, seeds=seeds)
        return [[image] for image in self.generated_images(images, seeds, "generate")]
