"""Webdataset tar shards as a training source for every method, streamed and resumable.

A shard is a plain tar file whose members are grouped into samples by their name up to the first
dot (webdataset's convention, what img2dataset writes): ``000000042.jpg``, ``000000042.txt``,
``000000042.json`` form the sample ``000000042``. Two kinds of samples:

- ``captions`` (FROMAGe, GILL): one image (``jpg``, ``jpeg``, ``png`` or ``webp``) and its caption
  (``txt``; else the ``caption`` key of the ``json``).
- ``samples`` (MiniGPT-5: its CC3M stage-1 samples, VIST stories, MMDialog turns): a ``json`` with
  ``source``, ``target``, ``caption`` (or null) and the extensions of its images in order,
  ``"input_images": ["in0.jpg"]``, ``"output_images": ["out0.png"]`` (members
  ``000000042.in0.jpg``...). ``mmgen shards from-samples`` writes them from any sample dataset.

Shards are named by URLs: local paths or anything webdataset's ``gopen`` opens (``https://``,
``gs://``, ``pipe:aws s3 cp s3://bucket/x.tar -``), with brace patterns
(``data/cc3m-{00000..00331}.tar``); or by a folder (or file) ``shards.json`` written by the
``mmgen shards`` converters, which also records how many samples each shard holds.

How an epoch is read (:class:`ShardStream`):

- The shard list is permuted per epoch from ``(seed, epoch)`` and dealt round-robin to the
  ``world x num_workers`` readers (every DDP process, every DataLoader worker): each shard is read
  by exactly one reader, so each sample is read once per epoch.
- An epoch is a declared number of samples (``epoch_size``, or the total of ``shards.json``), so
  the run length is known to the schedules. Each process reads ``epoch_size // world`` samples,
  rounded down to whole batches and shared among its workers in whole batches: every process
  takes the same number of steps (DDP needs that). A reader whose shards hold fewer samples than
  its share reads them again from its first shard (webdataset's ``with_epoch`` does the same).
- A shuffle buffer of ``shuffle_buffer`` samples (raw bytes: decoding happens when a sample
  leaves it) mixes samples across the reader's shards, with a generator of its own.
- The state of every reader is its epoch, its read position (the shard slot and the offset of the
  next sample in it), the positions of the samples in its buffer and the buffer's generator.
  torchdata's ``StatefulDataLoader`` (``mmgen.data.loading``) puts it in every checkpoint: a
  resumed run reopens the shard at that offset (the samples before it are skipped without being
  decoded), reads back the buffered samples, and yields exactly the samples the uninterrupted
  run would have yielded.

Written by hand (webdataset's own pipeline has no resumable state): the position bookkeeping,
the shard dealing and the deterministic buffer. webdataset does the rest: URL opening and tar
reading (``tarfile_samples``), brace expansion, writing (``TarWriter``).
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
from pathlib import Path
from typing import Callable, Iterator, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmgen.data.loading import StatefulDataLoader, _world
from mmgen.errors import ConfigError, DataError
from mmgen.files import read_text

INDEX = "shards.json"
INDEX_FORMAT = "mmgen-shards"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
Kind = Literal["captions", "samples"]


# -- naming shards -----------------------------------------------------------------------------
def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard URLs from a brace pattern (``a-{000..009}.tar``), several joined by ``::``, or a list."""
    import braceexpand

    specs = spec if isinstance(spec, (list, tuple)) else str(spec).split("::")
    urls = [url for s in specs for url in braceexpand.braceexpand(str(s).strip()) if url]
    if not urls:
        raise ConfigError(f"no shard URLs in {spec!r}")
    return urls


def shard_name(url: str) -> str:
    """The file name of a shard URL: how feature caches match their data shards."""
    return url.rstrip("/").split("/")[-1].split("?")[0]


def resolve_source(source: str | list[str]) -> tuple[list[str], list[int] | None, str]:
    """``(urls, sample counts or None, kind or "")`` of a ``shards.json`` (or a folder holding
    one) or of a URL pattern (counts unknown)."""
    if isinstance(source, str) and not is_remote(source) and "{" not in source and "::" not in source:
        path = Path(source)
        index = path / INDEX if path.is_dir() else path if path.name.endswith(".json") else None
        if index is not None:
            return read_index(index)
    urls = expand_urls(source)
    for url in urls:
        if not is_remote(url) and not Path(url).is_file():
            raise DataError(f"shard not found: {url} (from {source!r})")
    return urls, None, ""


