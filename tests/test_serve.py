"""``mmgen serve``: the chat page's handlers (bad input, regenerate, clear, stop, separate tabs)
without a browser, and the page itself in headless chromium on a tiny GILL with an index."""

from __future__ import annotations

import shutil
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLIP_VISION, TINY_OPT, TOY_TOKENIZER
from PIL import Image

from mmgen.errors import ConfigError
from mmgen.inference.types import GeneratedImage, ImageRef, RetrievedImage, TextPart

pytest.importorskip("gradio", reason="the chat page needs gradio: pip install mmgen[demo]")

from mmgen.inference.web import ChatPage, PageSession  # noqa: E402

# Settings under which the random tiny GILL writes text, then an [IMG0] group, then more text
# (found by trying seeds): sampling, a boosted image token, both retrieval and generation.
ANSWERING = ["--sample", "--temperature", "1.5", "--top-p", "1.0", "--seed", "4", "--mode", "both",
             "--ret-scale-factor", "3", "--gen-scale-factor", "3", "--max-new-tokens", "16", "--steps", "2"]


def C(class_path, **init_args):
    return {"class_path": class_path, "init_args": init_args}


def tiny_gill_config():
    from mmgen.components.stable_diffusion import tiny_sd_config

    return C("mmgen.methods.gill.GILL",
             llm=C("mmgen.components.causal_lm.CausalLM", config=dict(TINY_OPT), tokenizer=TOY_TOKENIZER),
             visual_encoder=C("mmgen.components.clip_vision.CLIPVisionEncoder", config=dict(TINY_CLIP_VISION)),
             image_generator=C("mmgen.components.stable_diffusion.StableDiffusion",
                               config=tiny_sd_config(text_embed_dim=16), tokenizer=TOY_TOKENIZER),
             visual_prefix=C("mmgen.components.visual_prefix.LinearVisualPrefix", n_tokens=4),
             retrieval_head=C("mmgen.components.retrieval_head.RetrievalHead", embed_dim=16),
             gen_mapper=C("mmgen.components.gill_mapper.GILLMapper", d_model=16, nhead=2, num_encoder_layers=1,
                          num_decoder_layers=1, dim_feedforward=32))


def picture(path: Path, color, size=(40, 40)) -> str:
    Image.new("RGB", size, color).save(path)
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny GILL saved as a pretrained folder, loaded as `mmgen serve --model-seed 0` loads it,
    with an index of three pictures made by that model; and a picture that is not in the index."""
    from mmgen.inference.api import load_model
    from mmgen.inference.index import RetrievalIndex
    from mmgen.pretrained import build_model

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = build_model(tiny_gill_config())
    model.configure_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random frozen weights": --model-seed rebuilds the same ones
        model.save_pretrained(root / "gill")
    torch.manual_seed(0)
    model = load_model(root / "gill", device="cpu")
    (root / "images").mkdir()
    indexed = [picture(root / "images" / f"{i}.png", (80 * i, 90, 200)) for i in range(3)]
    RetrievalIndex.build(model, indexed).save(root / "index")
    index = RetrievalIndex.load(root / "index")
    return {"root": root, "model": model, "index": index, "upload": picture(root / "upload.png", (200, 40, 40))}


def answering_settings():
    """The page's controls as ANSWERING sets them (the order of ChatPage.SETTINGS)."""
    return ("top-p", 1.5, 1.0, 16, "both", 3.0, 3.0, 7.5, 2, 4)


@pytest.fixture
def page(served, tmp_path):
    return ChatPage(served["model"], served["index"], out=tmp_path / "out", source="tiny gill")


def status_of(result) -> str:
    return result[-1]


# -- handlers ----------------------------------------------------------------------------------------------
def test_a_turn_shows_text_and_images_in_order_and_regenerate_and_clear_work(page, served):
    session = PageSession()
    messages, session, box, status = page.respond({"text": "a red circle", "files": [served["upload"]]}, session,
                                                  answering_settings())
    assert status == "" and box == {"text": "", "files": []}
    user, answer = messages
    assert user["content"] == [{"path": served["upload"]}, "a red circle"]
    (user_parts, expected), = session.chat.turns
    assert user_parts == [ImageRef(served["upload"]), "a red circle"]
    assert [type(p) for p in expected.parts] == [TextPart, RetrievedImage, GeneratedImage, TextPart]
    shown = answer["content"]
    assert shown[0] == expected.parts[0].text.strip()
    retrieved, generated = expected.parts[1], expected.parts[2]
    assert Path(shown[1]["path"]).parent == page.out / "images"  # a copy: the index folder is not served
    assert shown[2] == f"*retrieved: {retrieved.path} (score {retrieved.score:.3f})*"
    assert Image.open(shown[3]["path"]).size == generated.image.size
    assert shown[4] == f"*generated (seed {generated.seed}, both)*"
    assert shown[5] == expected.parts[3].text.strip()

    # the same settings and seed answer the same again; another seed answers otherwise
    again, session2, status = page.regenerate(session, answering_settings())
    assert status == "" and len(session2.chat.turns) == 1 and again[1]["content"][0] == shown[0]
    other, session3, _ = page.regenerate(session, answering_settings()[:-1] + (5,))
    assert len(other) == 2 and session3.chat.turns[0][1].parts != expected.parts
    # a second turn sees the first: the prompt holds the first answer's images
    messages, session4, _, _ = page.respond("and then?", session3, answering_settings())
    assert len(messages) == 4 and len(session4.chat.turns) == 2
    assert any(isinstance(p, Image.Image) for p in session4.chat.history)
    assert page.clear()[:2] == ([], PageSession())


