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
    """Recall@k of text->image and image->text over matching rows of ``text`` and ``image``."""
    from torchmetrics.functional.retrieval import retrieval_recall as recall_one_query

    sims = text @ image.t()  # (n, n)
    n = sims.shape[0]
    target = torch.eye(n, dtype=torch.bool, device=sims.device)
    out = {}
    for name, matrix in (("t2i", sims), ("i2t", sims.t())):
        for k in ks:
            hits = [recall_one_query(matrix[i], target[i], top_k=k) for i in range(n)]
            out[f"{name}_R@{k}"] = float(torch.stack(hits).mean())
    return out