def write_index(out: Path, kind: str, source: str, shards: list[dict]) -> Path:
    """``out/shards.json``: the shards (``{"url", "samples"}``), their kind and source."""
    index = {"format": INDEX_FORMAT, "version": 1, "kind": kind, "source": source,
             "samples": sum(s["samples"] for s in shards), "shards": shards}
    path = Path(out) / INDEX
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


def read_index(path: Path) -> tuple[list[str], list[int], str]:
    """The shards of a ``shards.json``: URLs (relative ones are relative to its folder), counts, kind."""
    text = read_text(path, "shard index")
    try:
        index = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: not a shard index (format {INDEX_FORMAT!r}); write one with `mmgen shards`")
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{path}: key 'shards' must be a non-empty list")
    urls, counts = [], []
    for i, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("url"), str)
                and isinstance(shard.get("samples"), int) and shard["samples"] >= 0):
            raise DataError(f"{path}: shards[{i}] must be {{'url': str, 'samples': int >= 0}}, got {shard!r:.80}")
        url = shard["url"]
        if url.startswith("pipe:"):  # a data file must not run commands; a config may
            raise DataError(f"{path}: shards[{i}] is a pipe: command ({url[:60]!r}); a shard index names files or "
                            "URLs only: give pipe: URLs in the config's shard pattern instead")
        if not is_remote(url) and not os.path.isabs(url):
            url = str(path.parent / url)
        if not is_remote(url) and not Path(url).is_file():
            raise DataError(f"{path}: shards[{i}] {url} not found")
        urls.append(url)
        counts.append(shard["samples"])
    return urls, counts, str(index.get("kind", ""))


# -- reading -----------------------------------------------------------------------------------
def read_shard(url: str, skip: int = 0) -> Iterator[tuple[int, dict]]:
    """``(offset, raw sample)`` of one shard from sample ``skip`` on; the skipped ones are read
    past, never decoded. Raw samples map extensions to bytes, plus ``__key__`` and ``__url__``."""
    from webdataset.tariterators import tarfile_samples

    try:
        for offset, sample in enumerate(tarfile_samples([{"url": url}])):
            if offset >= skip:
                yield offset, sample
    except DataError:
        raise
    except Exception as error:  # a missing, cut-short or non-tar shard: name it
        raise DataError(f"{url}: cannot read shard: {type(error).__name__}: {error}") from error


def decode_image(data: bytes, where: str, image_size: int, fit: str = "crop", interpolation: str = "bicubic",
                 flip: bool = False) -> torch.Tensor:
    """Image bytes -> float (3, S, S) in [0, 1], processed exactly as ``mmgen.data.images.load_image``
    processes a file (same resize, crop or pad, decompression-bomb limit)."""
    from PIL import Image

    from mmgen.data.images import center_crop, pad_to_square, resize_shorter, to_tensor

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                    raise DataError(f"{where}: image of {width}x{height} pixels exceeds the limit (a decompression bomb?)")
                rgb = image.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise DataError(f"{where}: image too large to decode safely: {error}") from None
        except (OSError, ValueError) as error:
            raise DataError(f"{where}: cannot decode image: {error}") from error
    if fit == "pad":
        rgb = pad_to_square(rgb)
    rgb = center_crop(resize_shorter(rgb, image_size, interpolation), image_size)
    if flip:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(rgb)  # (3, S, S)


def sample_where(raw: dict) -> str:
    return f"{raw.get('__url__', '?')}, sample {raw.get('__key__', '?')!r}"


def image_member(raw: dict) -> str:
    for ext in IMAGE_EXTENSIONS:
        if ext in raw:
            return ext
    raise DataError(f"{sample_where(raw)}: no image member (.{', .'.join(IMAGE_EXTENSIONS)}); "
                    f"members: {sorted(k for k in raw if not k.startswith('__'))}")


