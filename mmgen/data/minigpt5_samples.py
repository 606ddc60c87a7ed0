"""MiniGPT-5 training samples: the sample type, image loading, CC3M (stage 1), batching, the data module.

A sample is a prompt (``source``) and the text the LLM must produce (``target``), both plain
strings (tokenising is the model's business), with the images they refer to:

- ``<ImageHere>`` in the source stands for one input image (MiniGPT-4 wraps it as
  ``<Img><ImageHere></Img>``); ``input_images`` holds them in order;
- ``[IMG0]...[IMG7]`` in the target ask for one generated image each time they appear;
  ``output_images`` holds the images they must generate, in order.

The strings are the ones MiniGPT-5's own data loader builds, character for character: stage 1
(CC3M, here) turns a cleaned caption into ``caption -> [IMG0..7] ###`` and adds, after every
100th row, the same row under a system prompt and an instruction; stage 2 builds VIST stories
(``mmgen.data.vist``) and MMDialog conversations (``mmgen.data.mmdialog``) into
``###Human: ... ###Assistant:`` turns.

Images are loaded as MiniGPT-5 loads them by default (``image_preprocessing="minigpt5"``): input
images (for the Q-Former) resized bilinear on the shorter side and centre-cropped; output images
(for the diffusion model) padded to a white square, then resized bilinear; every image mirrored
with probability 0.5 in the training split. ``"clip"`` is CLIP's bicubic resize and centre crop
for both.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mmgen.data.captions import read_caption_tsv
from mmgen.data.images import load_image
from mmgen.errors import ConfigError, DataError

N_VOKENS = 8
VOKENS = [f"[IMG{i}]" for i in range(N_VOKENS)]
VOKEN_STRING = "".join(VOKENS)
IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_IN_PROMPT = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
HUMAN, ASSISTANT = "###Human:", "###Assistant:"
END = "###"  # closes every target; supervised, and no EOS follows

# Stage 1's instruction samples: MiniGPT-5's system prompt, glued to "###Human:" without a
# space, and its seven phrasings of the request (one drawn per instruction sample).
CC3M_SYSTEM_PROMPT = "You will be able to generate image according to command."
CC3M_INSTRUCTIONS = (
    "generate image with caption:",
    "can you give me the image with caption:",
    "help me to generate this image:",
    "generate image with according to caption:",
    "according to caption, generate image:",
    "an image with caption:",
    "can you visualize this caption:",
)

Split = Literal["train", "test"]
ImagePreprocessing = Literal["minigpt5", "clip"]
# How input (Q-Former) and output (VAE) images are fitted to a square; see mmgen.data.images.
IMAGE_PREPROCESSING = {
    "minigpt5": {"input": {"fit": "crop", "interpolation": "bilinear"},
                 "output": {"fit": "pad", "interpolation": "bilinear"}},
    "clip": {"input": {"fit": "crop", "interpolation": "bicubic"},
             "output": {"fit": "crop", "interpolation": "bicubic"}},
}


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


def require_text(value: object, where: str, key: str) -> str:
    """``value`` if it is a non-empty string; otherwise a DataError naming ``where`` and ``key``.

    The reference code formats whatever it finds into the prompt (a number, ``None``, a list),
    which trains on garbage without a word; a record like that is a broken file."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise DataError(f"{where}: empty {key!r}")
    return value


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}; expected 'train' or 'test'")


