"""The scores of the papers' tables, computed the same way for every model.

Image metrics take float RGB batches in [0, 1], (n, 3, h, w); text metrics take lists of strings.
torchmetrics computes BLEU, ROUGE-L, FID and IS (with mmgen's feature extractors, see
``mmgen.evaluation.extractors``); CIDEr is pycocoevalcap's (``pip install 'mmgen[eval]'``).
Written here: recall@k over ranked lists, cosine similarities, and the CLIP F1 relevance score,
which are a line each, and CLIPScore, whose torchmetrics class fails with transformers 5.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

RECALL_KS = (1, 5, 10)


def recall_at_k(ranked: Sequence[Sequence[str]], truth: Sequence[str], ks: Sequence[int] = RECALL_KS) -> dict:
    """``{"R@k": percent}``: how often the true item is among the first k of its ranked list."""
    if len(ranked) != len(truth) or not truth:
        raise ValueError(f"recall needs one ranked list per true item, got {len(ranked)} lists for {len(truth)}")
    return {f"R@{k}": 100.0 * sum(t in list(r)[:k] for r, t in zip(ranked, truth)) / len(truth) for k in ks}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (n, e) and (n, e) -> (n,)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def clip_image_similarity(clip, generated: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """CLIP-I: cosine of the CLIP image embeddings of each generated image and its true image, (n,)."""
    return cosine(clip(generated), clip(true))


def clip_score(clip, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """CLIPScore as torchmetrics defines it, 100 * max(cos(image, text), 0), per pair (n,)."""
    return 100.0 * cosine(clip(images), clip.embed_texts(list(texts))).clamp(min=0)


def clip_f1(clip, predicted: Sequence[list], reference: Sequence[list]) -> float:
    """MM-relevance (MMDialog): per response, the F1 of CLIP similarities between its predicted
    elements and its reference elements (each a text or an image tensor (3, h, w)): precision is
    the mean over predicted elements of their best match among the references, recall the same
    the other way round. The mean F1 over responses; responses with nothing predicted score 0."""
    scores = []
    for pred, ref in zip(predicted, reference):
        if not pred or not ref:
            scores.append(0.0)
            continue
        p, r = _embed_elements(clip, pred), _embed_elements(clip, ref)  # (m, e), (k, e)
        sim = (p @ r.T).clamp(min=0)  # (m, k)
        precision, recall = sim.max(dim=1).values.mean(), sim.max(dim=0).values.mean()
        scores.append(float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0)
    return sum(scores) / max(len(scores), 1)


def _embed_elements(clip, elements: list) -> torch.Tensor:
    texts = [e for e in elements if isinstance(e, str)]
    images = [e for e in elements if not isinstance(e, str)]
    parts = []
    if texts:
        parts.append(clip.embed_texts(texts))
    if images:
        parts.append(clip(torch.stack([_same_size(i, images[0]) for i in images])))
    return torch.cat(parts)


def _same_size(image: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if image.shape[-2:] == like.shape[-2:]:
        return image
    return torch.nn.functional.interpolate(image[None], size=like.shape[-2:], mode="bilinear")[0]


def fid(extractor, real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor]) -> float:
    """Fréchet distance between the feature distributions of two image sets (batches of
    (n, 3, h, w) in [0, 1]), torchmetrics' FID with ``extractor``'s features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor.configure()
    metric = FrechetInceptionDistance(feature=extractor, normalize=True)
    for batch in real:
        metric.update(batch, real=True)
    for batch in fake:
        metric.update(batch, real=False)
    return float(metric.compute())


def inception_score(extractor, images: Iterable[torch.Tensor], splits: int = 10) -> tuple[float, float]:
    """(mean, std) Inception Score over ``splits`` splits, torchmetrics' IS with ``extractor``'s
    logits. ``splits`` is lowered to the number of images when there are fewer."""
    from torchmetrics.image.inception import InceptionScore

    from mmgen.evaluation.extractors import _Logits

    extractor.configure()
    batches = list(images)
    n = sum(b.shape[0] for b in batches)
    metric = InceptionScore(feature=_Logits(extractor), splits=max(1, min(splits, n)))
    for batch in batches:
        metric.update(batch)
    with torch.random.fork_rng():  # compute() permutes the features with the global generator
        torch.manual_seed(0)
        mean, std = metric.compute()
    return float(mean), float(std) if n > 1 else 0.0


def text_scores(predictions: Sequence[str], references: Sequence[str], bleu: Sequence[int] = (1, 2, 3, 4),
                rouge: bool = True, cider: bool = True) -> dict:
    """Corpus BLEU-n (torchmetrics, percent), ROUGE-L F (torchmetrics, percent) and CIDEr
    (pycocoevalcap, when installed; ``None`` otherwise) of one prediction per reference."""
    from torchmetrics.text import BLEUScore, ROUGEScore

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    predictions = [p.strip().lower() for p in predictions]
    references = [r.strip().lower() for r in references]
    scores = {}
    for n in bleu:
        scores[f"BLEU-{n}"] = 100.0 * float(BLEUScore(n_gram=n)(predictions, [[r] for r in references]))
    if rouge:
        scores["ROUGE-L"] = 100.0 * float(ROUGEScore(rouge_keys="rougeL")(predictions, references)["rougeL_fmeasure"])
    if cider:
        scores["CIDEr"] = cider_score(predictions, references)
    return scores


def cider_score(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """CIDEr-D x 100 of pycocoevalcap (IDF over this corpus), or None without pycocoevalcap."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return None
    gts = {i: [r] for i, r in enumerate(references)}
    res = {i: [p if p else "."] for i, p in enumerate(predictions)}  # Cider asserts a non-empty hypothesis
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)
