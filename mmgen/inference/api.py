"""The Python API: load a trained model, answer conversations with text and images.

    from mmgen.inference.api import answer, load_index, load_model
    from mmgen.inference.types import ImageRef

    model = load_model("out/gill")                       # pretrained folder, converted release
    model = load_model("runs/gill/checkpoints/last.ckpt")  # or a checkpoint of mmgen fit
    index = load_index("out/index")                       # optional: retrieval (mmgen index build)
    answers = answer(model, [["A photo of", ImageRef("cat.png"), "Show me another one"]],
                     index=index, mode="auto", max_new_tokens=32, seed=0)
    answers[0].text, answers[0].images    # TextPart / RetrievedImage / GeneratedImage in order

``answer`` is ``model.answer`` (every method has it) in batches; the keyword arguments are the
same. docs/inference.md describes what each method answers with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image

from mmgen.errors import ConfigError
from mmgen.inference.types import Answer, ImageRef


def load_model(source: str | Path, device: str | torch.device | None = None):
    """A trained model, configured, filled and in eval mode on ``device`` (default: cuda if
    available, else cpu), from

    - a pretrained folder (``model.save_pretrained``, ``mmgen export``, or an official release
      converted by ``mmgen convert``): it holds ``config.yaml`` and ``model.safetensors``;
    - a Lightning checkpoint written by ``mmgen fit`` (the model config is stored inside);
    - the hub id (``org/name``) of a pretrained folder pushed to the hub.

    Frozen backbones load from their sources (hub ids or folders) named in the config.
    """
    from mmgen.pretrained import CONFIG_FILE, load_pretrained

    path = Path(source)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"{path} is not a pretrained folder (no {CONFIG_FILE}); an official release folder "
                              "must be converted first: mmgen convert <method> --release DIR --out OUT")
        model = load_pretrained(path)
    elif path.is_file():
        model = load_checkpoint(path)
    else:
        from mmgen.components.hub import looks_local

        if looks_local(str(source)):
            raise ConfigError(f"{path}: no such model folder or checkpoint")
        model = load_pretrained(str(source))  # a hub id (org/name): mmgen.pretrained.resolve_folder
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def load_checkpoint(path: str | Path):
    """The model of a Lightning checkpoint of ``mmgen fit``: rebuilt from the config it stores,
    filled with its trained tensors (``mmgen.pretrained.model_from_checkpoint``)."""
    from mmgen.pretrained import model_from_checkpoint

    return model_from_checkpoint(path)[0].eval()


def load_index(source, model=None, backend: str = "exact"):
    """A ``RetrievalIndex`` from its folder (docs/retrieval_index.md); checked against ``model``
    when given (an index made by another model is refused, naming it)."""
    from mmgen.inference.index import RetrievalIndex

    index = source if isinstance(source, RetrievalIndex) else RetrievalIndex.load(source, backend=backend)
    if model is not None:
        index.check_model(model)
    return index


def _is_part(value) -> bool:
    return isinstance(value, (str, ImageRef, Image.Image))


def answer(
    model,
    conversations: Sequence,
    index=None,
    mode: str = "auto",
    batch_size: int = 8,
    progress: bool = False,
    **options,
) -> list[Answer]:
    """Answers to ``conversations`` (a list of conversations, or one conversation: a list of
    str / ``ImageRef`` / PIL parts), ``batch_size`` at a time; ``index``: a ``RetrievalIndex``
    or its folder. ``options``: ``model.answer``'s keyword arguments (``max_new_tokens``,
    ``do_sample``, ``top_p``, ``temperature``, ``repetition_penalty``, ``stop_strings``,
    ``ret_scale_factor``, ``gen_scale_factor``, ``guidance_scale``, ``num_inference_steps``,
    ``scheduler``, ``seed``); a seed gives every batch its own derived seed."""
    if not hasattr(model, "answer"):
        raise ConfigError(f"{type(model).__name__} cannot answer conversations")
    conversations = list(conversations)
    if conversations and _is_part(conversations[0]):
        conversations = [conversations]  # one conversation
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if index is not None and not hasattr(index, "search"):
        index = load_index(index)
    batches: Iterable[int] = range(0, len(conversations), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="answering", unit="batch")
    seed = options.pop("seed", None)
    answers: list[Answer] = []
    for n, start in enumerate(batches):
        batch_seed = None if seed is None else seed + 1000 * n
        answers += model.answer(conversations[start:start + batch_size], index=index, mode=mode, seed=batch_seed,
                                **options)
    return answers
