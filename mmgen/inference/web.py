"""``mmgen serve``: a chat page in the browser for any trained FROMAGe, GILL or MiniGPT-5.

    mmgen serve --model runs/gill_tiny/.../last.ckpt --index runs/toy_index   # http://127.0.0.1:7860

A person types text, attaches images and gets the model's answer in order: text, retrieved
images (with the indexed file and its score) and generated images (with their seed). The page
is Gradio (``pip install mmgen[demo]``); everything it does goes through :class:`ChatPage`,
whose handlers are plain functions (tests call them without a browser):

- each browser tab has its own conversation (a ``ChatSession`` in Gradio's per-session state);
  the model is shared, and its calls run one at a time (Gradio's queue, plus a lock);
- decoding shows a progress bar token by token and stops at the next token when the person
  presses Stop;
- bad input (an unreadable or oversized upload, an empty message, retrieval without an index)
  is answered by a message on the page, and the conversation stays as it was.

The server binds to 127.0.0.1 unless ``--host`` says otherwise (docs/inference.md: exposing it).
"""

# No `from __future__ import annotations`: Gradio finds the gr.Request and gr.Progress arguments of
# the handlers by their annotations, which must then be the classes themselves, not strings.
import argparse
import copy
import os
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from transformers import LogitsProcessor

from mmgen.errors import ConfigError, DataError
from mmgen.inference.session import (ChatSession, add_answer_arguments, add_model_arguments, answer_options,
                                     can_generate, check_mode, load_for_chat, modes_of)
from mmgen.inference.types import Answer, GeneratedImage, ImageRef, RetrievedImage, TextPart

INSTALL_HINT = "mmgen serve needs gradio: pip install mmgen[demo]"
THUMBNAIL = 512  # longest side of the retrieved images shown on the page (the files can be large)


class InputError(ValueError):
    """Input the page refuses with a message (the conversation is left as it was)."""


class Cancelled(Exception):
    """The person pressed Stop while the model was writing."""


class StepReporter(LogitsProcessor):
    """Called by ``generate`` once per new token: reports progress and stops decoding (by raising
    ``Cancelled``) once ``cancel`` is set. It leaves the scores as they are. Why a logits
    processor: it is the one hook ``model.answer`` runs at every decoding step."""

    def __init__(self, max_new_tokens: int, cancel: threading.Event, progress=None):
        self.max_new_tokens = max_new_tokens
        self.cancel = cancel
        self.progress = progress

    def __call__(self, input_ids, scores):  # input_ids (b, new tokens so far): generate returns only new ones
        if self.cancel.is_set():
            raise Cancelled()
        if self.progress is not None:
            self.progress((input_ids.shape[1], self.max_new_tokens), desc="writing", unit="tokens")
        return scores


@dataclass
class PageSession:
    """One tab's state: the conversation and the chat messages that show it (one user message
    and one answer per turn)."""

    chat: ChatSession = field(default_factory=ChatSession)
    messages: list[dict] = field(default_factory=list)

    def copy(self) -> "PageSession":
        """A copy to change: a cancelled or failed request then leaves the stored one as it was."""
        return PageSession(ChatSession(list(self.chat.turns)), list(self.messages))


@dataclass
class Settings:
    """The page's controls, in the order of ``ChatPage.SETTINGS``."""

    decoding: str = "greedy"  # "greedy" | "top-p"
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 32
    mode: str = "auto"
    ret_scale_factor: float = 1.0
    gen_scale_factor: float = 1.0
    guidance_scale: float = 7.5
    steps: int = 25
    seed: float | None = None  # a Number box: empty (None) draws seeds

    def answer_options(self, scheduler: str | None) -> dict:
        options = {"max_new_tokens": int(self.max_new_tokens), "do_sample": self.decoding == "top-p",
                   "ret_scale_factor": float(self.ret_scale_factor), "gen_scale_factor": float(self.gen_scale_factor),
                   "guidance_scale": float(self.guidance_scale), "num_inference_steps": int(self.steps),
                   "scheduler": scheduler, "seed": None if self.seed is None else int(self.seed)}
        if options["do_sample"]:
            options.update(top_p=float(self.top_p), temperature=float(self.temperature))
        return options


