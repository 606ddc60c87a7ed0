"""A cache of an image generator's caption embeddings, so training never runs the generator.

GILL's generation target for each caption is the frozen SD text encoder's ``last_hidden_state``
of the caption padded to 77 tokens: (77, 768) for SD v1.5. The reference precomputes it offline,
one float16 array per image; ``mmgen cache-captions`` does the same into shards:

    CACHE_DIR/
      manifest.json                      written last: a folder without it is incomplete
      embeddings-00000.npy               float16 (n_0, 77, d), rows in the TSV's data-row order
      embeddings-00001.npy               float16 (n_1, 77, d)
      ...

``manifest.json``::

    {
      "format": "mmgen-caption-embeddings",  "version": 1,
      "tsv": "/abs/path/train.tsv",          the caption file the rows come from
      "caption_column": "caption",
      "rows": 2600000,                       data rows (blank lines skipped), = sum of shard rows
      "captions_sha256": "...",              sha256 of the captions joined by "\\n" (UTF-8)
      "generator": "runwayml/stable-diffusion-v1-5",   hub id / folder, or "random:...:<hash>"
      "text_embed_dim": 768, "max_length": 77, "use_attention_mask": false,
      "dtype": "float16",
      "shards": [{"file": "embeddings-00000.npy", "rows": 10000}, ...],
      "fingerprint": {...}                   what made it (mmgen.data.feature_cache.caption_fingerprint)
    }

Shards are plain ``.npy`` files, read memory-mapped (``numpy.load(mmap_mode="r")``), so a
2.6M-caption cache (about 300 GB at 77 x 768 x 2 bytes) costs no memory. Row ``i`` of the cache
is data row ``i`` of the TSV. A cache whose row count, captions hash or width does not match the
data it is used with raises ``DataError`` naming its manifest.

``CachedCaptionDataModule`` wraps a ``CaptionDataModule`` and adds ``caption_embeddings``
(b, 77, d) and ``caption_cache`` (the manifest path) to its batches, and the cache's fingerprint
(``feature_caches``, as the shard feature caches of ``mmgen.data.feature_cache`` do): GILL checks
it against its own image generator and refuses embeddings of another text encoder. The same
embeddings for webdataset shards: ``mmgen cache-features --kind captions``.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmgen.data.captions import CaptionDataModule, collate_captions, read_caption_tsv
from mmgen.data.loading import shuffled_loader
from mmgen.errors import DataError
from mmgen.files import read_text, require_regular_file

FORMAT = "mmgen-caption-embeddings"
VERSION = 1
MANIFEST = "manifest.json"


def captions_sha256(captions: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()


def read_tsv_captions(tsv: str | Path, caption_column: str = "caption", image_column: str = "image") -> list[str]:
    """The captions of a caption TSV in data-row order, parsed as the datasets parse them."""
    # Only the captions are used: image paths are not opened, so they are not confined here.
    return [r.caption for r in read_caption_tsv(Path(tsv), Path("."), caption_column, image_column,
                                                allow_outside_paths=True)]


def write_caption_cache(
    out_dir: str | Path,
    captions: Sequence[str],
    encode: Callable[[list[str]], torch.Tensor],
    generator: str,
    text_embed_dim: int,
    max_length: int = 77,
    use_attention_mask: bool = False,
    tsv: str | Path | None = None,
    caption_column: str = "caption",
    batch_size: int = 64,
    shard_size: int = 10_000,
    progress: Callable[[int, int], None] | None = None,
    fingerprint: dict | None = None,
) -> Path:
    """Encode ``captions`` in batches with ``encode`` (list of str -> (b, max_length, d)) and
    write the shards and, last, the manifest. Returns the manifest path. ``fingerprint``: what
    made the embeddings (``mmgen.data.feature_cache.caption_fingerprint``), checked by GILL."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; give a folder for the caption cache")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is written again
    for stale in out.glob("embeddings-*.npy"):
        stale.unlink()
    shards = []
    for start in range(0, len(captions), shard_size):
        chunk = list(captions[start : start + shard_size])
        arrays = []
        for b in range(0, len(chunk), batch_size):
            emb = encode(chunk[b : b + batch_size])  # (b, 77, d)
            if tuple(emb.shape[1:]) != (max_length, text_embed_dim):
                raise DataError(f"encoder gave {tuple(emb.shape)}, expected (b, {max_length}, {text_embed_dim})")
            arrays.append(emb.detach().to("cpu", torch.float16).numpy())
            if progress is not None:
                progress(start + b + len(arrays[-1]), len(captions))
        name = f"embeddings-{len(shards):05d}.npy"
        np.save(out / name, np.concatenate(arrays))
        shards.append({"file": name, "rows": len(chunk)})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "tsv": str(Path(tsv).resolve()) if tsv is not None else None,
        "caption_column": caption_column,
        "rows": len(captions),
        "captions_sha256": captions_sha256(captions),
        "generator": generator,
        "text_embed_dim": int(text_embed_dim),
        "max_length": int(max_length),
        "use_attention_mask": bool(use_attention_mask),
        "dtype": "float16",
        "shards": shards,
    }
    if fingerprint is not None:
        manifest["fingerprint"] = fingerprint
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


