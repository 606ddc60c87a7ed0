"""Each method's answers: text, retrieved and generated images exactly where its tokens say;
what GILL's decision module and the caller's mode run (and what they do not); predict_step,
the Python API and the chat loop."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CLIP_VISION, TINY_OPT, TOY_TOKENIZER, Script, tiny_clip, tiny_llm
from PIL import Image

from mmgen.errors import ConfigError
from mmgen.inference.engine import DecodingOptions, decode
from mmgen.inference.index import RetrievalIndex
from mmgen.inference.types import ImageRef, TextPart

SD_DIM = 16



def tiny_sd():
    from mmgen.components.stable_diffusion import StableDiffusion, tiny_sd_config

    return StableDiffusion(config=tiny_sd_config(text_embed_dim=SD_DIM), tokenizer=TOY_TOKENIZER)


def tiny_fromage():
    from mmgen.components.retrieval_head import RetrievalHead
    from mmgen.methods.fromage import FROMAGe

    model = FROMAGe(tiny_llm("opt"), tiny_clip(), retrieval_head=RetrievalHead(embed_dim=16))
    model.configure_model()
    return model.eval()


def tiny_gill(**kwargs):
    from mmgen.components.gill_mapper import GILLMapper
    from mmgen.components.retrieval_head import RetrievalHead
    from mmgen.components.visual_prefix import LinearVisualPrefix
    from mmgen.methods.gill import GILL

    return GILL(llm=tiny_llm("opt"), visual_encoder=tiny_clip(), image_generator=tiny_sd(),
                visual_prefix=LinearVisualPrefix(n_tokens=4), retrieval_head=RetrievalHead(embed_dim=16),
                gen_mapper=GILLMapper(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                      dim_feedforward=32), **kwargs)


def tiny_minigpt5():
    from mmgen.components.voken_mapper import VokenMapper
    from mmgen.methods.minigpt5 import MiniGPT5

    model = MiniGPT5(llm=tiny_llm("llama"), generator=tiny_sd(),
                     mapper=VokenMapper(num_heads=2, num_encoder_layers=1, num_decoder_layers=1))
    model.configure_model()
    return model.eval()


@pytest.fixture(scope="module")
def gill():
    torch.manual_seed(0)
    model = tiny_gill()
    model.configure_model()
    return model.eval()


def word(model, text):
    return model.llm.tokenizer.convert_tokens_to_ids(text)


def image_files(tmp_path, n):
    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 40), (60 * i % 255, 90, 200)).save(path)
        paths.append(str(path))
    return paths


def kinds(answer):
    return [type(p).__name__ for p in answer.parts]


class Spy:
    """Counts the calls of a bound method (and keeps their arguments), calling through."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = []
        original = getattr(owner, name)

        def spy(*args, **kwargs):
            self.calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)


def group_states(model, conversation, script, max_new_tokens=16):
    """The hidden states of the groups the answer to ``conversation`` will produce."""
    embeds, mask = model.prompt_inputs([conversation])
    decoded = decode(model.llm, embeds, mask, model.token_groups(1.0, 1.0),
                     DecodingOptions(max_new_tokens=max_new_tokens, logits_processors=[Script(script)]))
    return [hit.states for hit in decoded.hits[0]]