class ChatPage:
    """The page's behaviour on a loaded model (and index): handlers return what the page shows."""

    SETTINGS = ("decoding", "temperature", "top_p", "max_new_tokens", "mode", "ret_scale_factor",
                "gen_scale_factor", "guidance_scale", "steps", "seed")

    def __init__(self, model, index=None, out: str | Path | None = None, defaults: dict | None = None,
                 mode: str = "auto", max_image_pixels: int = 25_000_000, max_upload_mb: float = 20.0,
                 source: str = ""):
        self.model, self.index, self.source = model, index, source
        self.out = Path(out) if out else Path(tempfile.mkdtemp(prefix="mmgen-serve-"))
        (self.out / "images").mkdir(parents=True, exist_ok=True)
        self.max_image_pixels = max_image_pixels
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.modes = modes_of(model)
        self.can_generate = can_generate(model)
        self.defaults = self._defaults(dict(defaults or {}), mode)
        self.scheduler = (defaults or {}).get("scheduler", "dpm")
        self._model_lock = threading.Lock()  # one model call at a time, whatever the queue does
        self._cancels: dict[str, threading.Event] = {}  # per browser session
        self._n_images = 0
        self._count_lock = threading.Lock()

    def _defaults(self, given: dict, mode: str) -> Settings:
        """The controls' first values: the command line's options, else the method's defaults."""
        method = getattr(self.model, "gill", self.model)
        d = {**getattr(method, "decoding_defaults", {}), **given}
        return Settings(
            decoding="top-p" if d.get("do_sample") else "greedy", temperature=d.get("temperature", 1.0),
            top_p=d.get("top_p", 0.9), max_new_tokens=d.get("max_new_tokens", 32),
            mode=mode if mode in self.modes else "auto",
            ret_scale_factor=d.get("ret_scale_factor", 1.0), gen_scale_factor=d.get("gen_scale_factor", 1.0),
            guidance_scale=d.get("guidance_scale", 7.5), steps=d.get("num_inference_steps", 25), seed=d.get("seed"),
        )

    # -- reading what the person sent ----------------------------------------------------------------
    def read_images(self, files: list) -> list[ImageRef]:
        """The uploaded files as conversation images; InputError naming the first one that is too
        large or not an image."""
        refs = []
        for item in files or []:
            path = Path(item["path"] if isinstance(item, dict) else item)
            name = item.get("orig_name") if isinstance(item, dict) and item.get("orig_name") else path.name
            try:
                size = path.stat().st_size
            except OSError as error:
                raise InputError(f"{name}: the upload cannot be read ({error.strerror})") from error
            if size > self.max_upload_bytes:
                raise InputError(f"{name} is {size / 2**20:.1f} MB; images up to "
                                 f"{self.max_upload_bytes / 2**20:.0f} MB are accepted")
            try:
                with Image.open(path) as image:  # reads the header only
                    width, height = image.size
                    if width * height > self.max_image_pixels:
                        raise InputError(f"{name} is {width}x{height} pixels; images up to "
                                         f"{self.max_image_pixels / 1e6:.0f} megapixels are accepted")
                    image.convert("RGB")  # decodes it all: a truncated or damaged file fails here
            except InputError:
                raise
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise InputError(f"{name} is not a readable image ({type(error).__name__}: {error})") from error
            refs.append(ImageRef(str(path)))
        return refs

    def settings(self, values=()) -> Settings:
        """The controls' values checked (none given: the page's first values)."""
        settings = Settings(*values) if values else copy.copy(self.defaults)
        if settings.mode not in self.modes:
            raise InputError(f"{type(self.model).__name__} answers in the modes {', '.join(self.modes)}, "
                             f"not {settings.mode!r}")
        if settings.max_new_tokens is None or settings.max_new_tokens < 1:
            raise InputError("max tokens must be at least 1")
        if settings.steps is None or settings.steps < 1:
            raise InputError("steps must be at least 1")
        try:
            check_mode(self.model, settings.mode, self.index)
        except ConfigError as error:
            hint = (" This page was started without an index: restart it with "
                    "`mmgen serve --model ... --index FOLDER` (`mmgen index build` makes one), or choose "
                    "another mode." if self.index is None and settings.mode in ("retrieve", "both") else "")
            raise InputError(f"{error}.{hint}") from error
        return settings

    # -- handlers --------------------------------------------------------------------------------
    def respond(self, message: dict | str | None, session: PageSession | None, values=(), key: str = "local",
                progress=None):
        """The answer to what the person sent. Returns (chat messages, session, what stays in the
        message box, status line)."""
        session = session or PageSession()
        message = message if isinstance(message, dict) else {"text": message or "", "files": []}
        try:
            text = (message.get("text") or "").strip()
            images = self.read_images(message.get("files") or [])
            if not text and not images:
                raise InputError("Type a message or attach an image first.")
            settings = self.settings(values)
        except InputError as error:
            return session.messages, session, message, self._status(error)
        user = [*images, text] if text else images
        shown = {"role": "user", "content": [{"path": ref.path} for ref in images] + ([text] if text else [])}
        return self._answer(session.copy(), user, shown, settings, key, progress, message, original=session)

    def regenerate(self, session: PageSession | None, values=(), key: str = "local", progress=None):
        """The last turn answered again (with the current settings). Returns (chat messages,
        session, status line)."""
        session = session or PageSession()
        if not session.chat.turns:
            return session.messages, session, self._status("Nothing to regenerate yet.")
        try:
            settings = self.settings(values)
        except InputError as error:
            return session.messages, session, self._status(error)
        changed = session.copy()
        user = changed.chat.retract()
        shown = changed.messages[-2]
        changed.messages = changed.messages[:-2]
        messages, session, _, status = self._answer(changed, user, shown, settings, key, progress, None,
                                                    original=session)
        return messages, session, status

    def clear(self):
        """A new conversation: (chat messages, session, message box, status line)."""
        return [], PageSession(), {"text": "", "files": []}, ""

    def cancel(self, key: str = "local") -> None:
        """Stop the session's answer at its next token."""
        self._cancel_event(key).set()

    def _answer(self, session: PageSession, user: list, shown: dict, settings: Settings, key: str, progress,
                message, original: PageSession):
        """Answer ``user`` in ``session`` (a copy of ``original``, which is returned unchanged
        when the answer is stopped or fails)."""
        cancel = self._cancel_event(key)
        cancel.clear()
        options = settings.answer_options(self.scheduler)
        options["logits_processors"] = [StepReporter(options["max_new_tokens"], cancel, progress)]
        try:
            with self._model_lock:
                if cancel.is_set():  # Stop pressed while waiting for another tab's answer
                    raise Cancelled()
                answer = session.chat.ask(self.model, user, index=self.index, mode=settings.mode, options=options)
        except Cancelled:
            return original.messages, original, message, self._status("Stopped.")
        except (ConfigError, DataError) as error:
            return original.messages, original, message, self._status(error)
        except Exception as error:  # the page stays usable; the server's console gets the traceback
            traceback.print_exc()
            return original.messages, original, message, self._status(f"The model failed: {type(error).__name__}: {error}")
        session.messages = [*session.messages, shown, {"role": "assistant", "content": self.show(answer)}]
        return session.messages, session, {"text": "", "files": []}, ""

    def _cancel_event(self, key: str) -> threading.Event:
        return self._cancels.setdefault(key, threading.Event())

    @staticmethod
    def _status(error) -> str:
        return f"**⚠ {error}**"

    # -- showing an answer -----------------------------------------------------------------------
    def show(self, answer: Answer) -> list:
        """The answer as chat-message content, in order: text (markdown), then each image as a
        file on the page followed by a caption saying where it came from."""
        content = []
        for part in answer.parts:
            if isinstance(part, TextPart) and part.text.strip():
                content.append(part.text.strip())
            elif isinstance(part, RetrievedImage):
                caption = f"retrieved: {part.path} (score {part.score:.3f})"
                content += [{"path": self._thumbnail(part.path), "alt_text": caption}, f"*{caption}*"]
            elif isinstance(part, GeneratedImage):
                caption = f"generated (seed {part.seed}, {part.decision})"
                content += [{"path": self._save(part.image, "generated"), "alt_text": caption}, f"*{caption}*"]
        return content or ["*(no answer)*"]

    def _thumbnail(self, path: str) -> str:
        """A copy the page may serve: only files under ``out`` are served, not the index's folder."""
        with Image.open(path) as image:
            image = image.convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        return self._save(image, "retrieved")

    def _save(self, image: Image.Image, kind: str) -> str:
        with self._count_lock:
            self._n_images += 1
            n = self._n_images
        path = self.out / "images" / f"{kind}_{n:05d}.png"
        image.save(path)
        return str(path)

    # -- the page --------------------------------------------------------------------------------
    def header(self) -> str:
        index = (f"index: {self.index.name} ({len(self.index)} images)" if self.index is not None
                 else "no retrieval index")
        device = getattr(self.model, "device", "")
        return f"### mmgen · {type(self.model).__name__}\n`{self.source}` · {index} · {device}"

    def build(self):
        """The Gradio page (``gr.Blocks``) on this object's handlers."""
        gr = import_gradio()
        d = self.defaults
        with gr.Blocks(title=f"mmgen · {type(self.model).__name__}") as page:
            gr.Markdown(self.header())
            state = gr.State(PageSession())  # Gradio gives every tab its own copy
            with gr.Row():
                with gr.Column(scale=3):  # the conversation
                    # no "share" button: it would post the conversation to Hugging Face
                    chat = gr.Chatbot(label="conversation", height=520, elem_id="chat", buttons=["copy_all"])
                    box = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", elem_id="message",
                                               placeholder="Type a message; attach images with the clip.",
                                               show_label=False, sources=["upload"])
                    status = gr.Markdown("", elem_id="status")
                    with gr.Row():
                        regenerate = gr.Button("Regenerate", elem_id="regenerate")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        clear = gr.Button("Clear", elem_id="clear")
                with gr.Column(scale=2, elem_id="settings"):  # the settings, read at every request
                    with gr.Row():
                        decoding = gr.Radio(["greedy", "top-p"], value=d.decoding, label="decoding")
                        max_new_tokens = gr.Slider(1, 512, value=d.max_new_tokens, step=1, label="max tokens")
                    with gr.Row():
                        temperature = gr.Slider(0.05, 2.0, value=d.temperature, step=0.05, label="temperature")
                        top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="top-p")
                    mode = gr.Radio(self.modes, value=d.mode, label="images: auto (the model decides), retrieve, "
                                    "generate or both", visible=len(self.modes) > 1)
                    with gr.Row():
                        ret_scale = gr.Number(d.ret_scale_factor, minimum=0, label="retrieval token boost")
                        gen_scale = gr.Number(d.gen_scale_factor, minimum=0, label="generation token boost",
                                              visible=self.can_generate)
                    with gr.Row(visible=self.can_generate):
                        guidance = gr.Slider(1.0, 20.0, value=d.guidance_scale, step=0.5, label="guidance scale")
                        steps = gr.Slider(1, 100, value=d.steps, step=1, label="denoising steps")
                    seed = gr.Number(d.seed, precision=0, label="seed (empty: random)")
            controls = [decoding, temperature, top_p, max_new_tokens, mode, ret_scale, gen_scale, guidance, steps,
                        seed]

            # Gradio reads the handlers' signatures: gr.Request gives the tab's session, a
            # gr.Progress default argument the progress bar.
            def respond(message, session, decoding, temperature, top_p, max_new_tokens, mode, ret_scale,
                        gen_scale, guidance, steps, seed, request: gr.Request, progress=gr.Progress()):
                values = (decoding, temperature, top_p, max_new_tokens, mode, ret_scale, gen_scale, guidance,
                          steps, seed)
                return self.respond(message, session, values, request.session_hash, progress)

            def again(session, decoding, temperature, top_p, max_new_tokens, mode, ret_scale, gen_scale,
                      guidance, steps, seed, request: gr.Request, progress=gr.Progress()):
                values = (decoding, temperature, top_p, max_new_tokens, mode, ret_scale, gen_scale, guidance,
                          steps, seed)
                return self.regenerate(session, values, request.session_hash, progress)

            def halt(request: gr.Request):
                self.cancel(request.session_hash)

            # every model call shares one queue slot ("model"): tabs wait their turn
            asked = box.submit(respond, [box, state, *controls], [chat, state, box, status],
                               concurrency_id="model", concurrency_limit=1)
            redone = regenerate.click(again, [state, *controls], [chat, state, status],
                                      concurrency_id="model", concurrency_limit=1)
            stop.click(halt, None, None, cancels=[asked, redone], queue=False)
            clear.click(self.clear, None, [chat, state, box, status], queue=False)
            chat.clear(self.clear, None, [chat, state, box, status], queue=False)  # the chat's own bin icon
        return page


