"""MiniGPT-5 training samples: prompt templates, the sample type, batching and the data module.

A sample is a prompt (``source``) and the text the LLM must produce (``target``), both plain
strings (tokenising is the model's business), with the images they refer to:

- ``<ImageHere>`` in the source stands for one input image (MiniGPT-4 wraps it as
  ``<Img><ImageHere></Img>``); ``input_images`` holds them in order;
- ``[IMG0]...[IMG7]`` in the target ask for one generated image each time they appear;
  ``output_images`` holds the images they must generate, in order.

REFERENCE.md sec. 4: stage 1 (CC3M) turns a caption into ``caption -> [IMG0..7] ###`` (about 1 in
100 with the instruction template); stage 2 builds VIST stories (``mmgen.data.vist``) and MMDialog
conversations (``mmgen.data.mmdialog``) into ``###Human: ... ###Assistant:`` turns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mmgen.data.captions import read_caption_tsv
from mmgen.data.images import load_image
from mmgen.errors import DataError

N_VOKENS = 8
VOKENS = [f"[IMG{i}]" for i in range(N_VOKENS)]
VOKEN_STRING = "".join(VOKENS)
IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_IN_PROMPT = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
HUMAN, ASSISTANT = "###Human:", "###Assistant:"
END = "###"  # closes every target; supervised, and no EOS follows (REFERENCE.md sec. 8)

CC3M_INSTRUCTION = HUMAN + " generate image with caption: {caption} " + ASSISTANT


@dataclass
class Sample:
    source: str
    target: str
    input_images: list[Path] = field(default_factory=list)  # one per <ImageHere> in source
    output_images: list[Path] = field(default_factory=list)  # one per voken group in target
    caption: str | None = None  # text of the output image, for stage 1's caption loss
    origin: str = ""  # file and record, for error messages

    def check(self) -> None:
        n_in, n_out = self.source.count(IMAGE_PLACEHOLDER), self.target.count(VOKENS[0])
        if n_in != len(self.input_images) or n_out != len(self.output_images):
            raise DataError(
                f"{self.origin}: {n_in} {IMAGE_PLACEHOLDER} / {n_out} voken groups but "
                f"{len(self.input_images)} input / {len(self.output_images)} output images"
            )


def caption_sample(caption: str, image: Path, instruction: bool, origin: str = "") -> Sample:
    """Stage 1: ``caption -> [IMG0..7] ###``, or with the instruction template."""
    source = CC3M_INSTRUCTION.format(caption=caption) if instruction else caption
    return Sample(source, f"{VOKEN_STRING} {END}", [], [image], caption, origin)


# -- datasets ------------------------------------------------------------------------------------
class SampleDataset(Dataset):
    """Samples built from a source file on first use (so parsing a config reads no data), with
    their images loaded per item. Subclasses implement :meth:`build`.

    Items: ``{"source", "target", "caption", "input_images" (n_in, 3, S, S),
    "output_images" (n_out, 3, S, S)}``.
    """

    def __init__(self, image_size: int = 224, check_images: bool = True):
        self.image_size = image_size
        self.check_images = check_images
        self._samples: list[Sample] | None = None

    def build(self) -> list[Sample]:
        raise NotImplementedError

    @property
    def samples(self) -> list[Sample]:
        if self._samples is None:
            samples = self.build()
            for sample in samples:
                sample.check()
                if self.check_images:  # fail at start-up, not hours into an epoch
                    for path in sample.input_images + sample.output_images:
                        if not Path(path).is_file():
                            raise DataError(f"{sample.origin}: image not found: {path}")
            self._samples = samples
        return self._samples

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, sample: Sample, paths: list[Path]) -> torch.Tensor:
        images = []
        for path in paths:
            try:
                images.append(load_image(Path(path), self.image_size))
            except (OSError, ValueError) as error:
                raise DataError(f"{sample.origin}: cannot read image {path}: {error}") from error
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack(images)  # (n, 3, S, S)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        return {
            "source": sample.source,
            "target": sample.target,
            "caption": sample.caption,
            "input_images": self._load(sample, sample.input_images),
            "output_images": self._load(sample, sample.output_images),
        }


