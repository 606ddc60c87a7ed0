"""Recall@k over a whole evaluation set, for methods with a retrieval head (FROMAGe, GILL)."""

from __future__ import annotations

import torch

from mmgen.methods.losses import retrieval_recall


class RetrievalMetrics:
    """LightningModule mixin for validation and test: each step logs the losses of
    ``evaluation_outputs(batch) -> (losses, text embeddings, image embeddings)`` (the method
    defines it) and keeps the embeddings; at the epoch's end recall@1/5/10 in both directions is
    logged over the whole set (gathered across ranks), with ``chance_R@1`` = 1 / set size."""

    def validation_step(self, batch, batch_idx):
        self._evaluation_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch, stage: str) -> None:
        losses, text_emb, image_emb = self.evaluation_outputs(batch)
        self.log_losses(losses, stage, len(batch["captions"]))
        if not hasattr(self, "_retrieval_embeddings"):
            self._retrieval_embeddings: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._retrieval_embeddings.append((text_emb.detach(), image_emb.detach()))

    def on_validation_epoch_end(self):
        self._log_recall("val")

    def on_test_epoch_end(self):
        self._log_recall("test")

    def _log_recall(self, stage: str) -> None:
        collected = getattr(self, "_retrieval_embeddings", [])
        if not collected:
            return
        text = self.gather_global_batch(torch.cat([t for t, _ in collected]), keep_grad=False)
        image = self.gather_global_batch(torch.cat([i for _, i in collected]), keep_grad=False)
        collected.clear()
        for name, value in retrieval_recall(text, image).items():
            self.log(f"{stage}/{name}", value, rank_zero_only=True)
        self.log(f"{stage}/chance_R@1", 1.0 / text.shape[0], rank_zero_only=True)
