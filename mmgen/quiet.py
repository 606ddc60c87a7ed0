"""Warnings a user of mmgen cannot act on, silenced where mmgen triggers them; each says why.

Only exact messages are matched, so any other warning of the same libraries still shows.
:func:`quiet_training_run` is installed by the ``mmgen`` command before its Trainer runs; the
context managers wrap the calls inside mmgen's components that trigger the others.
"""

from __future__ import annotations

import contextlib
import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.starts)


def quiet_training_run() -> None:
    """Lightning's notices about what mmgen does on purpose, for the rest of the process."""
    # Advertising (litlogger, litmodels), printed on every run.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_TIPS)  # once: the same object
    # The frozen backbones stay in eval mode while the method trains (no dropout in them): intended.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # Lightning's own use of a torch API deprecated in torch 2.13; nothing in mmgen or a config causes it.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@contextlib.contextmanager
def quiet_peft_wrap():
    """Around ``get_peft_model`` of a frozen LLM with mmgen's trainable token rows."""
    with warnings.catch_warnings():
        # OPT ties its LM head to the input embeddings; peft's TrainableTokens trains the tied
        # rows in both (mmgen's token rows), and peft warns for LoRA-merging cases mmgen never uses.
        warnings.filterwarnings("ignore", message=r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter")
        # peft reads transformers' deprecated `is_gradient_checkpointing` property.
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
        yield


@contextlib.contextmanager
def quiet_transformer_build():
    """Around ``nn.Transformer(norm_first=True)`` (the GILL and MiniGPT-5 mappers)."""
    with warnings.catch_warnings():
        # torch's nested-tensor fast path needs post-norm layers; the mappers are pre-norm as
        # published, so torch says it will not use it, on every build.
        warnings.filterwarnings("ignore", message=r"enable_nested_tensor is True, but self.use_nested_tensor is False")
        yield


@contextlib.contextmanager
def quiet_load_report():
    """Around a ``from_pretrained`` whose caller checks the loading info itself (transformers logs
    a table of every unexpected key as a warning)."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quiet_diffusers_casts() -> None:
    """diffusers warns on every ``model.to(dtype)`` of a model whose list of float32-only modules
    is empty ("should be kept in float32: []"): there is nothing to keep, so nothing to do."""
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_EMPTY_FP32)  # once: the same object


class _EmptyFp32List(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in str(record.getMessage())


_TIPS = _DropMessages("💡 Tip:")
_EMPTY_FP32 = _EmptyFp32List()
