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


def retrieval_recall(text: torch.Tensor, image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k of text->image and image->text over matching rows of ``text`` and ``image``
    (each row's match is the same row of the other side), by torchmetrics' ``RetrievalRecall``.

    The scores are computed here, on the CPU ((n, n) similarities: the metric takes them flat,
    n^2 entries with their query index). Every caller holds the whole gathered evaluation set, so
    the metric does not sync across processes (that would count each query once per process).
    """
    from torchmetrics.retrieval import RetrievalRecall

    sims = (text.float() @ image.float().t()).cpu()  # (n, n)
    n = sims.shape[0]
    target = torch.eye(n, dtype=torch.bool).flatten()  # (n * n,)
    queries = torch.arange(n).repeat_interleave(n)  # (n * n,): the query of each score
    out = {}
    for name, matrix in (("t2i", sims), ("i2t", sims.t())):
        # torchmetrics counts a relevant item only where its score is > 0 (its scores are meant to
        # be probabilities); a per-query shift above 0 keeps the ranking: the plain recall@k the
        # papers report (the match within the k best-scored), negative cosine similarities too
        scores = (matrix - matrix.min(dim=1, keepdim=True).values + 1).flatten()
        for k in ks:
            metric = RetrievalRecall(top_k=k, sync_on_compute=False)
            metric.update(scores, target, indexes=queries)
            out[f"{name}_R@{k}"] = float(metric.compute())
    return out
