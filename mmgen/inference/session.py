"""A conversation with one model: what every chat front end shares (``mmgen chat`` in the
terminal, ``mmgen serve`` in the browser).

    session = ChatSession()
    answer = session.ask(model, ["what is next to it?", ImageRef("photo.png")], index=index, mode="auto",
                         options={"max_new_tokens": 32})
    session.retract()      # take the last turn back (regenerate it), returns what the user said
    session.reset()

The conversation so far (the user's turns and the model's answers, its images included) is the
prompt of every turn. The command-line options both front ends take for answering are here too.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from mmgen.errors import ConfigError
from mmgen.inference.types import Answer, GeneratedImage, ImageRef, RetrievedImage, TextPart
from mmgen.methods.answering import MODES


def as_input(answer: Answer) -> list:
    """An answer as conversation parts for the next turn (its images by path or as pictures)."""
    parts = []
    for part in answer.parts:
        if isinstance(part, TextPart):
            parts.append(part.text)
        elif isinstance(part, RetrievedImage):
            parts.append(ImageRef(part.path))
        elif isinstance(part, GeneratedImage):
            parts.append(part.image)
    return parts


@dataclass
class ChatSession:
    """The turns of one conversation: (what the user said, the model's answer)."""

    turns: list[tuple[list, Answer]] = field(default_factory=list)

    @property
    def history(self) -> list:
        """The conversation as model input: every turn's user parts, then its answer's parts."""
        return [part for user, answer in self.turns for part in (*user, *as_input(answer))]

    def ask(self, model, user: list, index=None, mode: str = "auto", options: dict | None = None) -> Answer:
        """The model's answer to ``user`` (parts) after the conversation so far; the turn is kept."""
        (answer,) = model.answer([self.history + list(user)], index=index, mode=mode, **(options or {}))
        self.turns.append((list(user), answer))
        return answer

    def retract(self) -> list:
        """Take the last turn back; its user parts (empty when there is none)."""
        return self.turns.pop()[0] if self.turns else []

    def reset(self) -> None:
        self.turns = []


def check_mode(model, mode: str, index) -> None:
    """ConfigError when ``model`` cannot answer in ``mode`` with ``index`` (None: no index), e.g.
    retrieval without an index, or FROMAGe asked to generate: the method's own check."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, not {mode!r}")
    if hasattr(model, "check_mode"):
        model.check_mode(mode, index)


def modes_of(model) -> list[str]:
    """The modes ``model`` can answer in when it has an index (retrieval may still need one)."""
    has_index = object()  # any index: only the method's abilities matter here
    usable = []
    for mode in MODES:
        try:
            check_mode(model, mode, has_index)
            usable.append(mode)
        except ConfigError:
            pass
    return usable


def can_generate(model) -> bool:
    return "generate" in modes_of(model)


# -- command-line options both front ends take ---------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint of mmgen fit, pretrained folder or converted release")
    p.add_argument("--index", help="retrieval index folder (mmgen index build) for FROMAGe and GILL")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def add_answer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="auto", choices=list(MODES),
                   help="which images GILL answers with (auto: its decision module)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the method's")
    p.add_argument("--sample", action="store_true", default=None, help="sample instead of greedy decoding")
    p.add_argument("--greedy", dest="sample", action="store_false", help="greedy decoding (MiniGPT-5 samples by default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--ret-scale-factor", type=float, default=1.0,
                   help="multiplies the probability of the retrieval token (FROMAGe [RET], GILL [IMG0])")
    p.add_argument("--gen-scale-factor", type=float, default=1.0,
                   help="multiplies the probability of the generation token (GILL [IMG0], MiniGPT-5 vokens)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--steps", type=int, default=25, help="denoising steps of generated images")
    p.add_argument("--scheduler", default="dpm", help="dpm | pndm | ddim | euler | a diffusers class name")
    p.add_argument("--seed", type=int, default=None)


def answer_options(args: argparse.Namespace) -> dict:
    """``model.answer``'s keyword arguments from ``add_answer_arguments``' options (decoding
    options not given are left to the method's defaults)."""
    decoding = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample, "top_p": args.top_p,
                "temperature": args.temperature}
    options = {k: v for k, v in decoding.items() if v is not None}
    options.update(ret_scale_factor=args.ret_scale_factor, gen_scale_factor=args.gen_scale_factor,
                   guidance_scale=args.guidance_scale, num_inference_steps=args.steps, scheduler=args.scheduler,
                   seed=args.seed)
    return options


def load_for_chat(model_source: str, index_source: str | None = None, device: str | None = None):
    """(model, index or None) as a chat needs them: the index checked against the model and, for
    exact search, on the model's device."""
    from mmgen.inference.api import load_index, load_model

    model = load_model(model_source, device=device)
    index = load_index(index_source, model) if index_source else None
    if index is not None and index.backend == "exact":
        index.to(model.device)
    return model, index
