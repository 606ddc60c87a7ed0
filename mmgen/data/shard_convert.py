"""Converters into webdataset shards (``mmgen shards``): from a caption TSV and its image folder
(the reference's CC3M layout), from img2dataset's output, and from any MiniGPT-5 sample dataset
(CC3M stage-1 samples, VIST stories, MMDialog turns). Image bytes are copied as they are (never
re-encoded: no quality lost, and decoding stays the training loader's job, with its own
preprocessing). Every converter writes ``shards.json`` last, with each shard's sample count."""

from __future__ import annotations

import json
from pathlib import Path

from mmgen.data.captions import read_caption_tsv
from mmgen.data.shards import IMAGE_EXTENSIONS, ShardWriter, read_shard, write_index
from mmgen.errors import DataError
from mmgen.files import require_regular_file


def image_extension(path: Path, where: str) -> str:
    ext = path.suffix.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in IMAGE_EXTENSIONS:
        raise DataError(f"{where}: image {path} has extension {path.suffix!r}; shards hold "
                        f".{', .'.join(IMAGE_EXTENSIONS)}")
    return ext


def read_bytes(path: Path, where: str) -> bytes:
    require_regular_file(path, "image", error=DataError)
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataError(f"{where}: cannot read image {path}: {error}") from error


def from_tsv(tsv: str | Path, image_dir: str | Path, out: str | Path, caption_column: str = "caption",
             image_column: str = "image", shard_size: int = 10_000, prefix: str | None = None,
             allow_outside_paths: bool = False) -> Path:
    """A caption TSV + image folder -> caption shards (``{key}.jpg``, ``{key}.txt``, ``{key}.json``
    with the TSV line and image path), keys numbering the data rows. Returns the index path."""
    tsv = Path(tsv)
    records = read_caption_tsv(tsv, Path(image_dir), caption_column, image_column, allow_outside_paths)
    writer = ShardWriter(out, prefix or tsv.stem, shard_size, kind="captions", source=str(tsv.resolve()))
    for row, record in enumerate(records):
        where = f"{tsv}, line {record.line}"
        ext = image_extension(record.image_path, where)
        meta = {"caption": record.caption, "tsv_line": record.line, "image": str(record.image_path)}
        writer.write({"__key__": f"{row:09d}", ext: read_bytes(record.image_path, where),
                      "txt": record.caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")})
    return writer.close()


def from_img2dataset(folder: str | Path, out: str | Path, shard_size: int = 10_000) -> Path:
    """img2dataset's output -> an indexed shard folder.

    - ``output_format="webdataset"`` (``00000.tar`` + ``00000_stats.json``...): the tars are used
      where they are; ``shards.json`` in ``out`` lists them with their sample counts (the
      ``successes`` of each stats file, else counted by reading the tar).
    - ``output_format="files"`` (``00000/000000000.jpg``, ``.txt``, ``.json``...): packed into tars.
    """
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of img2dataset output")
    tars = sorted(folder.glob("*.tar"))
    if tars:
        out.mkdir(parents=True, exist_ok=True)
        shards = []
        for tar in tars:
            stats = tar.with_name(f"{tar.stem}_stats.json")
            count = None
            if stats.is_file():
                try:
                    count = json.loads(stats.read_text(encoding="utf-8")).get("successes")
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise DataError(f"{stats}: not valid JSON: {error}") from error
            if not isinstance(count, int):
                count = sum(1 for _ in read_shard(str(tar)))
            url = str(tar.resolve()) if tar.resolve().parent != out.resolve() else tar.name
            shards.append({"url": url, "samples": count})
        return write_index(out, "captions", str(folder.resolve()), shards)
    groups: dict[tuple[str, str], dict[str, Path]] = {}
    for file in sorted(folder.glob("*/*")):
        if file.is_file() and "." in file.name and not file.name.endswith("_stats.json"):
            key, ext = file.name.split(".", 1)
            groups.setdefault((file.parent.name, key), {})[ext.lower()] = file
    if not groups:
        raise DataError(f"{folder}: neither .tar shards nor img2dataset 'files' output (NNNNN/KEY.jpg, .txt)")
    writer = ShardWriter(out, "img2dataset", shard_size, kind="captions", source=str(folder.resolve()))
    for (_, key), members in sorted(groups.items()):
        images = [e for e in members if e in IMAGE_EXTENSIONS or e == "jpeg"]
        if not images:
            continue  # img2dataset keeps the .json of failed downloads, without an image
        sample = {"__key__": key}
        for ext, file in members.items():
            sample["jpg" if ext == "jpeg" else ext] = read_bytes(file, str(file))
        writer.write(sample)
    return writer.close()


def from_samples(dataset, out: str | Path, shard_size: int = 10_000, prefix: str = "samples") -> Path:
    """A MiniGPT-5 sample dataset (``mmgen.data.minigpt5_samples.SampleDataset``: CC3M stage 1,
    VIST, MMDialog) -> interleaved shards: ``{key}.json`` (source, target, caption, the members of
    its input and output images, the origin) and ``{key}.in0.jpg``, ``{key}.out0.png``..."""
    writer = ShardWriter(out, prefix, shard_size, kind="samples", source=dataset.source_file)
    for i, sample in enumerate(dataset.samples):
        record = {"source": sample.source, "target": sample.target, "caption": sample.caption,
                  "origin": sample.origin, "input_images": [], "output_images": []}
        member = {"__key__": f"{i:09d}"}
        for role, paths in (("in", sample.input_images), ("out", sample.output_images)):
            for j, path in enumerate(paths):
                name = f"{role}{j}.{image_extension(Path(path), sample.origin)}"
                member[name] = read_bytes(Path(path), sample.origin)
                record["input_images" if role == "in" else "output_images"].append(name)
        member["json"] = json.dumps(record).encode("utf-8")
        writer.write(member)
    return writer.close()
