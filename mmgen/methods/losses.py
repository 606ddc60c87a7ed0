"""Loss functions shared by the methods, written against the reference's exact forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_keeping_local_grad(local: torch.Tensor, gathered: torch.Tensor, rank: int) -> torch.Tensor:
    """The global batch (world * b, d) from every rank's shard, with this rank's own shard kept in
    the graph so gradients flow to it (all-gathered copies carry none).

    ``gathered`` is ``LightningModule.all_gather(local)``: (world, b, d), or ``local`` itself
    when there is one process.
    """
    if gathered.dim() == local.dim():
        return local
    shards = list(gathered.unbind(0))
    shards[rank] = local
    return torch.cat(shards)


def infonce_terms(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor):
    """(CE_t2i, CE_i2t) between matching rows of L2-normalised ``text`` and ``image`` (n, e).

    As in the reference, only the image side is multiplied by ``exp(logit_scale)``; t2i is the
    cross-entropy of the text-to-image logits, i2t of their transpose.
    """
    logits_t2i = text @ (logit_scale.exp() * image).t()  # (n, n)
    target = torch.arange(text.shape[0], device=text.device)
    return F.cross_entropy(logits_t2i, target), F.cross_entropy(logits_t2i.t(), target)


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``factor`` in the backward."""
    return x if factor == 1 else x * factor + x.detach() * (1 - factor)


def symmetric_infonce(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(CE_t2i + CE_i2t) / 2: see :func:`infonce_terms`."""
    t2i, i2t = infonce_terms(text, image, logit_scale)
    return (t2i + i2t) / 2


def retrieval_recall(text: torch.Tensor, image: torch.Tensor, ks=(1, 5, 10),
                     scores_per_chunk: int = 1 << 22) -> dict[str, float]:
    """Recall@k of text->image and image->text over matching rows of ``text`` and ``image``
    (each row's match is the same row of the other side), by torchmetrics' ``RetrievalRecall``.

    The scores are computed here, on the CPU, a chunk of queries at a time: the metric takes them
    flat with their query index and keeps every one it is given, so the whole (n, n) matrix at
    once would cost n^2 of each (for a 30k-image gallery, about 12 GB of scores, targets and query
    indexes, by count). Recall is a mean over queries, so chunks are weighted by their number of
    queries. Every caller holds the whole
    gathered evaluation set, so the metric does not sync across processes (that would count each
    query once per process).
    """
    from torchmetrics.retrieval import RetrievalRecall

    text, image = text.float().cpu(), image.float().cpu()
    n = text.shape[0]
    chunk = max(1, scores_per_chunk // max(n, 1))
    totals = {}
    for name, queries, items in (("t2i", text, image), ("i2t", image, text)):
        for start in range(0, n, chunk):
            sims = queries[start:start + chunk] @ items.t()  # (c, n)
            c = sims.shape[0]
            target = torch.zeros(c, n, dtype=torch.bool)
            target[torch.arange(c), torch.arange(start, start + c)] = True
            # torchmetrics counts a relevant item only where its score is > 0 (its scores are meant
            # to be probabilities); a per-query shift above 0 keeps the ranking: the plain recall@k
            # the papers report (the match within the k best-scored), negative cosine similarities too
            scores = (sims - sims.min(dim=1, keepdim=True).values + 1).flatten()
            indexes = torch.arange(c).repeat_interleave(n)  # (c * n,): the query of each score
            for k in ks:
                metric = RetrievalRecall(top_k=k, sync_on_compute=False)
                metric.update(scores, target.flatten(), indexes=indexes)
                key = f"{name}_R@{k}"
                totals[key] = totals.get(key, 0.0) + float(metric.compute()) * c
    return {key: value / n for key, value in totals.items()}
