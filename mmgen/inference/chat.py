"""``mmgen chat``: a conversation with a trained model in the terminal.

    mmgen chat --model runs/gill/checkpoints/last.ckpt --index out/index --out chat/

Each line you type is a turn; the model answers it with text, retrieved images (their paths and
scores) and generated images (saved as PNG files, paths printed). Images go in by path:

    /image path/to/photo.png     attach an image to your next message (several: several lines)
    /mode retrieve               GILL: auto | retrieve | generate | both
    /reset                       start a new conversation
    /save                        write the HTML page now (also written on exit when --out is given)
    /quit                        leave (or Ctrl-D)

The conversation so far (your turns and the model's answers, its images included) is the
prompt of every turn. With ``--out`` the conversation is written as the same self-contained HTML
page as ``mmgen predict`` writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, TextIO

from mmgen.inference.session import ChatSession, add_answer_arguments, add_model_arguments, answer_options, load_for_chat
from mmgen.inference.types import Answer, GeneratedImage, ImageRef, RetrievedImage, TextPart

COMMANDS = ("/image", "/mode", "/reset", "/save", "/quit")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgen chat", description="Talk with a trained model in the terminal; "
                                "images are given by path with '/image PATH'.")
    add_model_arguments(p)
    p.add_argument("--out", help="folder for generated images and the HTML page of the conversation")
    add_answer_arguments(p)
    return p


class Chat:
    """The chat loop on any model with ``answer`` (tests drive it with a model and a list of lines)."""

    def __init__(self, model, index=None, out: str | Path | None = None, mode: str = "auto",
                 options: dict | None = None, write: Callable[[str], None] = print):
        self.model = model
        self.index = index
        self.out = Path(out) if out else None
        self.mode = mode
        self.options = dict(options or {})
        self.write = write
        self.session = ChatSession()  # the turns: (what the user said, the answer)
        self.pending_images: list[ImageRef] = []
        self.n_generated = 0

    @property
    def history(self) -> list:
        """The conversation as model input (user parts and answer parts)."""
        return self.session.history

    @property
    def turns(self) -> list[tuple[list, Answer]]:
        return self.session.turns

    def handle(self, line: str) -> bool:
        """One input line; False when the chat should end."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            argument = argument.strip()
            if command == "/quit":
                return False
            if command == "/image":
                if not argument or not Path(argument).is_file():
                    self.write(f"no such image file: {argument or '(none given)'}")
                else:
                    self.pending_images.append(ImageRef(argument))
                    self.write(f"[image {argument} attached to your next message]")
            elif command == "/mode":
                if argument not in ("auto", "retrieve", "generate", "both"):
                    self.write("modes: auto, retrieve, generate, both")
                else:
                    self.mode = argument
            elif command == "/reset":
                self.session.reset()
                self.pending_images = []
                self.write("[new conversation]")
            elif command == "/save":
                self.save()
            else:
                self.write(f"unknown command {command}; commands: {', '.join(COMMANDS)}")
            return True
        self.say(line)
        return True

    def say(self, text: str) -> Answer:
        user = [*self.pending_images, text]
        self.pending_images = []
        answer = self.session.ask(self.model, user, index=self.index, mode=self.mode, options=self.options)
        self.show(answer)
        return answer

    def show(self, answer: Answer) -> None:
        lines = []
        for part in answer.parts:
            if isinstance(part, TextPart):
                lines.append(part.text)
            elif isinstance(part, RetrievedImage):
                lines.append(f"[retrieved image {part.path} (score {part.score:.3f})]")
            elif isinstance(part, GeneratedImage):
                lines.append(f"[generated image {self._save_image(part)} (seed {part.seed})]")
        self.write("model> " + (" ".join(lines) if lines else "(no answer)"))

    def _save_image(self, part: GeneratedImage) -> str:
        folder = self.out or Path(".")
        (folder / "images").mkdir(parents=True, exist_ok=True)
        path = folder / "images" / f"chat_{self.n_generated:03d}_seed{part.seed}.png"
        part.image.save(path)
        self.n_generated += 1
        return str(path)

    def save(self) -> Path | None:
        if self.out is None:
            self.write("give --out to write the conversation as an HTML page")
            return None
        if not self.turns:
            return None
        from mmgen.inference.report import write_report

        page = write_report([a for _, a in self.turns], [c for c, _ in self.turns], self.out,
                            ids=[f"turn {i + 1}" for i in range(len(self.turns))],
                            title=f"mmgen chat with {type(self.model).__name__}")
        self.write(f"[conversation written to {page}]")
        return page

    def run(self, lines: TextIO) -> None:
        self.write(f"{type(self.model).__name__} is listening. /image PATH attaches an image, /quit ends.")
        while True:
            if lines is sys.stdin and sys.stdin.isatty():
                sys.stdout.write("you> ")
                sys.stdout.flush()
            line = lines.readline()
            if not line or not self.handle(line):
                break
        if self.out is not None:
            self.save()


def main(args: list[str], lines: TextIO | None = None) -> Chat:
    options = parser().parse_args(args)
    model, index = load_for_chat(options.model, options.index, options.device)
    chat = Chat(model, index, options.out, options.mode, answer_options(options))
    chat.run(lines or sys.stdin)
    return chat