class CaptionGenerationDataset(SampleDataset):
    """Stage 1 (UAS) on CC3M-style caption TSVs: generate the image from its caption.

    Args:
        tsv_path: TSV with a header row (MiniGPT-5's files: ``caption<TAB>image_path``).
        image_dir: Folder the image paths are relative to.
        image_size: Side of the images given to the generator.
        caption_column: Header name of the caption column.
        image_column: Header name of the image column.
        instruction_probability: Share of samples given the instruction template (the
            reference: about 1 in 100). Fixed per sample by ``seed``.
        seed: Seed of which samples get the template.
        check_images: Check at start-up that every image exists.
    """

    def __init__(
        self,
        tsv_path: str,
        image_dir: str = ".",
        image_size: int = 512,
        caption_column: str = "caption",
        image_column: str = "image_path",
        instruction_probability: float = 0.01,
        seed: int = 0,
        check_images: bool = True,
    ):
        super().__init__(image_size, check_images)
        self.tsv_path, self.image_dir = Path(tsv_path), Path(image_dir)
        self.caption_column, self.image_column = caption_column, image_column
        self.instruction_probability = instruction_probability
        self.seed = seed

    def build(self) -> list[Sample]:
        rng = random.Random(self.seed)
        records = read_caption_tsv(self.tsv_path, self.image_dir, self.caption_column, self.image_column)
        return [
            caption_sample(r.caption, r.image_path, rng.random() < self.instruction_probability,
                           f"{self.tsv_path}, line {r.line}")
            for r in records
        ]


class ToyCaptionGenerationDataset(CaptionGenerationDataset):
    """Stage 1 on the generated toy world (``mmgen.data.toy``), written on first use."""

    def __init__(self, root: str = ".cache/mmgen-toy", split: str = "train", n_train: int = 256,
                 n_val: int = 64, image_size: int = 32, instruction_probability: float = 0.01, seed: int = 0):
        super().__init__(str(Path(root) / f"{split}.tsv"), str(Path(root) / "images"), image_size,
                         image_column="image", instruction_probability=instruction_probability, seed=seed)
        self.root, self.n_train, self.n_val = root, n_train, n_val

    def build(self) -> list[Sample]:
        from mmgen.data.toy import write_toy_dataset

        write_toy_dataset(Path(self.root), self.n_train, self.n_val, self.image_size, self.seed)
        return super().build()


# -- batching ------------------------------------------------------------------------------------
def collate_samples(items: list[dict]) -> dict:
    """A batch: strings stay lists; images of all samples are concatenated in order with per
    sample counts, ``input_images`` (N_in, 3, S, S) and ``output_images`` (N_out, 3, S, S)."""
    return {
        "sources": [i["source"] for i in items],
        "targets": [i["target"] for i in items],
        "captions": [i["caption"] for i in items],
        "input_images": torch.cat([i["input_images"] for i in items]),
        "n_input_images": [i["input_images"].shape[0] for i in items],
        "output_images": torch.cat([i["output_images"] for i in items]),
        "n_output_images": [i["output_images"].shape[0] for i in items],
    }


class MiniGPT5DataModule(pl.LightningDataModule):
    """Training (shuffled, seeded) and optional validation samples for MiniGPT-5.

    Args:
        train: The training dataset (CaptionGenerationDataset, VISTDataset, MMDialogDataset...).
        val: The validation dataset, or None.
        batch_size: Samples per batch, per device.
        num_workers: DataLoader worker processes.
        seed: Seed of the training shuffle (the reference does not shuffle: a defect).
    """

    def __init__(self, train: SampleDataset, val: SampleDataset | None = None, batch_size: int = 4,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def setup(self, stage: str | None = None) -> None:
        len(self.train)  # build and check now: bad records fail at start-up
        if self.val is not None:
            len(self.val)

    def _loader(self, dataset: SampleDataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            drop_last=train and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, train=True)

    def val_dataloader(self):
        return [] if self.val is None else self._loader(self.val, train=False)
