"""Caches of what frozen components compute from each sample, so that training never runs them.

The frozen encoders' outputs never change during training, yet every epoch would run them again
on every image. ``mmgen cache-features`` runs them once over a set of shards and stores, per
data shard, one safetensors file of rows:

    CACHE/
      manifest.json             written last: a folder without it is unfinished
      cc3m-00000.safetensors    rows of the samples of data shard cc3m-00000.tar, in shard order
      ...

Kinds (what a row holds, what a batch then carries):

- ``clip``: a visual encoder's pooled features, ``features`` (n, f) -> ``image_features``
  (b, 1, f) (FROMAGe, GILL: the visual encoder never runs).
- ``vae``: the VAE's latent distribution of every output image, ``mean`` and ``std``
  (n_images, c, h, w) and ``starts`` (n + 1,) (the sample -> images map) ->
  ``output_latent_mean``/``output_latent_std`` (MiniGPT-5). Mean and std, not one sampled latent:
  training draws ``mean + std * noise`` at every step, as it would from the images, so the
  diffusion loss sees the same distribution (a fixed latent would reuse one draw every epoch).
- ``captions``: an image generator's caption embeddings, ``embeddings`` (n, 77, d) ->
  ``caption_embeddings`` (GILL's generation targets; the TSV cache of ``mmgen cache-captions``
  is ``mmgen.data.caption_cache``).

Each safetensors file's metadata lists the sample keys of its rows; reading a row checks that it
belongs to the sample being read (a cache made from other shards is refused, naming both).

The manifest records a **fingerprint** of the component that made the cache: its class, a hash
of its config and a hash of its weights (for caption embeddings: the generator's identity, since
GILL never loads the text encoder when it trains from a cache). Batches carry the fingerprint;
the method compares it with its own component's before it uses the rows, and refuses a cache
made by another encoder, another config or other weights, with an error naming the cache.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Callable, Iterable

import torch

from mmgen.errors import ConfigError, DataError
from mmgen.files import read_text, require_regular_file

FORMAT = "mmgen-feature-cache"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("clip", "vae", "captions")
TENSORS = {"clip": ("features",), "vae": ("mean", "std", "starts"), "captions": ("embeddings",)}


# -- fingerprints ------------------------------------------------------------------------------
def _config_dict(module) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


_WEIGHT_HASHES: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, shapes, dtypes, bytes); frozen weights
    never change, so it is computed once per module."""
    if module not in _WEIGHT_HASHES:
        digest = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        _WEIGHT_HASHES[module] = digest.hexdigest()
    return _WEIGHT_HASHES[module]


def module_fingerprint(component: torch.nn.Module, inner: torch.nn.Module | None = None) -> dict:
    """What made a cache: the component's class, its (inner model's) config hash and weights hash."""
    inner = component if inner is None else inner
    return {"class": f"{type(component).__module__}.{type(component).__qualname__}",
            "config_sha256": _sha256_json(_config_dict(inner)),
            "weights_sha256": weights_sha256(inner)}


def encoder_fingerprint(encoder) -> dict:
    """A visual encoder's (CLIP's pooled features)."""
    return module_fingerprint(encoder, getattr(encoder, "model", None) or encoder)


def vae_fingerprint(generator) -> dict:
    """An image generator's VAE, at the resolution it encodes (``image_size``)."""
    if getattr(generator, "vae", None) is None:
        generator.configure(parts=("vae",))
    return {**module_fingerprint(generator, generator.vae), "image_size": int(generator.image_size)}


def caption_fingerprint(generator, use_attention_mask: bool = False) -> dict:
    """An image generator's text encoder, by identity (hub id / folder, or config hash and seed of
    a random build): GILL never loads the text encoder when it trains from a cache."""
    return {"class": f"{type(generator).__module__}.{type(generator).__qualname__}",
            "identity": generator.identity, "max_length": int(generator.max_length),
            "use_attention_mask": bool(use_attention_mask)}


_CHECKED: "weakref.WeakKeyDictionary[torch.nn.Module, set]" = weakref.WeakKeyDictionary()