def import_gradio():
    """gradio, or a ConfigError naming the extra that installs it."""
    # Gradio would report usage to its servers and look for updates: a local demo has no reason to.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ConfigError(INSTALL_HINT) from error
    return gradio


def theme():
    """Gradio's default look with the system's fonts: the default theme fetches web fonts from
    the internet, which a page on a machine without it would wait for."""
    gr = import_gradio()
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


# -- the command -------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgen serve", description="A chat page in the browser for a trained model: "
                                "text and images in, text with retrieved and generated images out. The answer "
                                "options below are the first values of the page's settings.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every network interface; "
                   "the page has no login, see docs/inference.md)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--out", help="folder for the images the page shows (default: a new temporary folder)")
    p.add_argument("--model-seed", type=int, default=None, help="seed before building the model, as `mmgen index "
                   "build --seed`: random backbones (tiny configs) then match the index's")
    p.add_argument("--max-image-pixels", type=int, default=25_000_000, help="larger uploads are refused")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads are refused")
    add_answer_arguments(p)
    return p


def main(args: list[str], block: bool = True):
    """Load the model, serve the page; with ``block=False`` return the running ``gr.Blocks``
    (stop it with ``.close()``)."""
    options = parser().parse_args(args)
    import_gradio()  # before loading a model: a missing extra fails at once
    if options.model_seed is not None:
        from lightning.pytorch import seed_everything

        seed_everything(options.model_seed, verbose=False)
    model, index = load_for_chat(options.model, options.index, options.device)
    page = ChatPage(model, index, options.out, answer_options(options), options.mode,
                    max_image_pixels=options.max_image_pixels, max_upload_mb=options.max_upload_mb,
                    source=options.model)
    app = page.build()
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=options.host, server_port=options.port, share=False, prevent_thread_lock=not block,
               allowed_paths=[str(page.out)], max_file_size=page.max_upload_bytes, ssr_mode=False,
               theme=theme(), footer_links=[], quiet=not block)
    app.chat_page = page  # for callers of block=False (tests)
    return app