def sample_json(raw: dict) -> dict:
    if "json" not in raw:
        return {}
    try:
        value = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{sample_where(raw)}: .json member is not UTF-8 JSON: {error}") from error
    if not isinstance(value, dict):
        raise DataError(f"{sample_where(raw)}: .json member must be an object, got {type(value).__name__}")
    return value


def raw_caption(raw: dict) -> str:
    if "txt" in raw:
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise DataError(f"{sample_where(raw)}: .txt member is not UTF-8: {error}") from error
    else:
        caption = sample_json(raw).get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{sample_where(raw)}: no caption (.txt member, or 'caption' in the .json)")
    return caption.strip()


class CaptionDecoder:
    """Raw caption sample -> ``{"image" (3, S, S), "caption"}`` (``image`` left out when the
    sample's features come from a cache: the image is then never decoded)."""

    def __init__(self, image_size: int = 224):
        self.image_size = image_size

    def __call__(self, raw: dict, decode_images: bool = True) -> dict:
        item = {"caption": raw_caption(raw)}
        if decode_images:
            item["image"] = decode_image(raw[image_member(raw)], sample_where(raw), self.image_size)
        return item


class SampleDecoder:
    """Raw interleaved sample -> the items of ``mmgen.data.minigpt5_samples.SampleDataset``
    (``source``, ``target``, ``caption``, ``input_images`` (n_in, 3, Si, Si), ``output_images``
    (n_out, 3, So, So)), images preprocessed as the dataset's ``image_preprocessing`` says."""

    def __init__(self, input_image_size: int = 224, output_image_size: int = 512,
                 image_preprocessing: str = "minigpt5", random_flip: bool = False):
        from mmgen.data.minigpt5_samples import IMAGE_PREPROCESSING

        if image_preprocessing not in IMAGE_PREPROCESSING:
            raise ConfigError(f"unknown image_preprocessing {image_preprocessing!r}; expected one of "
                              f"{list(IMAGE_PREPROCESSING)}")
        self.sizes = {"input": input_image_size, "output": output_image_size}
        self.options = IMAGE_PREPROCESSING[image_preprocessing]
        self.random_flip = random_flip

    def __call__(self, raw: dict, decode_images: bool = True) -> dict:
        from mmgen.data.minigpt5_samples import IMAGE_PLACEHOLDER, VOKENS, require_text

        where = sample_where(raw)
        record = sample_json(raw)
        if not record:
            raise DataError(f"{where}: an interleaved sample needs a .json member (source, target, images)")
        item = {"source": require_text(record.get("source"), where, "source"),
                "target": require_text(record.get("target"), where, "target"),
                "caption": record.get("caption")}
        for role, count in (("input", item["source"].count(IMAGE_PLACEHOLDER)),
                            ("output", item["target"].count(VOKENS[0]))):
            names = record.get(f"{role}_images", [])
            if not isinstance(names, list) or len(names) != count:
                raise DataError(f"{where}: {count} {role} image slot(s) but {role}_images is {names!r:.80}")
            if role == "output" and not decode_images:
                continue  # their latents come from a cache
            size = self.sizes[role]
            images = []
            for name in names:
                if not isinstance(name, str) or name not in raw:
                    raise DataError(f"{where}: {role} image member {name!r} missing from the sample")
                flip = self.random_flip and bool(torch.rand(()) < 0.5)
                images.append(decode_image(raw[name], f"{where}, {name}", size, flip=flip, **self.options[role]))
            item[f"{role}_images"] = torch.stack(images) if images else torch.zeros(0, 3, size, size)
        return item


