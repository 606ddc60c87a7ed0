"""Image-caption pairs from a TSV file (CC3M-style), as used to train FROMAGe and GILL.

The file has a header row naming its columns; FROMAGe/GILL use `caption<TAB>image`, MiniGPT-5
`caption<TAB>image_path`. Image paths are relative to an image folder (absolute paths also work).
Every problem is reported with the file, the line and, for images, the image path: with millions of
rows, "bad example" without a line number is useless. A bad example is never replaced by another one
(the reference code did that silently, which hides broken data and biases the sample).
"""

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mmgen.data.images import load_image
from mmgen.data.loading import shuffled_loader
from mmgen.errors import ConfigError, DataError
from mmgen.files import inside_root, read_text, require_regular_file


@dataclass(frozen=True)
class CaptionRecord:
    """One data row of the TSV file."""

    caption: str
    image_path: Path  # already joined with the image folder
    line: int  # 1-based line in the TSV file (the header is line 1), for error messages


def read_caption_tsv(
    tsv_path: Path, image_dir: Path, caption_column: str, image_column: str, allow_outside_paths: bool = False
) -> list[CaptionRecord]:
    """Parse and validate a caption TSV; raises `DataError` naming the file, line or column at fault.

    Fields are split on tabs only, with no quoting: CC3M captions contain quote characters, and
    a csv dialect would treat them as quoting. Blank lines carry nothing and are skipped. The
    file must be UTF-8; image paths must stay inside ``image_dir`` unless ``allow_outside_paths``.
    """
    tsv_path = Path(tsv_path)
    if not tsv_path.exists():
        raise DataError(f"caption file not found: {tsv_path}")
    text = read_text(tsv_path, "caption file", allow_empty=True)  # UTF-8 (a BOM tolerated)
    # Lines end at "\n" (and "\r\n") only: splitlines() would also cut at U+2028 or a form feed
    # inside a caption and report a wrong field count.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or not lines[0].strip():
        raise DataError(f"{tsv_path}, line 1: empty file or header, expected a header row naming the columns")
    header = [name.strip() for name in lines[0].split("\t")]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{tsv_path}, line 1: column(s) {repeated} appear more than once in the header")
    for column in (caption_column, image_column):
        if column not in header:
            raise DataError(
                f"{tsv_path}: header has no column {column!r}; columns found: {header}"
            )
    caption_at, image_at = header.index(caption_column), header.index(image_column)

    records = []
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{tsv_path}, line {line_number}: {len(fields)} tab-separated fields, "
                f"expected {len(header)} ({header})"
            )
        caption, image = fields[caption_at].strip(), fields[image_at].strip()
        if not caption:
            raise DataError(f"{tsv_path}, line {line_number}: empty {caption_column!r}")
        if not image:
            raise DataError(f"{tsv_path}, line {line_number}: empty {image_column!r}")
        path = inside_root(Path(image), Path(image_dir), f"{tsv_path}, line {line_number}",
                           f"{image_column!r}", allow_outside_paths)
        records.append(CaptionRecord(caption, path, line_number))
    if not records:
        raise DataError(f"{tsv_path}: no data rows after the header (empty split)")
    return records


class CaptionImageDataset(Dataset):
    """Image-caption pairs read from a TSV file; items are `{"image", "caption", "index"}`."""

    def __init__(
        self,
        tsv_path: str | Path,
        image_dir: str | Path,
        image_size: int = 224,
        caption_column: str = "caption",
        image_column: str = "image",
        check_images: bool = True,
        allow_outside_paths: bool = False,
    ) -> None:
        self.tsv_path = Path(tsv_path)
        self.image_size = image_size
        self.records = read_caption_tsv(self.tsv_path, Path(image_dir), caption_column, image_column,
                                        allow_outside_paths)
        if check_images:  # fail at start-up, not hours into an epoch
            for record in self.records:
                if not record.image_path.is_file():  # a named pipe or folder: said what it is
                    try:
                        require_regular_file(record.image_path, "image", allow_empty=True)
                    except DataError as error:
                        raise DataError(f"{self.tsv_path}, line {record.line}: {error}") from None
                    raise DataError(
                        f"{self.tsv_path}, line {record.line}: image not found: {record.image_path}"
                    )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            image = load_image(record.image_path, self.image_size)  # (3, S, S) in [0, 1]
        except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(
                f"{self.tsv_path}, line {record.line}: cannot read image {record.image_path}: {error}"
            ) from error
        return {"image": image, "caption": record.caption, "index": index}