def check_made_by(batch: dict, kind: str, model: torch.nn.Module, expected: Callable[[], dict], what: str) -> None:
    """DataError unless the ``kind`` cache of ``batch`` was made by the component whose
    fingerprint ``expected()`` gives. A cache that passed is not checked again for ``model``
    (its frozen components do not change), so training steps do not rehash configs."""
    info = (batch.get("feature_caches") or {}).get(kind)
    if info is None:
        raise DataError(f"the batch carries cached {kind} rows without the cache's fingerprint")
    checked = _CHECKED.setdefault(model, set())
    if (kind, info["manifest"]) in checked:
        return
    fingerprint = expected()
    if info["fingerprint"] != fingerprint:
        differs = sorted(k for k in set(fingerprint) | set(info["fingerprint"])
                         if fingerprint.get(k) != info["fingerprint"].get(k))
        raise DataError(
            f"feature cache {info['manifest']} was made by another {what} than this model's "
            f"(different: {', '.join(differs)}; cache: {info['fingerprint'].get('class')}, model: "
            f"{fingerprint.get('class')}): remake it with `mmgen cache-features` from this model's config"
        )
    checked.add((kind, info["manifest"]))


# -- writing -----------------------------------------------------------------------------------
def write_feature_cache(
    out: str | Path,
    kind: str,
    shards: list[str],
    decode: Callable[..., dict],
    encode: Callable[[list[dict]], dict[str, torch.Tensor]],
    fingerprint: dict,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float16,
    source: str = "",
    preprocessing: dict | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> Path:
    """Read every sample of ``shards`` in order, decode it with ``decode`` (raw -> item), encode
    batches of items with ``encode`` (items -> {tensor name: rows}) and write one safetensors file
    per shard; the manifest last. Returns the manifest path."""
    from safetensors.torch import save_file

    from mmgen.data.shards import read_shard, shard_name

    if kind not in KINDS:
        raise ConfigError(f"feature cache kind must be one of {KINDS}, got {kind!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # unfinished until the manifest is written again
    names = [shard_name(url) for url in shards]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"shards with the same file name {repeated}: a cache matches shards by file name")
    entries = []
    for url, name in zip(shards, names):
        keys, parts = [], {}
        pending: list[dict] = []

        def flush():
            rows = encode(pending)
            for key, value in rows.items():
                parts.setdefault(key, []).append(value.detach().to("cpu"))
            pending.clear()

        for _, raw in read_shard(url):
            keys.append(raw["__key__"])
            pending.append(decode(raw))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        tensors = {}
        for key, chunks in parts.items():
            value = torch.cat(chunks)
            tensors[key] = value if not value.is_floating_point() else value.to(dtype)
        if kind == "vae":
            counts = torch.tensor([0] + [int(c) for c in torch.cat(parts["counts"]).tolist()])
            tensors["starts"] = counts.cumsum(0).to(torch.long)
            del tensors["counts"]
        file = Path(name).stem + ".safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / file), metadata={"keys": json.dumps(keys)})
        entries.append({"data": name, "file": file, "samples": len(keys)})
        if progress is not None:
            progress(name, len(keys))
    manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "fingerprint": fingerprint,
                "source": source, "dtype": str(dtype).removeprefix("torch."), "preprocessing": preprocessing or {},
                "samples": sum(e["samples"] for e in entries), "shards": entries}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


