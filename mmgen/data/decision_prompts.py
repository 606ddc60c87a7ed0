"""Prompts labelled "retrieve" or "generate", to train GILL's decision module.

Format: a UTF-8 TSV with the header ``text<TAB>label`` and one prompt per line; ``label`` is
``retrieve`` (show a retrieved image) or ``generate`` (show a generated one). Blank lines are
skipped; fields are split on tabs only (no quoting). The reference trains on PartiPrompts with
human labels (kept where at least 4 of 5 annotators agree); convert such annotations to this
file. Every problem is reported with the file and line.

``write_example_decision_prompts`` writes a tiny example for the toy world (a made-up rule the
tiny model can learn: round-ish shapes are "retrieve", pointy ones "generate");
``configs/data/decision_prompts_toy.tsv`` is its output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mmgen.components.decision_head import DECISIONS
from mmgen.errors import DataError
from mmgen.files import read_text

LABELS = {name: index for index, name in enumerate(DECISIONS)}  # generate: 0, retrieve: 1


@dataclass(frozen=True)
class DecisionPrompt:
    text: str
    label: int  # 0: generate, 1: retrieve
    line: int  # 1-based line in the file (the header is line 1)


def read_decision_prompts(path: str | Path) -> list[DecisionPrompt]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"decision prompt file not found: {path}")
    text = read_text(path, "decision prompt file", allow_empty=True)
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0].split("\t") != ["text", "label"]:
        got = lines[0].split("\t") if lines else "an empty file"
        raise DataError(f"{path}, line 1: expected the header ['text', 'label'], found {got}")
    prompts = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(f"{path}, line {number}: {len(fields)} tab-separated fields, expected 2 (text, label)")
        text, label = fields[0].strip(), fields[1].strip()
        if not text:
            raise DataError(f"{path}, line {number}: empty text")
        if label not in LABELS:
            raise DataError(f"{path}, line {number}: label {label!r}, expected one of {sorted(LABELS)}")
        prompts.append(DecisionPrompt(text, LABELS[label], number))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def toy_decision(shape: str) -> str:
    return "retrieve" if shape in ("circle", "square") else "generate"


def write_example_decision_prompts(path: str | Path, n: int = 48, seed: int = 0) -> Path:
    """A tiny labelled file of toy-world prompts (deterministic)."""
    from mmgen.data.toy import CAPTION_TEMPLATE, TOY_COLORS, TOY_SHAPES

    rng = random.Random(seed)
    rows = ["text\tlabel"]
    for _ in range(n):
        color, shape = rng.choice(TOY_COLORS), rng.choice(TOY_SHAPES)
        bg_color = rng.choice([c for c in TOY_COLORS if c != color])
        rows.append(CAPTION_TEMPLATE.format(color=color, shape=shape, bg_color=bg_color) + "\t" + toy_decision(shape))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


class DecisionPromptDataset(Dataset):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.prompts = read_decision_prompts(self.path)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        p = self.prompts[index]
        return {"prompt": p.text, "label": p.label}


def collate_decisions(batch: list[dict]) -> dict:
    """``{"prompts": list[str], "labels": (b,) long}``."""
    return {
        "prompts": [item["prompt"] for item in batch],
        "labels": torch.tensor([item["label"] for item in batch], dtype=torch.long),
    }


class DecisionPromptDataModule(pl.LightningDataModule):
    """Labelled prompt files (``text<TAB>label``) for the decision stage.

    Args:
        train_file: Training prompts.
        val_file: Validation prompts; None: no validation.
        batch_size: Prompts per batch.
        write_example: Write the toy example file to ``train_file`` (and ``val_file``, another
            seed) when missing: the tiny config's data, generated like the toy world. Only paths
            inside a ``.cache`` folder are written: a mistyped path elsewhere is an error, not a
            file of made-up prompts to train on.
        seed: Seed of the training shuffle order (and of the generated examples).
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        batch_size: int = 16,
        write_example: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.train_file = train_file
        self.val_file = val_file
        self.batch_size = batch_size
        self.write_example = write_example
        self.seed = seed
        self.train_dataset = None
        self.val_dataset = None

    def prepare_data(self) -> None:
        if self.write_example:
            for offset, path in enumerate((self.train_file, self.val_file)):
                if path is not None and not Path(path).exists():
                    if ".cache" not in Path(path).parts:
                        raise DataError(
                            f"decision prompt file not found: {path} (write_example only writes generated "
                            "toy prompts inside a .cache folder; is the path mistyped?)"
                        )
                    write_example_decision_prompts(path, seed=self.seed + offset)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if self.train_dataset is None:
            self.train_dataset = DecisionPromptDataset(self.train_file)
        if self.val_file is not None and self.val_dataset is None:
            self.val_dataset = DecisionPromptDataset(self.val_file)

    def train_dataloader(self):
        if self.train_dataset is None:
            self.setup("fit")
        from mmgen.data.loading import shuffled_loader  # resumable mid-epoch

        return shuffled_loader(self.train_dataset, self.batch_size, self.seed, drop_last=False,
                               collate_fn=collate_decisions)

    def val_dataloader(self):
        if self.val_file is None:
            return []
        if self.val_dataset is None:
            self.setup("validate")
        return DataLoader(self.val_dataset, batch_size=self.batch_size, collate_fn=collate_decisions)