class CaptionCache:
    """A cache folder opened for reading; ``cache[i]`` is row i, float16 (77, d). Shards are
    memory-mapped on first use in each process (DataLoader workers included).

    Opening checks the manifest (every key, its type, the shard list) and each shard's header
    (exists, is a regular file, shape, dtype, not cut short) without reading the rows; reading a
    row checks it is finite. Small caches are scanned whole for NaN/inf when opened."""

    #: Caches up to this many bytes are scanned for non-finite values when opened.
    SCAN_BYTES = 1 << 30

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.manifest_path = self.dir / MANIFEST
        if not self.manifest_path.exists():
            raise DataError(
                f"no caption-embedding cache at {self.dir} ({MANIFEST} missing, or the cache was not "
                "finished): make it with `mmgen cache-captions`"
            )
        text = read_text(self.manifest_path, "cache manifest")
        try:
            self.manifest = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{self.manifest_path}: not valid JSON: {error}") from error
        if not isinstance(self.manifest, dict):
            raise DataError(f"{self.manifest_path}: expected a JSON object, found {type(self.manifest).__name__}")
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise DataError(
                f"{self.manifest_path}: format {self.manifest.get('format')!r} version "
                f"{self.manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}"
            )
        self._check_manifest()
        rows = [s["rows"] for s in self.manifest["shards"]]
        self._starts = np.cumsum([0] + rows[:-1]).tolist()
        self._arrays: list[np.ndarray | None] = [None] * len(rows)
        total = 0
        for shard in range(len(rows)):  # headers now: fail before training, not at row 2,000,000
            total += self._open(shard).nbytes
        if total <= self.SCAN_BYTES:
            for shard in range(len(rows)):
                self._check_finite(self._open(shard), shard)
        self._arrays = [None] * len(rows)  # workers map their own

    def _check_manifest(self) -> None:
        m, where = self.manifest, self.manifest_path
        for key, kind in (("rows", int), ("text_embed_dim", int), ("max_length", int), ("shards", list),
                          ("captions_sha256", str), ("dtype", str)):
            value = m.get(key)
            if key not in m:
                raise DataError(f"{where}: missing key {key!r}")
            if not isinstance(value, kind) or isinstance(value, bool):
                raise DataError(f"{where}: key {key!r} must be a {kind.__name__}, got {value!r:.80}")
        if m["rows"] < 0 or m["text_embed_dim"] <= 0 or m["max_length"] <= 0:
            raise DataError(f"{where}: rows, text_embed_dim and max_length must be positive")
        if m["dtype"] != "float16":
            raise DataError(f"{where}: key 'dtype' is {m['dtype']!r}, expected 'float16'")
        if m["rows"] > 0 and not m["shards"]:
            raise DataError(f"{where}: key 'shards' is empty but the manifest says {m['rows']} rows")
        for i, shard in enumerate(m["shards"]):
            if (not isinstance(shard, dict) or not isinstance(shard.get("file"), str)
                    or not isinstance(shard.get("rows"), int) or isinstance(shard.get("rows"), bool)
                    or shard["rows"] < 0):
                raise DataError(f"{where}: shards[{i}] must be {{'file': name, 'rows': count}}, got {shard!r:.80}")
            if Path(shard["file"]).name != shard["file"]:
                raise DataError(f"{where}: shards[{i}] file {shard['file']!r} must be a file name in the cache folder")
        total = sum(s["rows"] for s in m["shards"])
        if total != m["rows"]:
            raise DataError(f"{where}: shards hold {total} rows, manifest says {m['rows']}")

    def _open(self, shard: int) -> np.ndarray:
        if self._arrays[shard] is None:
            info = self.manifest["shards"][shard]
            path = self.dir / info["file"]
            require_regular_file(path, f"cache shard (listed in {self.manifest_path})")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as error:  # cut short, not .npy, pickled objects
                raise DataError(f"{path}: not a readable .npy shard (truncated or damaged?): {error}") from error
            expected = (info["rows"], self.manifest["max_length"], self.manifest["text_embed_dim"])
            if not isinstance(array, np.ndarray) or array.shape != expected:
                raise DataError(f"{path}: shape {getattr(array, 'shape', None)}, manifest says {expected}")
            if array.dtype != np.float16:
                raise DataError(f"{path}: dtype {array.dtype}, the cache format is float16")
            self._arrays[shard] = array
        return self._arrays[shard]

    def _check_finite(self, array: np.ndarray, shard: int, first_row: int = 0) -> None:
        finite = np.isfinite(array).reshape(array.shape[0], -1).all(axis=1) if array.size else np.ones(0, bool)
        if not finite.all():
            row = int(np.argmin(finite))
            path = self.dir / self.manifest["shards"][shard]["file"]
            raise DataError(f"{path}: row {first_row + row} (cache row {self._starts[shard] + first_row + row}) "
                            "holds NaN or infinite values; remake the cache")

    def __len__(self) -> int:
        return self.manifest["rows"]

    @property
    def text_embed_dim(self) -> int:
        return self.manifest["text_embed_dim"]

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.manifest_path}: row {index} of {len(self)}")
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        row = self._open(shard)[local]
        self._check_finite(row[None], shard, local)
        return row

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices), 77, d) float16."""
        return torch.from_numpy(np.stack([self[int(i)] for i in indices]))

    def check(self, captions: Sequence[str], source: str, text_embed_dim: int | None = None,
              generator: str | None = None) -> None:
        """Raise DataError unless this cache was made from exactly ``captions`` (and, when given,
        with ``text_embed_dim`` wide embeddings from ``generator``)."""
        where = f"caption cache {self.manifest_path}"
        if len(captions) != len(self):
            raise DataError(f"{where} has {len(self)} rows but {source} has {len(captions)} captions: remake it")
        if captions_sha256(captions) != self.manifest["captions_sha256"]:
            raise DataError(
                f"{where} was made from other captions than {source} "
                f"(made from {self.manifest.get('tsv')}): remake it with `mmgen cache-captions`"
            )
        if text_embed_dim is not None and text_embed_dim != self.text_embed_dim:
            raise DataError(f"{where} holds {self.text_embed_dim}-d embeddings, the model needs {text_embed_dim}-d")
        if generator is not None and generator != self.manifest["generator"]:
            raise DataError(f"{where} was made with {self.manifest['generator']!r}, not {generator!r}")


class CachedCaptionDataset(Dataset):
    """A caption dataset whose items also carry ``caption_embedding`` (77, d) from a cache."""

    def __init__(self, dataset, cache: CaptionCache):
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        item["caption_embedding"] = torch.from_numpy(np.array(self.cache[item["index"]]))
        return item


def collate_cached_captions(batch: list[dict], cache_name: str | None = None,
                            fingerprint: dict | None = None) -> dict:
    """``collate_captions`` plus ``caption_embeddings`` (b, 77, d) float16, ``caption_cache``
    (the manifest path, for error messages) and, for caches that record one, the fingerprint of
    what made them (``feature_caches``, checked by the model)."""
    out = collate_captions(batch)
    out["caption_embeddings"] = torch.stack([item["caption_embedding"] for item in batch])
    if cache_name is not None:
        out["caption_cache"] = cache_name
    if fingerprint is not None:
        out["feature_caches"] = {"captions": {"manifest": cache_name, "fingerprint": fingerprint}}
    return out


class CachedCaptionDataModule(pl.LightningDataModule):
    """Any ``CaptionDataModule`` (CC3M TSVs, the toy world) whose batches also carry the caption
    embeddings from caches made by ``mmgen cache-captions``; the model then never runs the
    generator's text encoder. Each cache is checked against its split's captions at setup.

    Args:
        data: The caption data module to wrap.
        train_cache: Cache folder of the training TSV.
        val_cache: Cache folder of the validation TSV; None: validation batches carry none (the
            model then computes the targets, unless it has no text encoder).
        generator: When given, the generator id the caches must have been made with.
    """

    def __init__(
        self,
        data: CaptionDataModule,
        train_cache: str,
        val_cache: str | None = None,
        generator: str | None = None,
    ):
        super().__init__()
        self.data = data
        self.train_cache = train_cache
        self.val_cache = val_cache
        self.generator = generator
        self._caches: dict[str, CaptionCache] = {}

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage)
        for split, folder, dataset, tsv in (
            ("train", self.train_cache, self.data.train_dataset, self.data.train_tsv),
            ("val", self.val_cache, self.data.val_dataset, self.data.val_tsv),
        ):
            if folder is None or dataset is None or split in self._caches:
                continue
            cache = CaptionCache(folder)
            cache.check([r.caption for r in dataset.records], str(tsv), generator=self.generator)
            self._caches[split] = cache

    def _loader(self, split: str, train: bool):
        dataset = self.data.train_dataset if train else self.data.val_dataset
        if split not in self._caches:
            return self.data.train_dataloader() if train else self.data.val_dataloader()
        cache = self._caches[split]
        collate = functools.partial(collate_cached_captions, cache_name=str(cache.manifest_path),
                                    fingerprint=cache.manifest.get("fingerprint"))
        if train:  # the wrapped module's seed: the same order as without the cache; resumable
            return shuffled_loader(CachedCaptionDataset(dataset, cache), self.data.batch_size, self.data.seed,
                                   num_workers=self.data.num_workers, collate_fn=collate)
        return DataLoader(
            CachedCaptionDataset(dataset, cache),
            batch_size=self.data.batch_size,
            shuffle=train,
            # The wrapped module's seed and settings: the same order as without the cache.
            generator=torch.Generator().manual_seed(self.data.seed) if train else None,
            drop_last=train,
            num_workers=self.data.num_workers,
            persistent_workers=self.data.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self):
        if self.data.train_dataset is None:
            self.setup("fit")
        return self._loader("train", train=True)

    def val_dataloader(self):
        if self.data.val_tsv is None:
            return []
        if self.data.val_dataset is None:
            self.setup("validate")
        return self._loader("val", train=False)