# -- stage 1: CC3M -------------------------------------------------------------------------------
def pre_caption(caption: str) -> str:
    """MiniGPT-5's (BLIP's) caption cleaning: lower case; each of ``.!"()*#:;~`` becomes a space;
    runs of two or more whitespace characters become one space; spaces at the ends go.

    A single tab or newline inside a caption is left as it is, as in the reference."""
    caption = re.sub(r"[.!\"()*#:;~]", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    return caption.rstrip("\n").strip(" ")


def caption_samples(caption: str, image: Path, instruction: str | None = None,
                    system_prompt: str = CC3M_SYSTEM_PROMPT, origin: str = "") -> list[Sample]:
    """Stage 1 samples of one (already cleaned) caption: ``caption -> [IMG0..7] ###``, then, with
    ``instruction`` (one of ``CC3M_INSTRUCTIONS``), the same image asked for under the system
    prompt: ``{system}###Human: {instruction} {caption} ###Assistant: -> [IMG0..7] ###``."""
    target = f"{VOKEN_STRING} {END}"
    samples = [Sample(caption, target, [], [image], caption, origin)]
    if instruction is not None:
        source = f"{system_prompt}{HUMAN} {instruction} {caption} {ASSISTANT}"
        samples.append(Sample(source, target, [], [image], caption, f"{origin} (instruction)"))
    return samples


# -- datasets ------------------------------------------------------------------------------------
class SampleDataset(Dataset):
    """Samples built from a source file on first use (so parsing a config reads no data), with
    their images loaded per item. Subclasses implement :meth:`build`.

    Items: ``{"source", "target", "caption", "input_images" (n_in, 3, Si, Si),
    "output_images" (n_out, 3, So, So)}``, pixels in [0, 1].

    Args:
        split: ``"train"`` or ``"test"``, as MiniGPT-5 distinguishes them (which samples exist;
            test images are not mirrored).
        input_image_size: Side of the input images, the visual encoder's resolution (224 for
            EVA ViT-g), so the encoder never resamples them again.
        output_image_size: Side of the output images, the generator's resolution (512 for SD 2.1-base).
        image_preprocessing: ``"minigpt5"`` (the reference's: inputs bilinear + centre crop,
            outputs padded to a white square + bilinear) or ``"clip"`` (bicubic + centre crop
            for both, mmgen's FROMAGe/GILL preprocessing).
        random_flip: Mirror each image left-right with probability 0.5, drawn independently per
            image from torch's generator (seeded per worker by the DataLoader). Default: in the
            training split, as the reference's training transforms do.
        check_images: Check at start-up that every image exists.
        allow_outside_paths: Let image paths in the data files be absolute or climb out of the
            image folder with ``..``. Off by default: a downloaded annotation file must not make
            training read files from anywhere on the disk.
    """

    def __init__(self, split: Split = "train", input_image_size: int = 224, output_image_size: int = 512,
                 image_preprocessing: ImagePreprocessing = "minigpt5", random_flip: bool | None = None,
                 check_images: bool = True, allow_outside_paths: bool = False):
        check_split(split)
        for key, value in (("input_image_size", input_image_size), ("output_image_size", output_image_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{type(self).__name__}: {key} must be a positive integer, got {value!r}")
        if image_preprocessing not in IMAGE_PREPROCESSING:
            raise ConfigError(f"unknown image_preprocessing {image_preprocessing!r}; "
                              f"expected one of {list(IMAGE_PREPROCESSING)}")
        self.split = split
        self.input_image_size, self.output_image_size = input_image_size, output_image_size
        self.image_preprocessing = image_preprocessing
        self.random_flip = split == "train" if random_flip is None else random_flip
        self.check_images = check_images
        self.allow_outside_paths = allow_outside_paths
        self._samples: list[Sample] | None = None

    @property
    def source_file(self) -> str:
        """The data file the samples come from, for error messages."""
        for name in ("json_path", "jsonl_path", "tsv_path"):
            if getattr(self, name, None) is not None:
                return str(getattr(self, name))
        return type(self).__name__

    def build(self) -> list[Sample]:
        raise NotImplementedError

    @property
    def samples(self) -> list[Sample]:
        if self._samples is None:
            samples = self.build()
            if not samples:  # an empty split would fail later as "num_samples=0", naming nothing
                raise DataError(f"{self.source_file}: no samples in the {self.split} split (empty file, or "
                                "every record filtered out)")
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

    def _load(self, sample: Sample, paths: list[Path], role: str) -> torch.Tensor:
        """(n, 3, S, S): the input or output images of a sample, preprocessed for their role."""
        size = self.input_image_size if role == "input" else self.output_image_size
        options = IMAGE_PREPROCESSING[self.image_preprocessing][role]
        images = []
        for path in paths:
            flip = self.random_flip and bool(torch.rand(()) < 0.5)
            try:
                images.append(load_image(Path(path), size, flip=flip, **options))
            except (OSError, ValueError) as error:
                raise DataError(f"{sample.origin}: cannot read image {path}: {error}") from error
        if not images:
            return torch.zeros(0, 3, size, size)
        return torch.stack(images)  # (n, 3, S, S)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        return {
            "source": sample.source,
            "target": sample.target,
            "caption": sample.caption,
            "input_images": self._load(sample, sample.input_images, "input"),
            "output_images": self._load(sample, sample.output_images, "output"),
        }


class CaptionGenerationDataset(SampleDataset):
    """Stage 1 (UAS) on CC3M-style caption TSVs: generate the image from its caption.

    Row i (0-based, header and blank lines not counted) gives ``pre_caption(caption) ->
    [IMG0..7] ###``; in the training split, rows with ``i % instruction_every == 0`` are followed
    by an instruction sample of the same row (see :func:`caption_samples`), its phrasing drawn
    from ``CC3M_INSTRUCTIONS`` by a generator seeded with ``seed``. The test split has no
    instruction samples. Every sample carries the cleaned caption for the caption loss.

    Args:
        tsv_path: TSV with a header row (MiniGPT-5's files: ``caption<TAB>image_path``).
        image_dir: Folder the image paths are relative to (MiniGPT-5: the dataset folder).
        split: ``"train"`` or ``"test"``.
        caption_column: Header name of the caption column.
        image_column: Header name of the image column.
        instruction_every: Every how many rows an instruction sample is added (the reference:
            100); 0 for none.
        system_prompt: Prefix of the instruction samples.
        seed: Seed of the instruction phrasings.
        input_image_size, output_image_size, image_preprocessing, random_flip, check_images,
        allow_outside_paths: see :class:`SampleDataset`.
    """

    def __init__(
        self,
        tsv_path: str,
        image_dir: str = ".",
        split: Split = "train",
        caption_column: str = "caption",
        image_column: str = "image_path",
        instruction_every: int = 100,
        system_prompt: str = CC3M_SYSTEM_PROMPT,
        seed: int = 0,
        input_image_size: int = 224,
        output_image_size: int = 512,
        image_preprocessing: ImagePreprocessing = "minigpt5",
        random_flip: bool | None = None,
        check_images: bool = True,
        allow_outside_paths: bool = False,
    ):
        super().__init__(split, input_image_size, output_image_size, image_preprocessing, random_flip, check_images,
                         allow_outside_paths)
        if instruction_every < 0:
            raise ConfigError(f"instruction_every must be >= 0, got {instruction_every}")
        self.tsv_path, self.image_dir = Path(tsv_path), Path(image_dir)
        self.caption_column, self.image_column = caption_column, image_column
        self.instruction_every, self.system_prompt, self.seed = instruction_every, system_prompt, seed

    def build(self) -> list[Sample]:
        rng = random.Random(self.seed)
        records = read_caption_tsv(self.tsv_path, self.image_dir, self.caption_column, self.image_column,
                                   self.allow_outside_paths)
        samples = []
        for row, record in enumerate(records):
            origin = f"{self.tsv_path}, line {record.line}"
            caption = pre_caption(record.caption)
            if not caption:
                raise DataError(f"{origin}: caption {record.caption!r} is empty once cleaned")
            instruction = None
            if self.split == "train" and self.instruction_every and row % self.instruction_every == 0:
                instruction = rng.choice(CC3M_INSTRUCTIONS)
            samples += caption_samples(caption, record.image_path, instruction, self.system_prompt, origin)
        return samples


class ToyCaptionGenerationDataset(CaptionGenerationDataset):
    """Stage 1 on the generated toy world (``mmgen.data.toy``), written on first use; images
    are ``image_size`` pixels and loaded at that size for both roles.

    ``split``: ``"train"`` (train.tsv), ``"val"`` (val.tsv built as training data, as the
    reference builds its validation set) or ``"test"`` (val.tsv built as a test set).
    """

    def __init__(self, root: str = ".cache/mmgen-toy", split: Literal["train", "val", "test"] = "train",
                 n_train: int = 256, n_val: int = 64, image_size: int = 32, instruction_every: int = 100,
                 seed: int = 0, image_preprocessing: ImagePreprocessing = "minigpt5",
                 random_flip: bool | None = None):
        if split not in ("train", "val", "test"):
            raise ConfigError(f"unknown toy split {split!r}; expected 'train', 'val' or 'test'")
        tsv = "train" if split == "train" else "val"
        super().__init__(str(Path(root) / f"{tsv}.tsv"), str(Path(root) / "images"),
                         "test" if split == "test" else "train", image_column="image",
                         instruction_every=instruction_every, seed=seed, input_image_size=image_size,
                         output_image_size=image_size, image_preprocessing=image_preprocessing,
                         random_flip=random_flip)
        self.root, self.n_train, self.n_val, self.image_size = root, n_train, n_val, image_size

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
        shuffle: Shuffle the training samples every epoch. The reference does not, so each of
            its VIST batches holds consecutive steps of one or two stories and its CC3M batches
            follow the file order: a defect mmgen fixes (``false`` restores it).
        seed: Seed of the training shuffle.
    """

    def __init__(self, train: SampleDataset, val: SampleDataset | None = None, batch_size: int = 4,
                 num_workers: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.num_workers, self.shuffle, self.seed = batch_size, num_workers, shuffle, seed

    def setup(self, stage: str | None = None) -> None:
        len(self.train)  # build and check now: bad records fail at start-up
        if self.val is not None:
            len(self.val)

    def _loader(self, dataset: SampleDataset, train: bool) -> DataLoader:
        if train:  # resumable mid-epoch (position and shuffle state in checkpoints)
            from mmgen.data.loading import shuffled_loader

            return shuffled_loader(dataset, self.batch_size, self.seed, shuffle=self.shuffle,
                                   drop_last=len(dataset) >= self.batch_size, num_workers=self.num_workers,
                                   collate_fn=collate_samples)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and self.shuffle,
            generator=torch.Generator().manual_seed(self.seed) if train and self.shuffle else None,
            drop_last=train and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, train=True)

    def val_dataloader(self):
        return [] if self.val is None else self._loader(self.val, train=False)