# -- reading -----------------------------------------------------------------------------------
class FeatureCache:
    """A cache folder opened for reading: rows by (data shard URL, offset, sample key). Each
    shard's file is opened lazily per process (DataLoader workers too) and read row by row."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.manifest_path = self.dir / MANIFEST
        if not self.manifest_path.exists():
            raise DataError(f"no feature cache at {self.dir} ({MANIFEST} missing, or the cache was not finished): "
                            "make it with `mmgen cache-features`")
        try:
            manifest = json.loads(read_text(self.manifest_path, "feature cache manifest"))
        except json.JSONDecodeError as error:
            raise DataError(f"{self.manifest_path}: not valid JSON: {error}") from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DataError(f"{self.manifest_path}: not a feature cache ({FORMAT!r} version {VERSION})")
        if manifest.get("kind") not in KINDS:
            raise DataError(f"{self.manifest_path}: kind {manifest.get('kind')!r}, expected one of {KINDS}")
        shards = manifest.get("shards")
        if not isinstance(shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("data"), str) and isinstance(s.get("file"), str)
                and Path(s["file"]).name == s["file"] and isinstance(s.get("samples"), int) for s in shards):
            raise DataError(f"{self.manifest_path}: key 'shards' must list {{'data', 'file', 'samples'}} entries")
        if not isinstance(manifest.get("fingerprint"), dict):
            raise DataError(f"{self.manifest_path}: missing the fingerprint of the component that made it")
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.fingerprint: dict = manifest["fingerprint"]
        self._entries = {s["data"]: s for s in shards}
        self._open: dict[str, tuple] = {}

    def __getstate__(self):  # DataLoader workers open their own files
        return {**self.__dict__, "_open": {}}

    def covers(self, urls: Iterable[str]) -> None:
        """DataError naming the first data shard this cache has no rows for."""
        from mmgen.data.shards import shard_name

        for url in urls:
            if shard_name(url) not in self._entries:
                raise DataError(f"feature cache {self.dir} has no rows for shard {url} (it covers "
                                f"{len(self._entries)} other shards): remake it for these shards")

    #: Shard files kept open per process: a reader moves through its shards one after another
    #: (a few at once with a shuffle buffer), and each open file holds its key list in memory.
    OPEN_FILES = 4

    def _shard(self, name: str):
        if name not in self._open:
            from safetensors import safe_open

            while len(self._open) >= self.OPEN_FILES:
                self._open.pop(next(iter(self._open)))  # the least recently opened

            entry = self._entries[name]
            path = require_regular_file(self.dir / entry["file"], f"feature cache file (listed in {self.manifest_path})")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = json.loads((handle.metadata() or {}).get("keys", "null"))
            except Exception as error:  # cut short, not safetensors, bad metadata
                raise DataError(f"{path}: not a readable feature cache file: {error}") from error
            if not isinstance(keys, list) or len(keys) != entry["samples"]:
                raise DataError(f"{path}: its key list does not hold the {entry['samples']} samples the manifest says")
            missing = set(TENSORS[self.kind]) - set(handle.keys())
            if missing:
                raise DataError(f"{path}: missing tensors {sorted(missing)} of a {self.kind!r} cache")
            self._open[name] = (handle, keys, {t: handle.get_slice(t) for t in TENSORS[self.kind]}, path)
        return self._open[name]

    def get(self, url: str, offset: int, key: str) -> dict[str, torch.Tensor]:
        """The cached rows of sample ``key``, the ``offset``-th of shard ``url``."""
        from mmgen.data.shards import shard_name

        handle, keys, slices, path = self._shard(shard_name(url))
        if offset >= len(keys) or keys[offset] != key:
            found = keys[offset] if offset < len(keys) else "nothing"
            raise DataError(f"{path}: row {offset} is of sample {found!r}, but {url} has {key!r} there: the cache "
                            "was made from other shards; remake it")
        if self.kind == "clip":
            rows = {"image_features": slices["features"][offset : offset + 1]}  # (1, f)
        elif self.kind == "captions":
            rows = {"caption_embedding": slices["embeddings"][offset : offset + 1][0]}  # (77, d)
        else:
            start, end = (int(v) for v in slices["starts"][offset : offset + 2])
            rows = {"output_latent_mean": slices["mean"][start:end], "output_latent_std": slices["std"][start:end]}
        for name, value in rows.items():  # a corrupted or poisoned file would train to NaN
            if not bool(torch.isfinite(value).all()):
                raise DataError(f"{path}: the {name} of sample {key!r} (row {offset}) holds NaN or infinite values")
        return rows


class FeatureCaches:
    """The caches of one split (e.g. CLIP features and caption embeddings for GILL): rows merged
    per sample, batches collated with each cache's fingerprint."""

    def __init__(self, caches: list[FeatureCache]):
        kinds = [c.kind for c in caches]
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f"two feature caches of the same kind: {[str(c.dir) for c in caches]}")
        self.caches = caches

    def get(self, url: str, offset: int, key: str) -> dict:
        rows = {}
        for cache in self.caches:
            rows.update(cache.get(url, offset, key))
        return rows

    @property
    def replaces_images(self) -> bool:
        """Whether the images need no decoding (their features or latents are cached)."""
        return any(c.kind in ("clip", "vae") for c in self.caches)

    def collate(self, items: list[dict]) -> dict:
        batch: dict = {"feature_caches": {c.kind: {"manifest": str(c.manifest_path), "fingerprint": c.fingerprint}
                                          for c in self.caches}}
        for cache in self.caches:
            if cache.kind == "clip":
                batch["image_features"] = torch.stack([i["image_features"] for i in items])  # (b, 1, f)
            elif cache.kind == "captions":
                batch["caption_embeddings"] = torch.stack([i["caption_embedding"] for i in items])  # (b, 77, d)
                batch["caption_cache"] = str(cache.manifest_path)
            else:
                batch["output_latent_mean"] = torch.cat([i["output_latent_mean"] for i in items])  # (N, c, h, w)
                batch["output_latent_std"] = torch.cat([i["output_latent_std"] for i in items])
        return batch


def open_caches(folders: str | list[str], urls: list[str]) -> FeatureCaches:
    folders = [folders] if isinstance(folders, str) else list(folders)
    caches = [FeatureCache(folder) for folder in folders]
    for cache in caches:
        cache.covers(urls)
    return FeatureCaches(caches)
