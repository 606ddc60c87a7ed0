"""``mmgen predict``'s output: a Lightning callback that writes the answers as a report folder.

    trainer:
      callbacks:
        - class_path: mmgen.inference.writer.AnswerWriter
          init_args: {output_dir: runs/predict_toy}

Each batch's answers (``predict_step`` returns one ``mmgen.inference.types.Answer`` per
conversation of a ``mmgen.data.prompts.PromptDataModule`` batch) are written as they come:
generated images go to ``output_dir/images`` at once; ``answers.json`` and the self-contained
``index.html`` (``mmgen.inference.report``) are written when prediction ends. With several
processes each writes its images and the first writes the page for all, in prompt order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from mmgen.errors import ConfigError
from mmgen.inference.report import Report
from mmgen.inference.types import Answer


class AnswerWriter(BasePredictionWriter):
    """Writes predicted answers to ``output_dir`` (PNG images, answers.json, index.html).

    Args:
        output_dir: Folder to write (created; files of an earlier run with the same names are
            replaced).
        title: Heading of the HTML page (default: the model's class and the output folder).
    """

    def __init__(self, output_dir: str = "predictions", title: str | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.title = title
        self.report: Report | None = None
        self._numbered: list[tuple[int, dict]] = []
        self.page: Path | None = None  # the written index.html, once prediction has ended

    def on_predict_start(self, trainer, pl_module) -> None:
        metadata = {"model": type(pl_module).__name__}
        if trainer.ckpt_path:
            metadata["checkpoint"] = str(trainer.ckpt_path)
        title = self.title or f"{type(pl_module).__name__} answers"
        self.report = Report(self.output_dir, title, metadata)
        self._numbered = []
        self.page = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if not isinstance(batch, dict) or "conversations" not in batch or "ids" not in batch:
            raise ConfigError("AnswerWriter needs prompt batches ({'ids', 'conversations', ...}): use "
                              "mmgen.data.prompts.PromptDataModule as the data")
        ids, conversations = batch["ids"], batch["conversations"]
        modes = batch.get("modes") or [None] * len(ids)
        if not isinstance(prediction, (list, tuple)) or not all(isinstance(a, Answer) for a in prediction):
            raise ConfigError(
                f"AnswerWriter: {type(pl_module).__name__}.predict_step returned {type(prediction).__name__}; "
                "it must return a list of mmgen.inference.types.Answer, one per conversation"
            )
        if len(prediction) != len(ids):
            raise ConfigError(f"AnswerWriter: {type(pl_module).__name__}.predict_step returned {len(prediction)} "
                              f"answers for a batch of {len(ids)} conversations")
        numbers = list(batch_indices) if batch_indices is not None and len(batch_indices) == len(ids) else None
        for i, (conversation_id, conversation, answer, mode) in enumerate(zip(ids, conversations, prediction, modes)):
            number = numbers[i] if numbers is not None else len(self._numbered)
            record = self.report.add(conversation_id, conversation, answer, mode, number=number)
            self._numbered.append((number, record))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        numbered = self._numbered
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, numbered)
            numbered = [item for part in gathered for item in part]
        if trainer.is_global_zero:
            # a distributed sampler repeats a few items to even out the ranks: keep each once
            unique = dict(sorted(numbered, key=lambda item: item[0]))
            self.page = self.report.finish([unique[n] for n in sorted(unique)])
            rank_zero_info(f"{len(unique)} answers written to {self.output_dir} (open {self.page})")