@pytest.mark.parametrize("case", ["empty", "unreadable", "too many pixels", "too many bytes", "no index"])
def test_bad_input_gets_a_message_and_leaves_the_conversation(served, tmp_path, case):
    index = None if case == "no index" else served["index"]
    limits = {"too many pixels": {"max_image_pixels": 1000}, "too many bytes": {"max_upload_mb": 1e-4}}.get(case, {})
    page = ChatPage(served["model"], index, out=tmp_path / "out", **limits)
    broken = tmp_path / "photo.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image at all" * 10)
    message = {"empty": {"text": "   ", "files": []},
               "unreadable": {"text": "what is this?", "files": [str(broken)]},
               "too many pixels": {"text": "and this?", "files": [served["upload"]]},
               "too many bytes": {"text": "and this?", "files": [served["upload"]]},
               "no index": {"text": "find one", "files": []}}[case]
    before = PageSession()
    before.messages.append({"role": "user", "content": ["earlier"]})
    values = answering_settings()[:4] + ("retrieve",) + answering_settings()[5:]
    messages, session, box, status = page.respond(message, before, values)
    assert session is before and messages == before.messages and box == message  # nothing lost, nothing added
    expected = {"empty": "Type a message or attach an image",
                "unreadable": "photo.png is not a readable image",
                "too many pixels": "upload.png is 40x40 pixels; images up to 0 megapixels",
                "too many bytes": "upload.png is 0.0 MB; images up to 0 MB",
                "no index": "needs a retrieval index"}[case]
    assert expected in status and status.startswith("**⚠")
    if case == "no index":
        assert "--index" in status
        # the modes that need no index still answer
        assert status_of(page.respond("find one", before, answering_settings()[:4] + ("generate",)
                                      + answering_settings()[5:])) == ""


def test_stop_ends_the_answer_at_the_next_token_and_keeps_the_conversation(page):
    steps = []

    def progress(step, desc, unit):  # what gr.Progress receives; the person presses Stop at token 3
        steps.append(step)
        if step[0] == 3:
            page.cancel("tab")

    before = PageSession()
    messages, session, box, status = page.respond("a red circle", before, answering_settings(), "tab", progress)
    assert status == "**⚠ Stopped.**" and session is before and messages == [] and box["text"] == "a red circle"
    assert [s[0] for s in steps] == [0, 1, 2, 3] and steps[0][1] == 16  # (tokens so far, max tokens)
    # the next request of that tab runs normally; another tab's Stop does not touch it
    page.cancel("other tab")
    assert status_of(page.respond("a red circle", before, answering_settings(), "tab")) == ""


def test_tabs_keep_their_own_conversations(page):
    a, b = PageSession(), PageSession()
    _, a, _, _ = page.respond("a red circle", a, answering_settings(), "a")
    _, b, _, _ = page.respond("a blue square", b, answering_settings(), "b")
    _, a, _, _ = page.respond("more", a, answering_settings(), "a")
    assert [t[0][-1] for t in a.chat.turns] == ["a red circle", "more"]
    assert [t[0][-1] for t in b.chat.turns] == ["a blue square"]


def test_serve_without_gradio_names_the_extra(monkeypatch, served):
    from mmgen.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(ConfigError, match=r"pip install mmgen\[demo\]"):
        main(["serve", "--model", str(served["root"] / "gill")])


# -- the page in a browser ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run "
                    "installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", "--no-proxy-server",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # no traffic but to 127.0.0.1
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


def test_the_page_answers_a_prompt_with_an_image_in_a_browser(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    from mmgen.inference.web import main

    port = free_port()
    app = main(["--model", str(served["root"] / "gill"), "--index", str(served["root"] / "index"),
                "--model-seed", "0", "--device", "cpu", "--port", str(port), "--out", str(tmp_path / "out"),
                *ANSWERING], block=False)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(f"http://127.0.0.1:{port}/")
        box = wait.until(seen.element_to_be_clickable((By.CSS_SELECTOR, "#message textarea")))
        browser.find_element(By.CSS_SELECTOR, "#message input[type=file]").send_keys(served["upload"])
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#message img"))  # the upload's preview
        box.send_keys("a red circle")
        box.send_keys(Keys.ENTER)
        answer = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#chat .message.bot img")
                            and b.find_elements(By.CSS_SELECTOR, "#chat .message.bot"))[-1]
        wait.until(lambda b: "generated" in answer.text)
        browser.save_screenshot(str(tmp_path / "serve.png"))  # looked at by hand: docs/images/serve.png

        # what the page shows is the model's answer to what was typed and attached
        page = app.chat_page
        settings = page.settings(answering_settings())
        (expected,) = page.model.answer([[ImageRef(served["upload"]), "a red circle"]], index=page.index,
                                        mode=settings.mode, **settings.answer_options(page.scheduler))
        first, retrieved, generated, last = expected.parts
        shown = answer.text
        assert first.text.strip() in shown and last.text.strip() in shown
        assert f"retrieved: {retrieved.path} (score {retrieved.score:.3f})" in shown
        assert f"generated (seed {generated.seed}, both)" in shown
        assert len(answer.find_elements(By.CSS_SELECTOR, "img")) == 2
        assert browser.find_elements(By.CSS_SELECTOR, "#chat .message.user img")  # the attached picture
        assert browser.find_element(By.CSS_SELECTOR, "#status").text == ""
    finally:
        app.close()
