"""Results: the papers' numbers, the table printed beside them, and the JSON file.

``<results>/<task>.json`` (format version 1)::

    {"format": "mmgen-eval", "version": 1, "task": str, "model": str, "method": str,
     "created": ISO time, "data": {...what was read, how many items...},
     "options": {...seed, steps, scheduler, extractors...},
     "settings": {setting: {"n": int, "metrics": {name: float | null}}},
     "baseline": {setting: {"n": int, "metrics": {...}}} (generation tasks with the baseline),
     "paper": {row label: {setting: {name: float}}}}        # the published numbers shown

Non-finite values are written as null. Metric names: ``R@1``, ``R@5``, ``R@10`` (percent); ``CLIP-I`` (cosine, 0-1), ``LPIPS`` (lower
is better); ``FID``, ``IS``, ``IS-std``; ``BLEU-1..4``, ``ROUGE-L``, ``CIDEr`` (x100, null
without pycocoevalcap); ``MM-Relevance`` (CLIP F1, 0-1); ``CLIPScore`` (0-100).
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

FORMAT = "mmgen-eval"
FORMAT_VERSION = 1

# The papers' tables (FROMAGe: Koh et al. 2023a; GILL: Koh et al. 2023b). "recalled": numbers
# quoted from memory of the paper, not re-checked against it.
PAPER = {
    "vist-retrieval": {
        "FROMAGe (paper)": {"5 captions + 4 images": {"R@1": 18.2, "R@5": 42.7, "R@10": 51.8}},
    },
    "visdial-retrieval": {
        "FROMAGe (paper)": {"10 rounds": {"R@1": 20.8, "R@5": 44.9, "R@10": 56.0}},
    },
    "vist-generation": {
        "GILL (paper)": {"1 caption": {"CLIP-I": 0.581, "LPIPS": 0.702},
                         "5 captions": {"CLIP-I": 0.612, "LPIPS": 0.696},
                         "5 captions + 4 images": {"CLIP-I": 0.641, "LPIPS": 0.693}},
        "SD v1.5 (paper)": {"1 caption": {"CLIP-I": 0.592, "LPIPS": 0.703},
                            "5 captions": {"CLIP-I": 0.598, "LPIPS": 0.704}},
        "GLIDE (paper)": {"1 caption": {"CLIP-I": 0.582, "LPIPS": 0.753},
                          "5 captions": {"CLIP-I": 0.591, "LPIPS": 0.745}},
    },
    "visdial-generation": {
        "GILL (paper, recalled)": {"1 round": {"CLIP-I": 0.528}, "5 rounds": {"CLIP-I": 0.621},
                                   "10 rounds": {"CLIP-I": 0.645}},
        "SD (paper, recalled)": {"1 round": {"CLIP-I": 0.552}, "5 rounds": {"CLIP-I": 0.629},
                                 "10 rounds": {"CLIP-I": 0.622}},
    },
    "cc3m": {},
    "mmdialog": {},
}
LOWER_IS_BETTER = {"LPIPS", "FID"}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and abs(value) < 1 and value != 0:  # similarities, distances
        return f"{value:.3f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def format_table(task: str, title: str, settings: dict, baseline: dict | None = None) -> str:
    """Rows: this model, its baseline, then the papers' rows; columns: setting x metric."""
    metrics = list(dict.fromkeys(m for s in settings.values() for m in s["metrics"]))
    columns = [(s, m) for s in settings for m in metrics]
    rows = [("this model", {s: v["metrics"] for s, v in settings.items()})]
    if baseline:
        rows.append(("text-to-image baseline", {s: v["metrics"] for s, v in baseline.items()}))
    rows += list(PAPER.get(task, {}).items())
    label_width = max(len(r[0]) for r in rows) + 2
    width = max(12, *(len(m) + 2 for _, m in columns))
    lines = [title]
    header_settings = "".ljust(label_width)
    for s in settings:
        header_settings += s[: width * len(metrics) - 1].ljust(width * len(metrics))
    lines.append(header_settings.rstrip())
    lines.append("".ljust(label_width) + "".join(
        (m + (" v" if m in LOWER_IS_BETTER else "")).ljust(width) for _, m in columns).rstrip())
    for label, values in rows:
        lines.append(label.ljust(label_width) + "".join(
            _fmt(values.get(s, {}).get(m)).ljust(width) for s, m in columns).rstrip())
    counts = ", ".join(f"{s}: {v['n']}" for s, v in settings.items())
    lines.append(f"(items per setting: {counts}; v: lower is better; '-': not reported)")
    return "\n".join(lines)


def _finite(value):
    """Non-finite numbers (an Inception Score of saturated probabilities) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(path: str | Path, task: str, model: str, method: str, data: dict, options: dict,
                  settings: dict, baseline: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "format": FORMAT, "version": FORMAT_VERSION, "task": task, "model": model, "method": method,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": data, "options": options, "settings": _finite(settings),
        "paper": PAPER.get(task, {}),
    }
    if baseline is not None:
        document["baseline"] = _finite(baseline)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
