"""Caption TSV reading: shapes of what comes out, and an error naming the culprit for each bad input."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgen.data.captions import CaptionDataModule, CaptionImageDataset, collate_captions
from mmgen.data.images import load_image
from mmgen.errors import DataError


def write_image(path: Path, size: tuple[int, int] = (40, 30), color=(200, 20, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A TSV of 5 captions, images in tmp_path/images, one grey-scale and one RGBA."""
    images = tmp_path / "images"
    for i in range(3):
        write_image(images / f"{i}.png")
    Image.new("L", (20, 50), 128).save(images / "grey.png")
    Image.new("RGBA", (33, 33), (0, 0, 255, 100)).save(images / "alpha.png")
    rows = [f'caption {i} with "quotes"\t{i}.png' for i in range(3)]
    rows += ["grey one\tgrey.png", "alpha\talpha.png"]
    return write_tsv(tmp_path / "train.tsv", ["caption\timage", *rows])


def test_load_image_resizes_and_center_crops(tmp_path: Path) -> None:
    # A wide image: left third red, rest blue; the centre crop of the resized image is all blue.
    image = Image.new("RGB", (90, 30), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 30))
    image.save(tmp_path / "wide.png")
    tensor = load_image(tmp_path / "wide.png", 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert tensor[2].min() > 0.9 and tensor[0].max() < 0.1


def test_good_tsv_loads_and_collates(good: Path) -> None:
    dataset = CaptionImageDataset(good, good.parent / "images", image_size=24)
    assert len(dataset) == 5
    item = dataset[1]
    assert item["caption"] == 'caption 1 with "quotes"' and item["index"] == 1
    batch = collate_captions([dataset[i] for i in range(5)])
    assert batch["images"].shape == (5, 3, 24, 24) and batch["images"].dtype == torch.float32
    assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
    assert batch["captions"][3] == "grey one"
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(batch["images"][0, :, 0, 0], torch.tensor([200, 20, 20]) / 255.0)


def test_configurable_column_names(tmp_path: Path) -> None:
    write_image(tmp_path / "x.png")
    tsv = write_tsv(tmp_path / "m5.tsv", ["image_path\tcaption", "x.png\ta red square"])
    dataset = CaptionImageDataset(tsv, tmp_path, image_size=8, image_column="image_path")
    assert dataset[0]["caption"] == "a red square"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothere.tsv"):
        CaptionImageDataset(tmp_path / "nothere.tsv", tmp_path)


def test_missing_column_names_column_and_file(tmp_path: Path) -> None:
    tsv = write_tsv(tmp_path / "bad.tsv", ["caption\turl", "a cat\thttp://x"])
    with pytest.raises(DataError) as error:
        CaptionImageDataset(tsv, tmp_path)
    message = str(error.value)
    assert "'image'" in message and str(tsv) in message and "url" in message


def test_short_row_names_line(good: Path) -> None:
    lines = good.read_text().splitlines()
    lines.insert(3, "only a caption")  # becomes line 4
    write_tsv(good, lines)
    with pytest.raises(DataError, match=r"train\.tsv, line 4: 1 tab-separated fields"):
        CaptionImageDataset(good, good.parent / "images")


def test_empty_caption_names_line(good: Path) -> None:
    write_tsv(good, [*good.read_text().splitlines(), " \t0.png"])  # line 7
    with pytest.raises(DataError, match=r"train\.tsv, line 7: empty 'caption'"):
        CaptionImageDataset(good, good.parent / "images")


def test_missing_image_at_construction(good: Path) -> None:
    write_tsv(good, [*good.read_text().splitlines(), "lost\tgone.png"])
    with pytest.raises(DataError) as error:
        CaptionImageDataset(good, good.parent / "images")
    message = str(error.value)
    assert str(good) in message and "line 7" in message and "gone.png" in message
    # Without the check, construction succeeds and the image fails when read.
    dataset = CaptionImageDataset(good, good.parent / "images", check_images=False)
    with pytest.raises(DataError, match="gone.png"):
        dataset[5]


def test_corrupt_image_at_getitem(good: Path) -> None:
    (good.parent / "images" / "1.png").write_bytes(b"not a png at all" * 10)
    dataset = CaptionImageDataset(good, good.parent / "images")
    assert dataset[0]["caption"] == 'caption 0 with "quotes"'
    with pytest.raises(DataError) as error:
        dataset[1]
    message = str(error.value)
    assert str(good) in message and "line 3" in message and "1.png" in message
    assert isinstance(error.value.__cause__, OSError)  # the original error is chained


def make_datamodule(tmp_path: Path, n: int, **kwargs) -> CaptionDataModule:
    for i in range(n):
        write_image(tmp_path / "images" / f"{i}.png", size=(8, 8))
    rows = ["caption\timage", *[f"caption {i}\t{i}.png" for i in range(n)]]
    train = write_tsv(tmp_path / "train.tsv", rows)
    val = write_tsv(tmp_path / "val.tsv", rows)
    return CaptionDataModule(str(train), str(val), image_dir=str(tmp_path / "images"), image_size=8, **kwargs)


def epoch_order(datamodule: CaptionDataModule) -> list[int]:
    return [i for batch in datamodule.train_dataloader() for i in batch["index"].tolist()]


def test_datamodule_shuffles_per_seed_and_drops_last(tmp_path: Path) -> None:
    datamodule = make_datamodule(tmp_path, 10, batch_size=4, seed=1)
    datamodule.setup("fit")
    order = epoch_order(datamodule)
    assert len(order) == 8 and len(set(order)) == 8  # 10 examples, batches of 4: last 2 dropped
    assert order != sorted(order)
    assert epoch_order(datamodule) == order  # same seed, same order
    assert epoch_order(make_datamodule(tmp_path, 10, batch_size=4, seed=2)) != order
    val = [i for batch in datamodule.val_dataloader() for i in batch["index"].tolist()]
    assert val == list(range(10))  # in order, nothing dropped


def test_datamodule_rejects_batch_larger_than_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fewer than batch_size=8"):
        make_datamodule(tmp_path, 3, batch_size=8).setup("fit")


def test_datamodule_without_validation(tmp_path: Path) -> None:
    train_only = make_datamodule(tmp_path, 4, batch_size=2)
    datamodule = CaptionDataModule(
        train_only.train_tsv, image_dir=train_only.image_dir, image_size=8, batch_size=2
    )
    assert len(datamodule.train_dataloader()) == 2
    assert datamodule.val_dataloader() == []  # Lightning skips validation
