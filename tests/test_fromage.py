"""FROMAGe end to end (its losses against the published equations are in test_parity.py):
`mmgen fit` in-process, trainable-only checkpoints, resume, reload for evaluation."""

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
