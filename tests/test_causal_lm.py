"""The LLM backbone contract: any causal LM, three ways of building, only new rows train."""

import pytest
import torch

from conftest import TINY_LLAMA, TINY_OPT, TOY_TOKENIZER, tiny_llm
from mmgen.components.causal_lm import CausalLM
from mmgen.methods.optim import Optim, build_optimizer

NEW = ["[IMG0]", "[IMG1]"]


def _train_steps(llm, steps=3, weight_decay=0.1):
    optimizer = build_optimizer(llm, Optim(lr=0.05, weight_decay=weight_decay, warmup_steps=0), 10)["optimizer"]
    ids = torch.tensor([[1, 3, 5, llm.token_id("[IMG0]"), llm.token_id("[IMG1]"), 7]])
    for _ in range(steps):
        out = llm(llm.embed(ids), torch.ones_like(ids), labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_only_new_rows_train_and_frozen_rows_stay_bit_identical(family):
    llm = tiny_llm(family)
    llm.configure(new_tokens=NEW)
    base = llm.model.get_base_model()
    matrices = {"in": base.get_input_embeddings().weight}
    out_layer = base.get_output_embeddings()
    weight_out = getattr(out_layer, "base_layer", out_layer).weight
    tied = family == "opt"
    if not tied:
        matrices["out"] = weight_out
    before = {k: m.detach().clone() for k, m in matrices.items()}
    trainable = {n: p.shape for n, p in llm.named_parameters() if p.requires_grad}
    assert len(trainable) == (1 if tied else 2)
    assert all(shape == (2, 32) for shape in trainable.values())
    rows_before = llm.embed(torch.tensor([llm.new_token_ids])).detach().clone()

    _train_steps(llm)  # AdamW with weight decay 0.1: the reference's defect would shrink frozen rows

    for key, matrix in matrices.items():
        assert torch.equal(matrix, before[key]), f"{key} matrix changed"
    rows_after = llm.embed(torch.tensor([llm.new_token_ids]))
    assert not torch.allclose(rows_after, rows_before), "the new rows did not train"
    # the LM head scores new tokens with the trained rows (tied for OPT: the same rows)
    ids = torch.tensor([[1, 3, llm.new_token_ids[0]]])
    out = llm(llm.embed(ids), torch.ones_like(ids))
    head = rows_after[0] if tied else llm.model.get_output_embeddings()(torch.eye(32))[:, llm.new_token_ids].t()
    torch.testing.assert_close(out.logits[0, -1, llm.new_token_ids], out.hidden[0, -1] @ head.t())
    old_ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(llm.embed(old_ids), torch.nn.functional.embedding(old_ids, before["in"]))


def test_new_rows_get_no_weight_decay_and_train_in_fp32():
    llm = tiny_llm("opt", dtype="bfloat16")
    llm.configure(new_tokens=NEW)
    groups = build_optimizer(llm, Optim(weight_decay=0.1), 10)["optimizer"].param_groups
    assert [g["weight_decay"] for g in groups] == [0.0]
    assert all(p.dtype == torch.float32 for g in groups for p in g["params"])


def test_hidden_is_the_last_layer_after_the_final_norm():
    llm = tiny_llm("llama")
    llm.configure()
    ids = torch.tensor([[1, 4, 6, 8]])
    out = llm(llm.embed(ids), torch.ones_like(ids))
    reference = llm.model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden, reference.hidden_states[-1])
    norm_out = llm.model.model.norm(llm.model.model(input_ids=ids).last_hidden_state)
    assert out.hidden.shape == (1, 4, 32) and norm_out.shape == out.hidden.shape


def test_mean_init_sets_new_rows_to_the_mean_of_existing_rows():
    llm = tiny_llm("llama")
    llm.configure(new_tokens=NEW, new_token_init="mean")
    weight = llm.model.get_base_model().get_input_embeddings().weight
    n_old = llm.new_token_ids[0]
    expected = weight[:n_old].mean(0)
    rows = llm.embed(torch.tensor(llm.new_token_ids))
    torch.testing.assert_close(rows, expected.expand_as(rows))