# -- the stream --------------------------------------------------------------------------------
class ShardStream(IterableDataset):
    """Samples streamed from shards, split over processes and workers, shuffled through a buffer,
    with a declared epoch length and a resumable position (see the module docstring).

    Args:
        urls: Shard URLs.
        decode: Raw sample -> item (``CaptionDecoder``, ``SampleDecoder``).
        counts: Samples per shard, when known (``shards.json``).
        epoch_size: Samples per epoch over all processes; default the total of ``counts``.
        batch_size: Per-process batch size: every reader's share is whole batches.
        train: Shuffle (shard order and buffer), declared epoch length, re-reading when a reader's
            shards run out. False (validation): every shard once, in order, no buffer.
        shuffle_buffer: Samples in the shuffle buffer (0: shard order only).
        seed: Seed of the shard order and the buffer.
        features: Feature caches (``mmgen.data.feature_cache.FeatureCaches``) whose rows join
            each sample (and replace its decoded images, for CLIP features and VAE latents).
    """

    def __init__(self, urls: list[str], decode: Callable[..., dict], counts: list[int] | None = None,
                 epoch_size: int | None = None, batch_size: int = 1, train: bool = True,
                 shuffle_buffer: int = 1000, seed: int = 0, features=None):
        super().__init__()
        if counts is not None and len(counts) != len(urls):
            raise ConfigError(f"{len(counts)} sample counts for {len(urls)} shards")
        if shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.urls, self.counts, self.decode = list(urls), counts, decode
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.features = features
        if epoch_size is None and counts is not None:
            epoch_size = sum(counts)
        if train and epoch_size is None:
            raise ConfigError(
                "shards without a shard index (shards.json) have no known length: declare the data's "
                "epoch_size (samples per epoch), so that the schedule knows the run length"
            )
        if epoch_size is not None and (not isinstance(epoch_size, int) or epoch_size < 1):
            raise ConfigError(f"epoch_size must be a positive integer, got {epoch_size!r}")
        self.epoch_size = epoch_size
        self.world, self.rank = _world()  # set again by the loader (it is made after DDP starts)
        self.epoch = 0
        self._resume: dict | None = None  # the position a checkpoint restored
        self._state: dict | None = None  # the live position, while iterating

    # -- who reads what ---------------------------------------------------------------------------
    def _reader(self) -> tuple[int, int, int]:
        """(this reader's global index, readers in all, workers per process)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world * workers, workers

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.urls)))
        if self.train:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def my_shards(self, epoch: int) -> list[int]:
        reader, readers, _ = self._reader()
        if len(self.urls) < readers:
            raise ConfigError(
                f"{len(self.urls)} shard(s) for {readers} readers ({self.world} process(es) x "
                f"{readers // self.world} worker(s)): every reader needs at least one shard; write "
                "smaller shards or use fewer workers"
            )
        return self.shard_order(epoch)[reader::readers]

    def batches_per_process(self) -> int:
        return self.epoch_size // self.world // self.batch_size

    def quota(self) -> int | None:
        """Samples this reader yields per epoch (None: all of its shards, once)."""
        if not self.train:
            return None
        _, _, workers = self._reader()
        worker = get_worker_info().id if get_worker_info() is not None else 0
        batches = self.batches_per_process()
        return (batches // workers + (worker < batches % workers)) * self.batch_size

    def __len__(self) -> int:
        """Samples per process per epoch: whole batches of the declared epoch (training), or this
        process's shards (validation, when their counts are known)."""
        if self.train:
            return self.batches_per_process() * self.batch_size
        if self.counts is None:
            raise TypeError("validation shards without a shard index have no length")
        return sum(self.counts[i] for i in self.shard_order(0)[self.rank::self.world])

    # -- resumable state (torchdata's Stateful protocol) ------------------------------------------
    def state_dict(self) -> dict:
        if self._state is not None:  # iterating: (head, yielded, buffer, rng) of the live epoch
            live = self._state
            return {"epoch": self.epoch, "slot": live["head"][0], "offset": live["head"][1],
                    "buffer": [list(key) for key, _ in live["buffer"]], "rng": _rng_state(live["rng"]),
                    "yielded": live["yielded"]}
        if self._resume is not None:
            return dict(self._resume)
        return {"epoch": self.epoch, "slot": 0, "offset": 0, "buffer": [], "rng": None, "yielded": 0}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._resume = dict(state) if state.get("slot", 0) or state.get("offset", 0) or state.get("yielded", 0) else None
        self._state = None

    # -- iterating --------------------------------------------------------------------------------
    def _raw(self, shards: list[int], slot: int, offset: int, end: int) -> Iterator[tuple[tuple, dict]]:
        """``((slot, offset), raw)`` from ``(slot, offset)`` up to slot ``end``; slot k reads shard
        ``shards[k % len(shards)]`` (a training reader passes over its shards again until its
        quota is filled)."""
        while slot < end:
            for position, raw in read_shard(self.urls[shards[slot % len(shards)]], offset):
                yield (slot, position), raw
            slot, offset = slot + 1, 0

    def _item(self, key: tuple[int, int], raw: dict, shards: list[int]) -> dict:
        slot, offset = key
        shard = shards[slot % len(shards)]
        replaced = self.features is not None and self.features.replaces_images
        item = self.decode(raw, decode_images=not replaced)  # cached features: images never decoded
        if self.features is not None:
            item.update(self.features.get(self.urls[shard], offset, raw["__key__"]))
        item["index"] = (shard << 32) | offset  # unique per sample, for retrieval metrics
        item["key"] = raw["__key__"]
        return item

    def __iter__(self):
        shards = self.my_shards(self.epoch)
        quota = self.quota()
        resume, self._resume = self._resume, None
        if resume is not None and int(resume["epoch"]) == self.epoch:
            head = (int(resume["slot"]), int(resume["offset"]))
            yielded = int(resume["yielded"])
            buffer_keys = [tuple(k) for k in resume["buffer"]]
            rng = random.Random()
            if resume.get("rng") is not None:
                version, internal, gauss = resume["rng"]
                rng.setstate((version, tuple(internal), gauss))
        else:
            head, yielded, buffer_keys = (0, 0), 0, []
            rng = random.Random(f"{self.seed}:{self.epoch}:{self._reader()[0]}")
        buffer = self._recover(shards, buffer_keys, head)  # [(key, raw)], in the saved order
        live = self._state = {"head": head, "yielded": yielded, "buffer": buffer, "rng": rng}

        def full() -> bool:
            return quota is not None and live["yielded"] >= quota

        def take(key, raw) -> dict:
            live["yielded"] += 1
            return self._item(key, raw, shards)

        n = len(shards)
        while not full():  # one pass over this reader's shards, then the buffer drains
            end, read = (head[0] // n + 1) * n, 0
            for key, raw in self._raw(shards, *head, end):
                read += 1
                live["head"] = (key[0], key[1] + 1)  # the next sample to read
                if len(buffer) < self.shuffle_buffer:  # filling up
                    buffer.append((key, raw))
                    continue
                if buffer:  # leaves: a random buffered sample; enters: the one just read
                    k = rng.randrange(len(buffer))
                    (key, raw), buffer[k] = buffer[k], (key, raw)
                yield take(key, raw)
                if full():
                    break
            while buffer and not full():
                yield take(*buffer.pop(rng.randrange(len(buffer))))
            if not self.train or full():
                break
            if not read and head == ((end - n), 0):
                raise DataError(f"the shards of reader {self._reader()[0]} hold no samples "
                                f"({self.urls[shards[0]]} ...)")
            head = live["head"] = (end, 0)
        if quota is not None and live["yielded"] < quota:
            raise DataError(f"shard reader {self._reader()[0]} yielded {live['yielded']} of its {quota} samples")
        self.epoch += 1
        self._state = None

    def _recover(self, shards: list[int], keys: list[tuple], head: tuple) -> list[tuple[tuple, dict]]:
        """The buffered samples of a saved position, read back from the shards: they lie before
        the read head, in this reader's most recent shards; the samples between are skipped
        undecoded."""
        if not keys:
            return []
        wanted, found = set(keys), {}
        start = min(keys)
        for key, raw in self._raw(shards, *start, head[0] + 1):
            if key in wanted:
                found[key] = raw
            if len(found) == len(wanted) or key >= head:
                break
        missing = wanted - set(found)
        if missing:
            raise DataError(f"resuming: the buffered samples {sorted(missing)[:3]} (shard slot, offset) are not in "
                            "the shards any more: were the shards rewritten since the checkpoint?")
        return [(key, found[key]) for key in keys]


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


# -- batching ----------------------------------------------------------------------------------
def collate_shard_captions(items: list[dict], features=None) -> dict:
    """``{"captions", "index", "keys"}`` plus ``images`` (b, 3, S, S), or, from a feature cache,
    ``image_features`` (b, 1, f) with ``feature_fingerprint`` (what made them) and
    ``caption_embeddings`` (b, 77, d) where the cache holds them."""
    batch = {"captions": [i["caption"] for i in items],
             "index": torch.tensor([i["index"] for i in items], dtype=torch.long),
             "keys": [i["key"] for i in items]}
    if "image" in items[0]:
        batch["images"] = torch.stack([i["image"] for i in items])  # (b, 3, S, S)
    if features is not None:
        batch.update(features.collate(items))
    return batch


def collate_shard_samples(items: list[dict], features=None) -> dict:
    """``mmgen.data.minigpt5_samples.collate_samples``, with the output images' latent
    distribution from a cache in place of ``output_images`` when there is one."""
    from mmgen.data.minigpt5_samples import collate_samples

    if features is None or "output_latent_mean" not in items[0]:
        batch = collate_samples(items)
        return batch if features is None else {**batch, **features.collate(items)}
    for item in items:
        item.setdefault("output_images", torch.zeros(0, 3, 1, 1))
    batch = collate_samples(items)
    del batch["output_images"]
    batch["n_output_images"] = [i["output_latent_mean"].shape[0] for i in items]
    batch.update(features.collate(items))
    return batch


# -- the data module ---------------------------------------------------------------------------
class ShardDataModule(pl.LightningDataModule):
    """Training (and validation) data streamed from webdataset shards, for every method.

    Args:
        train: Training shards: a folder or ``shards.json`` written by ``mmgen shards``, or URLs
            with brace patterns (``/data/cc3m-{00000..00331}.tar``, ``https://host/x-{0..9}.tar``,
            several joined by ``::``).
        val: Validation shards, the same way; None for no validation.
        kind: ``captions`` (FROMAGe, GILL) or ``samples`` (MiniGPT-5's interleaved samples).
            Default: the kind recorded in ``shards.json``, else ``captions``.
        epoch_size: Samples per epoch over all processes. Required for URL patterns (their length
            is unknown); default for a shard index: every sample once. The schedules' run length
            follows from it.
        batch_size: Samples per batch, per process.
        num_workers: DataLoader worker processes; with DDP, processes x workers must not exceed
            the number of shards.
        shuffle_buffer: Samples mixed in each reader's shuffle buffer (raw bytes held in memory).
        seed: Seed of the shard order and the shuffle buffers.
        image_size: Side of caption images (CLIP: 224).
        input_image_size, output_image_size, image_preprocessing, random_flip: For ``samples``:
            as ``mmgen.data.minigpt5_samples.SampleDataset`` (flips are off by default here:
            cached latents are of unflipped images).
        features: Feature cache folder of the training shards (``mmgen cache-features``): CLIP
            pooled features (FROMAGe, GILL), VAE latent distributions (MiniGPT-5) or caption
            embeddings (GILL). The model checks that its own component made them.
        val_features: Feature cache folder of the validation shards.
    """

    def __init__(
        self,
        train: str,
        val: str | None = None,
        kind: Kind | None = None,
        epoch_size: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        image_size: int = 224,
        input_image_size: int = 224,
        output_image_size: int = 512,
        image_preprocessing: str = "minigpt5",
        random_flip: bool = False,
        features: str | list[str] | None = None,
        val_features: str | list[str] | None = None,
    ):
        super().__init__()
        if kind not in (None, "captions", "samples"):
            raise ConfigError(f"ShardDataModule: kind must be 'captions' or 'samples', got {kind!r}")
        for key, value in (("batch_size", batch_size), ("image_size", image_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ShardDataModule: {key} must be a positive integer, got {value!r}")
        self.train, self.val, self.kind, self.epoch_size = train, val, kind, epoch_size
        self.batch_size, self.num_workers, self.shuffle_buffer, self.seed = batch_size, num_workers, shuffle_buffer, seed
        self.image_size, self.input_image_size, self.output_image_size = image_size, input_image_size, output_image_size
        self.image_preprocessing, self.random_flip = image_preprocessing, random_flip
        self.features, self.val_features = features, val_features
        self.datasets: dict[str, ShardStream] = {}

    def _decoder(self, kind: str):
        if kind == "samples":
            return SampleDecoder(self.input_image_size, self.output_image_size, self.image_preprocessing,
                                 self.random_flip)
        return CaptionDecoder(self.image_size)

    def preprocessing(self, kind: str) -> dict:
        """The image settings a feature cache of ``kind`` must have been made with."""
        if kind == "clip":
            return {"image_size": self.image_size}
        if kind == "vae":
            return {"output_image_size": self.output_image_size, "image_preprocessing": self.image_preprocessing}
        return {}

    def stream(self, split: str) -> ShardStream:
        from mmgen.data.feature_cache import open_caches

        if split in self.datasets:
            return self.datasets[split]
        source = self.train if split == "train" else self.val
        urls, counts, recorded = resolve_source(source)
        kind = self.kind or recorded or "captions"
        if recorded and self.kind and recorded != self.kind:
            raise ConfigError(f"{source}: shards of kind {recorded!r}, the data module reads {self.kind!r}")
        self.kind = kind
        folders = self.features if split == "train" else self.val_features
        features = open_caches(folders, urls) if folders else None
        for cache in features.caches if features is not None else ():
            recorded, expected = cache.manifest.get("preprocessing") or {}, self.preprocessing(cache.kind)
            if recorded and recorded != expected:
                raise DataError(f"{cache.manifest_path}: made from images preprocessed as {recorded}, this data "
                                f"module gives {expected}: remake the cache or match the settings")
        if features is not None and kind == "samples" and self.random_flip:
            raise ConfigError("random_flip needs the images, but the output images' latents come from a cache "
                              "(made from unflipped images): set random_flip: false")
        stream = ShardStream(urls, self._decoder(kind), counts, self.epoch_size if split == "train" else None,
                             self.batch_size, train=split == "train", shuffle_buffer=self.shuffle_buffer,
                             seed=self.seed, features=features)
        if split == "train" and stream.batches_per_process() < 1:
            raise DataError(f"{source}: an epoch of {stream.epoch_size} samples over {stream.world} process(es) "
                            f"is less than one batch of {self.batch_size}")
        self.datasets[split] = stream
        return stream

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.stream("train")
        if self.val is not None and stage in (None, "fit", "validate"):
            self.stream("val")

    def _loader(self, split: str):
        import functools

        stream = self.stream(split)
        stream.world, stream.rank = _world()  # made after DDP started: this process's place
        collate = collate_shard_samples if self.kind == "samples" else collate_shard_captions
        loader = StatefulDataLoader if StatefulDataLoader is not None else torch.utils.data.DataLoader
        return loader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                      drop_last=split == "train", persistent_workers=self.num_workers > 0,
                      collate_fn=functools.partial(collate, features=stream.features))

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return [] if self.val is None else self._loader("val")


# -- writing -----------------------------------------------------------------------------------
class ShardWriter:
    """Writes samples (``{"__key__": str, ext: bytes}``) into ``{prefix}-00000.tar``... of at
    most ``shard_size`` samples, and, on ``close``, ``shards.json`` (last: a folder without it is
    incomplete). Members are written in key order of each sample, one sample after another."""

    def __init__(self, out: str | Path, prefix: str = "shard", shard_size: int = 10_000, kind: Kind = "captions",
                 source: str = ""):
        if shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"{self.out}: exists and is not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / INDEX).unlink(missing_ok=True)
        self.prefix, self.shard_size, self.kind, self.source = prefix, shard_size, kind, source
        self.shards: list[dict] = []
        self._tar = None
        self._count = 0

    def write(self, sample: dict) -> None:
        from webdataset import TarWriter

        if self._tar is None or self._count >= self.shard_size:
            self._finish_shard()
            name = f"{self.prefix}-{len(self.shards):05d}.tar"
            self._tar = TarWriter(str(self.out / name), encoder=False)
            self.shards.append({"url": name, "samples": 0})
            self._count = 0
        key = sample["__key__"]
        if "." in key or "/" in key:
            raise DataError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits names at the first dot)")
        self._tar.write(sample)
        self._count += 1
        self.shards[-1]["samples"] = self._count

    def _finish_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> Path:
        self._finish_shard()
        return write_index(self.out, self.kind, self.source, self.shards)
