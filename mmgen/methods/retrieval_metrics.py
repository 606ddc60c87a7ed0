"""Recall@k over a whole evaluation set, for methods with a retrieval head (FROMAGe, GILL)."""

from __future__ import annotations

import torch

from mmgen.methods.losses import retrieval_recall


class RetrievalMetrics:
    """LightningModule mixin for validation and test: each step logs the losses of
    ``evaluation_outputs(batch) -> (losses, text embeddings, image embeddings)`` (the method
    defines it) and keeps the embeddings; at the epoch's end recall@1/5/10 in both directions is
    logged over the whole set (gathered across ranks, each item once), with ``chance_R@1`` =
    1 / set size."""

    def validation_step(self, batch, batch_idx):
        self._evaluation_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch, stage: str) -> None:
        losses, text_emb, image_emb = self.evaluation_outputs(batch)
        self.log_losses(losses, stage, len(batch["captions"]))
        if not hasattr(self, "_retrieval_embeddings"):
            self._retrieval_embeddings: list[tuple[torch.Tensor, ...]] = []
        index = batch.get("index")
        if index is None:  # a source without dataset indices: rows are taken as distinct
            index = torch.full((text_emb.shape[0],), -1, dtype=torch.long)
        self._retrieval_embeddings.append((text_emb.detach(), image_emb.detach(), torch.as_tensor(index).to(text_emb.device)))

    def on_validation_epoch_end(self):
        self._log_recall("val")

    def on_test_epoch_end(self):
        self._log_recall("test")

    def _log_recall(self, stage: str) -> None:
        collected = getattr(self, "_retrieval_embeddings", [])
        if not collected:
            return
        # Gathered here, before scoring: every query is scored against the whole gallery (every
        # process's images), and duplicates are dropped by dataset index below; torchmetrics'
        # own sync gathers scores after the fact, so it can do neither.
        text = self.gather_global_batch(torch.cat([c[0] for c in collected]), keep_grad=False)
        image = self.gather_global_batch(torch.cat([c[1] for c in collected]), keep_grad=False)
        index = self.gather_global_batch(torch.cat([c[2] for c in collected]), keep_grad=False)
        collected.clear()
        # A distributed sampler pads the last batches with repeats of the first items: keep
        # each dataset item once, so the gallery holds every image exactly once.
        keep = _first_occurrences(index)
        text, image = text[keep], image[keep]
        # Every process computes the same numbers from the gathered set, so every process logs
        # them (a checkpoint monitoring recall works on all ranks); no further reduction.
        for name, value in retrieval_recall(text, image).items():
            self.log(f"{stage}/{name}", value)
        self.log(f"{stage}/chance_R@1", 1.0 / text.shape[0])


def _first_occurrences(index: torch.Tensor) -> torch.Tensor:
    """Positions of the first occurrence of each dataset index (negative ones: all kept)."""
    seen, keep = set(), []
    for position, i in enumerate(index.tolist()):
        if i < 0 or i not in seen:
            keep.append(position)
            seen.add(i)
    return torch.tensor(keep, dtype=torch.long, device=index.device)