def test_loads_from_a_local_folder(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(TINY_OPT)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values)).eval()
    model.save_pretrained(tmp_path / "lm")
    llm = CausalLM(name_or_path=str(tmp_path / "lm"), tokenizer=TOY_TOKENIZER)
    llm.configure()
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(llm.model(input_ids=ids).logits, model(input_ids=ids).logits)
    # the same folder with random_weights builds the architecture only
    random = CausalLM(name_or_path=str(tmp_path / "lm"), tokenizer=TOY_TOKENIZER, random_weights=True, seed=1)
    random.configure()
    assert not torch.allclose(random.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_rescale_new_rows_sets_the_mean_frozen_norm():
    llm = tiny_llm("opt")
    llm.configure(new_tokens=NEW)
    llm.rescale_new_rows()
    weight = llm.model.get_base_model().get_input_embeddings().weight
    expected = weight[: llm.new_token_ids[0]].norm(dim=-1).mean()
    norms = llm.embed(torch.tensor(llm.new_token_ids)).norm(dim=-1)
    torch.testing.assert_close(norms, expected.expand(2))


def test_unknown_token_is_a_clear_error():
    llm = tiny_llm("opt")
    llm.configure()
    with pytest.raises(ValueError, match=r"token '\[NOPE\]' is not in the tokenizer"):
        llm.token_id("[NOPE]")


def test_lora_adapter_trains_lora_and_new_rows_only():
    from mmgen.components.lora import LoRA

    llm = CausalLM(config=dict(TINY_LLAMA), tokenizer=TOY_TOKENIZER, adapter=LoRA(r=2))
    llm.configure(new_tokens=NEW)
    names = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert sum("lora_" in n for n in names) == 8  # A and B for q and v in 2 layers
    assert sum("trainable_tokens" in n for n in names) == 2  # input and (untied) output rows
    llm.train()
    dropouts = [m for n, m in llm.model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(m.training for m in dropouts)
    assert not llm.model.get_base_model().model.layers[0].mlp.training  # the frozen LM stays in eval


# -- how new tokens are added ----------------------------------------------------------------
def _metaspace_tokenizer(folder):
    """A LLaMA-like fast tokenizer (BPE over SentencePiece's "▁" word marks), saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["▁"])
    tk.train_from_iterator(["we had lunch . then we went home .", "###Human: tell me ###Assistant: ok ###"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    return str(folder)


def test_minigpt5_vokens_tokenise_as_the_official_slow_tokenizer(tmp_path):
    """The official (slow, legacy) LLaMA tokenizer eats the space before an added special token:
    "lunch . [IMG0]" has no lone "▁" before [IMG0], and the "▁###" after [IMG7] keeps its "▁"."""
    from mmgen.methods.minigpt5 import VOCABULARY

    folder = _metaspace_tokenizer(tmp_path / "tok")
    llm = CausalLM(config=dict(TINY_LLAMA, vocab_size=80), tokenizer=folder)
    llm.configure(new_tokens=VOCABULARY, new_token_init="mean")
    tok = llm.tokenizer
    vokens = [llm.token_id(f"[IMG{i}]") for i in range(8)]
    ids = tok("we had lunch . " + "".join(f"[IMG{i}]" for i in range(8)) + " ###", add_special_tokens=False).input_ids
    words = tok.convert_tokens_to_ids(["▁we", "▁had", "▁lunch", "▁.", "▁###"])
    assert ids == words[:4] + vokens + words[4:]
    assert tok.convert_tokens_to_ids("▁") not in ids
    # the old way (plain special tokens) would add the lone "▁" the official tokenizer drops
    plain = CausalLM(config=dict(TINY_LLAMA, vocab_size=80), tokenizer=folder)
    plain.configure(new_tokens=[f"[IMG{i}]" for i in range(8)])
    assert plain.tokenizer.convert_tokens_to_ids("▁") in plain.tokenizer("lunch . [IMG0]", add_special_tokens=False).input_ids


def test_frozen_new_tokens_get_rows_but_do_not_train():
    from mmgen.components.base import NewToken

    llm = tiny_llm("opt")
    llm.configure(new_tokens=[NewToken("<|image|>", trainable=False), NewToken("[RET]", special=False)])
    image, ret = llm.token_id("<|image|>"), llm.token_id("[RET]")
    assert ret == image + 1 and llm.added_token_ids == [image, ret] and llm.new_token_ids == [ret]
    assert llm.model.get_input_embeddings().weight.shape[0] == ret + 1
    trainable = [p for p in llm.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == llm.embed_dim  # one row: [RET]
    assert "[RET]" not in llm.tokenizer.all_special_tokens and "<|image|>" in llm.tokenizer.all_special_tokens
