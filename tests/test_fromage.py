"""FROMAGe end to end: losses against a hand-built reference, `mmgen fit` in-process, trainable-only
checkpoints, resume, reload for evaluation."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_clip, tiny_llm
from mmgen.cli import main
from mmgen.errors import ConfigError
from mmgen.methods.fromage import FROMAGe


@pytest.fixture
def fromage():
    model = FROMAGe(tiny_llm("opt"), tiny_clip())
    model.configure_model()
    return model


def test_losses_match_a_hand_built_reference(fromage, captions):
    images = torch.rand(4, 3, 32, 32)
    losses, text_emb, image_emb = fromage.compute_losses(images, captions)
    llm, tok = fromage.llm, fromage.llm.tokenizer

    features = fromage.visual_encoder(images)
    prefix = fromage.visual_prefix(features)  # (4, 1, 32)
    ids = [tok(c).input_ids + [fromage.ret_id] for c in captions]
    # captioning: one sequence at a time, token-mean CE over the batch, BOS is a target
    total, count, hidden_ret = 0.0, 0, []
    for i, seq in enumerate(ids):
        seq_t = torch.tensor([seq])
        logits = llm(torch.cat([prefix[i : i + 1], llm.embed(seq_t)], 1), torch.ones(1, len(seq) + 1)).logits
        total += F.cross_entropy(logits[0, :-1], seq_t[0], reduction="sum")
        count += len(seq)
    torch.testing.assert_close(losses["caption"], total / count)
    total, count = 0.0, 0
    for seq in ids:
        seq_t = torch.tensor([seq])
        out = llm(llm.embed(seq_t), torch.ones_like(seq_t))
        total += F.cross_entropy(out.logits[0, :-1], seq_t[0, 1:], reduction="sum")
        count += len(seq) - 1
        hidden_ret.append(out.hidden[0, -1])
    torch.testing.assert_close(losses["retmode"], total / count)
    text = F.normalize(fromage.retrieval_head.text_proj(torch.stack(hidden_ret)), dim=-1)
    torch.testing.assert_close(text_emb, text)
    image = F.normalize(fromage.retrieval_head.image_proj(features[:, 0]), dim=-1)
    logits = text @ image.t() / 0.07
    target = torch.arange(4)
    contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(losses["contrastive"], contrastive, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["loss"], losses["caption"] + losses["retmode"] + losses["contrastive"])


def test_long_captions_end_in_ret(fromage):
    fromage.max_text_length = 5
    ids = fromage.caption_ids("a red circle on a blue background")
    assert len(ids) == 4  # + [RET] = 5


def test_packing_changes_only_the_captioning_loss(fromage, captions):
    images = torch.rand(4, 3, 32, 32)
    plain, _, _ = fromage.compute_losses(images, captions, pack=False)
    packed, _, _ = fromage.compute_losses(images, captions, pack=True)
    assert not torch.allclose(plain["caption"], packed["caption"])
    torch.testing.assert_close(plain["retmode"], packed["retmode"])
    torch.testing.assert_close(plain["contrastive"], packed["contrastive"])


def test_full_size_dry_run_counts_the_reference_trainable_parameters():
    rows = main(["params", "--config", "configs/fromage.yaml"])
    table = {name: (total, trainable) for name, total, trainable in rows}
    assert table["visual_prefix"][1] == 1024 * 4096 + 4096
    assert table["retrieval_head"][1] == (1024 * 256 + 256) + (4096 * 256 + 256) + 1
    assert table["llm"][1] == 4096  # the [RET] row, tied input/output
    assert table["visual_encoder"][1] == 0
    trainable = sum(t for _, _, t in rows)
    assert abs(trainable - 5.51e6) < 0.01e6


def _fit_args(tmp_path, *extra):
    return [
        "fit", "--config", "configs/fromage_tiny.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--data.root={tmp_path / 'toy'}", "--data.n_train=64", "--data.n_val=32",
        *extra,
    ]


def test_fit_checkpoints_trainable_weights_only_then_resumes_and_reloads(tmp_path):
    cli = main(_fit_args(tmp_path, "--trainer.max_epochs=1"))
    checkpoint_path = cli.trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert set(checkpoint["state_dict"]) == {
        "llm.model.base_model.model.model.decoder.embed_tokens.trainable_tokens_delta.default",
        "visual_prefix.proj.weight", "visual_prefix.proj.bias",
        "retrieval_head.text_proj.weight", "retrieval_head.text_proj.bias",
        "retrieval_head.image_proj.weight", "retrieval_head.image_proj.bias",
        "retrieval_head.logit_scale",
    }
    assert checkpoint["global_step"] == 4
    metrics = cli.trainer.callback_metrics
    assert {"val/t2i_R@1", "val/i2t_R@10", "val/contrastive"} <= set(metrics)
    assert float(metrics["val/chance_R@1"]) == 1 / 32  # recall over the whole validation set

    resumed = main(_fit_args(tmp_path / "resumed", "--trainer.max_epochs=2", f"--ckpt_path={checkpoint_path}"))
    assert resumed.trainer.global_step == 8  # continued from step 4, not from 0
    first = cli.model.retrieval_head.text_proj.weight
    assert not torch.equal(resumed.model.retrieval_head.text_proj.weight, first)

    # reload for evaluation: hyper-parameters and components come from the checkpoint
    reloaded = FROMAGe.load_from_checkpoint(checkpoint_path)
    torch.testing.assert_close(reloaded.retrieval_head.text_proj.weight, first)
    rows = reloaded.llm.embed(torch.tensor(reloaded.llm.new_token_ids))
    torch.testing.assert_close(rows, cli.model.llm.embed(torch.tensor(cli.model.llm.new_token_ids)))


def test_a_checkpoint_missing_trainable_weights_is_refused(tmp_path, fromage):
    state = {k: v for k, v in fromage.state_dict().items() if "visual_prefix" not in k}
    with pytest.raises(ConfigError, match="missing .*visual_prefix.proj"):
        fromage.on_load_checkpoint({"state_dict": state})