# -- FROMAGe -----------------------------------------------------------------------------------
def test_fromage_retrieves_planted_images_where_it_says_ret_and_skips_shown_ones(tmp_path):
    torch.manual_seed(0)
    model = tiny_fromage()
    red, blue = word(model, "red"), word(model, "blue")
    a, b, c = image_files(tmp_path, 3)
    conversation = ["a red circle", ImageRef(a), "and then"]
    script = [red, model.ret_id, blue, model.ret_id, red, model.llm.tokenizer.eos_token_id]
    first, _ = (model.retrieval_head.embed_text(s[0][None].float())[0]
                for s in group_states(model, conversation, script))
    # a: shown in the conversation; b: the same embedding (planted: the first [RET]'s best);
    # c: close to it, what is left for the second [RET] (b is already in this answer)
    embeddings = torch.stack([first, first, first + 0.1 * torch.randn(16)])
    index = RetrievalIndex(embeddings, [a, b, c])
    options = dict(max_new_tokens=8, logits_processors=[Script(script)])
    answer = model.answer([conversation], index=index, **options)[0]
    assert kinds(answer) == ["TextPart", "RetrievedImage", "TextPart", "RetrievedImage", "TextPart"]
    assert [p.text for p in answer.parts if isinstance(p, TextPart)] == ["red", "blue", "red"]
    # the first [RET] gets b (a is shown), the second c (b is already in this answer)
    assert [p.path for p in answer.images] == [b, c]
    assert answer.images[0].score == pytest.approx(1.0, abs=1e-5)

    without = model.answer([["a red circle"]], **options)[0]  # no index: text only, with a warning
    assert kinds(without) == ["TextPart", "TextPart", "TextPart"]
    with pytest.raises(ConfigError, match="cannot generate"):
        model.answer([conversation], index=index, mode="generate")


def test_fromage_retrieves_for_a_ret_written_in_the_prompt(tmp_path):
    torch.manual_seed(0)
    model = tiny_fromage()
    conversation = ["a red circle [RET]"]
    fmt = model.sequence_format()
    segments, _ = fmt.prompt(conversation)
    assert segments[0].ids[-1] == model.ret_id
    seq = fmt.collate([segments])
    with torch.no_grad():  # the state at the prompt's [RET], from a plain forward
        hidden = model.llm(seq.embed(model.llm.embed), seq.attention_mask).hidden[0, -1]
        query = model.retrieval_head.embed_text(hidden[None].float())[0]
    a, b = image_files(tmp_path, 2)
    index = RetrievalIndex(torch.stack([torch.randn(16), query]), [a, b])
    script = [word(model, "red"), model.llm.tokenizer.eos_token_id]
    answer = model.answer([conversation, ["a blue square"]], index=index, max_new_tokens=4,
                          logits_processors=[Script(script)])
    assert kinds(answer[0]) == ["RetrievedImage", "TextPart"] and kinds(answer[1]) == ["TextPart"]
    assert answer[0].parts[0].path == b and answer[0].parts[0].score == pytest.approx(1.0, abs=1e-5)


def test_fromage_refuses_an_index_of_another_model(tmp_path):
    torch.manual_seed(0)
    model = tiny_fromage()
    other = tiny_fromage()  # other random weights
    index = RetrievalIndex.build(other, image_files(tmp_path, 2))
    with pytest.raises(ConfigError, match="another model"):
        model.answer([["a red circle"]], index=index, max_new_tokens=4)