def collate_captions(batch: list[dict]) -> dict:
    """Stack dataset items into `{"images": (B, 3, S, S), "captions": list[str], "index": (B,)}`.

    Captions stay strings: tokenising is the model's business (its tokenizer, its special tokens).
    """
    return {
        "images": torch.stack([item["image"] for item in batch]),  # (B, 3, S, S)
        "captions": [item["caption"] for item in batch],
        "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),  # (B,)
    }


class CaptionDataModule(pl.LightningDataModule):
    """Train (and optionally validation) image-caption pairs from CC3M-style TSV files.

    Args:
        train_tsv: TSV file of training pairs with a header row, e.g. `caption<TAB>image`.
        val_tsv: TSV file of validation pairs in the same format; None for no validation.
        image_dir: Folder that image paths in the TSV files are relative to (itself relative to the
            working directory).
        image_size: Side of the square images given to the model, in pixels (224 for CLIP ViT-L/14
            and EVA ViT-g/14).
        batch_size: Examples per batch, per device.
        num_workers: DataLoader worker processes; 0 loads images in the main process.
        caption_column: Header name of the caption column.
        image_column: Header name of the image-path column (`image` for CC3M as FROMAGe/GILL use it,
            `image_path` for MiniGPT-5's files).
        check_images: Check at start-up that every image file exists (slow for millions of rows on
            a network file system; a missing image then fails when it is loaded).
        seed: Seed of the training shuffle order, so runs are reproducible.
        allow_outside_paths: Let image paths in the TSV files be absolute or climb out of
            ``image_dir`` with ``..``. Off by default: a downloaded file must not make training
            read files from anywhere on the disk.
    """

    def __init__(
        self,
        train_tsv: str,
        val_tsv: str | None = None,
        image_dir: str = ".",
        image_size: int = 224,
        batch_size: int = 8,
        num_workers: int = 0,
        caption_column: str = "caption",
        image_column: str = "image",
        check_images: bool = True,
        seed: int = 0,
        allow_outside_paths: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("image_size", image_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{type(self).__name__}: {key} must be a positive integer, got {value!r}")
        self.allow_outside_paths = allow_outside_paths
        self.train_tsv = train_tsv
        self.val_tsv = val_tsv
        self.image_dir = image_dir
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.caption_column = caption_column
        self.image_column = image_column
        self.check_images = check_images
        self.seed = seed
        self.train_dataset: CaptionImageDataset | None = None
        self.val_dataset: CaptionImageDataset | None = None

    def _dataset(self, tsv_path: str) -> CaptionImageDataset:
        return CaptionImageDataset(
            tsv_path,
            self.image_dir,
            image_size=self.image_size,
            caption_column=self.caption_column,
            image_column=self.image_column,
            check_images=self.check_images,
            allow_outside_paths=self.allow_outside_paths,
        )

    def setup(self, stage: str | None = None) -> None:
        # Validation files are also read for fitting: Lightning runs validation during fit.
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset(self.train_tsv)
            if len(self.train_dataset) < self.batch_size:  # drop_last would leave no batch at all
                raise DataError(
                    f"{self.train_tsv}: {len(self.train_dataset)} examples, fewer than "
                    f"batch_size={self.batch_size}"
                )
        if stage in (None, "fit", "validate") and self.val_tsv and self.val_dataset is None:
            self.val_dataset = self._dataset(self.val_tsv)

    def _loader(self, dataset: CaptionImageDataset, train: bool) -> DataLoader:
        if train:  # resumable mid-epoch (position and shuffle state in checkpoints)
            return shuffled_loader(dataset, self.batch_size, self.seed, num_workers=self.num_workers,
                                   collate_fn=collate_captions)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            # A fresh generator per loader: the same seed gives the same order in every run.
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            drop_last=train,  # equal batch sizes keep the contrastive losses comparable across steps
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_captions,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_tsv is None:
            return []  # Lightning skips validation when there is no batch
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, train=False)