def test_fromage_captions_from_the_prefix_alone(monkeypatch):
    import mmgen.inference.engine as engine

    model = tiny_fromage()
    spy = Spy(monkeypatch, engine, "decode")
    captions = model.caption(torch.rand(2, 3, 32, 32), max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    (args, kwargs), = spy.calls
    embeds = args[1] if len(args) > 1 else kwargs["inputs_embeds"]
    assert embeds.shape[:2] == (2, model.visual_prefix.n_tokens)  # [prefix], no [BOS]


# -- GILL ---------------------------------------------------------------------------------------
def gill_script(model):
    red, blue = word(model, "red"), word(model, "blue")
    return [red, model.img_ids[0]] + [None] * 7 + [blue, model.llm.tokenizer.eos_token_id]


@pytest.fixture
def gill_index(gill, tmp_path):
    return RetrievalIndex.build(gill, image_files(tmp_path, 3))


@pytest.mark.parametrize("mode, expected", [
    ("retrieve", ["TextPart", "RetrievedImage", "TextPart"]),
    ("generate", ["TextPart", "GeneratedImage", "TextPart"]),
    ("both", ["TextPart", "RetrievedImage", "GeneratedImage", "TextPart"]),
])
def test_gill_runs_what_the_mode_asks_and_nothing_else(gill, gill_index, monkeypatch, mode, expected):
    generated = Spy(monkeypatch, gill.image_generator, "generate")
    searched = Spy(monkeypatch, gill_index, "search")
    answer = gill.answer([["a red circle"]], index=gill_index, mode=mode, max_new_tokens=16, num_inference_steps=2,
                         seed=7, logits_processors=[Script(gill_script(gill))])[0]
    assert kinds(answer) == expected
    assert [p.text for p in answer.parts if isinstance(p, TextPart)] == ["red", "blue"]
    assert len(generated.calls) == (mode in ("generate", "both"))
    assert len(searched.calls) == (mode in ("retrieve", "both"))
    if generated.calls:
        (args, kwargs), = generated.calls
        assert args[1] is None  # the unconditional branch is SD's own empty prompt
        image = answer.images[-1]
        assert image.seed == 7 and image.decision == ("both" if mode == "both" else "generate")
        assert image.image.size == (32, 32)


def test_gill_generates_the_mapper_output_of_the_captured_states(gill, monkeypatch):
    generated = Spy(monkeypatch, gill.image_generator, "generate")
    script = gill_script(gill)
    gill.answer([["a red circle"]], mode="generate", max_new_tokens=16, num_inference_steps=2,
                logits_processors=[Script(script)])
    (states,) = group_states(gill, ["a red circle"], script)
    embeds = gill.llm.embed(torch.tensor(gill.img_ids))[None]
    expected = gill.gen_mapper(states[None].float(), embeds.float())
    torch.testing.assert_close(generated.calls[0][0][0], expected)


@pytest.mark.parametrize("bias, chosen", [((10.0, -10.0), "GeneratedImage"), ((-10.0, 10.0), "RetrievedImage")])
def test_gill_decision_module_chooses_what_runs(gill, gill_index, monkeypatch, bias, chosen):
    from mmgen.components.decision_head import DecisionHead

    head = DecisionHead(dropout=0.0)
    head.configure(gill.llm.hidden_size)
    with torch.no_grad():
        head.head[1].weight.zero_()
        head.head[1].bias.copy_(torch.tensor(bias))
    generated = Spy(monkeypatch, gill.image_generator, "generate")
    searched = Spy(monkeypatch, gill_index, "search")
    answer = gill.answer([["a red circle"]], index=gill_index, decision_head=head, max_new_tokens=16,
                         num_inference_steps=2, logits_processors=[Script(gill_script(gill))])[0]
    assert kinds(answer) == ["TextPart", chosen, "TextPart"]
    assert len(generated.calls) == (chosen == "GeneratedImage")
    assert len(searched.calls) == (chosen == "RetrievedImage")
    if chosen == "GeneratedImage":
        assert answer.images[0].decision == "auto"

    # the caller's mode overrides the decision module
    forced = "retrieve" if chosen == "GeneratedImage" else "generate"
    answer = gill.answer([["a red circle"]], index=gill_index, mode=forced, decision_head=head, max_new_tokens=16,
                         num_inference_steps=2, logits_processors=[Script(gill_script(gill))])[0]
    assert kinds(answer)[1] == {"retrieve": "RetrievedImage", "generate": "GeneratedImage"}[forced]


def test_gill_answers_auto_with_its_own_decision_module():
    from mmgen.components.decision_head import DecisionHead

    torch.manual_seed(0)
    gill = tiny_gill(decision_head=DecisionHead(dropout=0.0))
    gill.configure_model()
    gill.eval()
    with torch.no_grad():
        gill.decision_head.head[1].weight.zero_()
        gill.decision_head.head[1].bias.copy_(torch.tensor([10.0, -10.0]))  # generate
    assert gill.image_generator.unet is None  # generation builds UNet/VAE on first use
    answer = gill.answer([["a red circle"]], max_new_tokens=16, num_inference_steps=2,
                         logits_processors=[Script(gill_script(gill))])[0]
    assert kinds(answer) == ["TextPart", "GeneratedImage", "TextPart"]


def test_gill_auto_without_decision_module_uses_what_is_there(gill, gill_index):
    options = dict(max_new_tokens=16, num_inference_steps=2, logits_processors=[Script(gill_script(gill))])
    assert kinds(gill.answer([["a red circle"]], index=gill_index, **options)[0])[1] == "RetrievedImage"
    assert kinds(gill.answer([["a red circle"]], **options)[0])[1] == "GeneratedImage"
    with pytest.raises(ConfigError, match="needs a retrieval index"):
        gill.answer([["a red circle"]], mode="retrieve")
    with pytest.raises(ConfigError, match="mode must be one of"):
        gill.answer([["a red circle"]], mode="draw")


def test_gill_batch_with_an_input_image_and_per_row_modes(gill, gill_index, tmp_path):
    (path,) = image_files(tmp_path, 1)
    batch = {
        "ids": ["a", "b"],
        "conversations": [["a red circle", ImageRef(path), "next"], ["a blue square"]],
        "modes": [None, "generate"],
        "index": gill_index,
        "options": {"mode": "retrieve", "max_new_tokens": 16, "num_inference_steps": 2, "seed": 0,
                    "logits_processors": [Script(gill_script(gill))]},
    }
    answers = gill.predict_step(batch, 0)
    assert [kinds(a)[1] for a in answers] == ["RetrievedImage", "GeneratedImage"]
    assert answers[0].images[0].path != path  # the conversation's own image is never retrieved


def test_negative_scale_factor_is_sensible(gill):
    """A large factor makes [IMG0] come first even where its logit is negative."""
    ids = gill.answer([["a red circle"]], mode="generate", max_new_tokens=12, num_inference_steps=2,
                      gen_scale_factor=1e12)[0]
    assert kinds(ids)[0] == "GeneratedImage"
    never = gill.answer([["a red circle"]], mode="generate", max_new_tokens=12, ret_scale_factor=0.0,
                        logits_processors=[Script([None, gill.img_ids[0]])])[0]
    assert not never.images  # factor 0 forbids the group even against the script's push


# -- MiniGPT-5 -----------------------------------------------------------------------------------
def test_minigpt5_generates_from_the_states_that_predict_the_vokens(monkeypatch):
    from mmgen.data.interleave import Text

    torch.manual_seed(0)
    model = tiny_minigpt5()
    red = word(model, "red")
    eos = model.llm.tokenizer.eos_token_id
    script = [red, model.voken_ids[0]] + [None] * 7 + [red, eos]
    generated = Spy(monkeypatch, model.generator, "generate")
    answer = model.answer([["show me a red circle"]], do_sample=False, max_new_tokens=16, num_inference_steps=2,
                          seed=3, logits_processors=[Script(script)])[0]
    assert kinds(answer) == ["TextPart", "GeneratedImage", "TextPart"]
    assert answer.images[0].seed == 3

    # the mapper input: training's voken features of the same tokens (states predicting [IMG0..7])
    fmt = model.sequence_format()
    segments, _ = fmt.prompt(["show me a red circle"])
    seq = fmt.collate([segments + [Text([red] + model.voken_ids + [red])]])
    with torch.no_grad():
        hidden = model.llm(seq.embed(model.llm.embed), seq.attention_mask).hidden
        expected = model.mapper(model.voken_features(seq.input_ids, hidden).float())
    (args, kwargs), = generated.calls
    torch.testing.assert_close(args[0], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(args[1], model.mapper.negative_embedding(1, 8))  # mapper(zeros)

    with pytest.raises(ConfigError, match="cannot retrieve"):
        model.answer([["hi"]], mode="retrieve")


def test_minigpt5_prompt_is_a_human_turn():
    model = tiny_minigpt5()
    source, images = model.sequence_format().source_of(["a red", "circle"])
    assert source == "###Human: a red circle ###Assistant:" and images == []


# -- API and chat --------------------------------------------------------------------------------
def fromage_config():
    return {
        "class_path": "mmgen.methods.fromage.FROMAGe",
        "init_args": {
            "llm": {"class_path": "mmgen.components.causal_lm.CausalLM",
                    "init_args": {"config": dict(TINY_OPT), "tokenizer": TOY_TOKENIZER}},
            "visual_encoder": {"class_path": "mmgen.components.clip_vision.CLIPVisionEncoder",
                               "init_args": {"config": dict(TINY_CLIP_VISION)}},
        },
    }


def test_api_loads_checkpoints_and_pretrained_folders_and_answers(tmp_path):
    from mmgen.inference.api import answer, load_model
    from mmgen.pretrained import build_model, trained_state

    torch.manual_seed(0)
    model = build_model(fromage_config())
    model.configure_model()
    with torch.no_grad():
        model.visual_prefix.proj.weight.add_(1.0)
    state = trained_state(model)
    with pytest.warns(UserWarning, match="random"):
        model.save_pretrained(tmp_path / "folder")
    hparams = {"_class_path": "mmgen.methods.fromage.FROMAGe", **dict(model.hparams)}
    hparams.pop("_instantiator", None)
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "last.ckpt")
    for source in (tmp_path / "folder", tmp_path / "last.ckpt"):
        loaded = load_model(source, device="cpu")
        assert type(loaded).__name__ == "FROMAGe" and not loaded.training
        for name, tensor in trained_state(loaded).items():
            torch.testing.assert_close(tensor, state[name])
        answers = answer(loaded, ["a red circle"], max_new_tokens=3)  # one conversation
        assert len(answers) == 1 and isinstance(answers[0].text, str)
    with pytest.raises(ConfigError, match="not a pretrained folder"):
        load_model(tmp_path)

    # mmgen chat on the same folder, lines from a file instead of the terminal
    import io

    from mmgen.inference.chat import main as chat_main

    chat = chat_main(["--model", str(tmp_path / "folder"), "--max-new-tokens", "3", "--device", "cpu",
                      "--out", str(tmp_path / "chat")], lines=io.StringIO("a red circle\n/quit\n"))
    assert len(chat.turns) == 1 and (tmp_path / "chat" / "index.html").is_file()


def test_chat_keeps_the_conversation_and_writes_the_page(tmp_path):
    from mmgen.inference.chat import Chat

    torch.manual_seed(0)
    model = tiny_fromage()
    (path,) = image_files(tmp_path, 1)
    said = []
    chat = Chat(model, out=tmp_path / "chat", options={"max_new_tokens": 3}, write=said.append)
    for line in [f"/image {path}", "a red circle", "/image missing.png", "and a blue one"]:
        assert chat.handle(line)
    assert not chat.handle("/quit")
    assert len(chat.turns) == 2 and isinstance(chat.turns[0][0][0], ImageRef)
    assert any("no such image" in s for s in said)
    assert chat.history[0] == ImageRef(path) and "and a blue one" in chat.history
    page = chat.save()
    assert page is not None and page.is_file()


def test_predict_falls_back_to_auto_for_modes_a_method_cannot_run():
    torch.manual_seed(0)
    model = tiny_fromage()
    batch = {"ids": ["a", "b"], "conversations": [["a red circle"], ["a blue one"]], "modes": ["generate", None],
             "index": None, "options": {"max_new_tokens": 3}}
    with pytest.warns(UserWarning, match="cannot generate"):
        answers = model.predict_step(batch, 0)
    assert len(answers) == 2 and not any(a.images for a in answers)
