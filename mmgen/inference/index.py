"""A retrieval index: image embeddings made by a trained model, searched by cosine similarity.

FROMAGe and GILL retrieve an image by comparing the text embedding of their retrieval token with
the embeddings of a fixed set of candidate images, made once by the same model's visual encoder
and retrieval head (``retrieval_head.embed_image(visual_encoder(images))``). This module builds
that set, stores it as a documented folder, and searches it::

    index = RetrievalIndex.build(model, "images/")          # a folder, a caption TSV or a list
    index.save("out/index")
    index = RetrievalIndex.load("out/index")                 # backend="faiss" for millions
    index.check_model(model)                                 # refuses an index of another model
    results = index.search(queries, k=3, exclude=[{"shown.png"}])   # (q, e) -> q lists of hits

The folder (format version 1; ``docs/retrieval_index.md`` describes every field)::

    index.json              metadata: format, version, count, embed_dim, dtype, image_root and
                            the fingerprint of the model that made the embeddings; written last
    embeddings.safetensors  one tensor "embeddings", (count, embed_dim), float16 or float32,
                            every row L2-normalised
    paths.json              JSON list of `count` image paths, POSIX, relative to image_root
    faiss.index             optional: a trained FAISS index (written by save() with that backend)

Images the index points to must exist: :meth:`RetrievalIndex.load` checks every file and
refuses the index naming the missing ones (``check_images=False`` skips that for huge stores on
slow file systems; the files of each result are then checked when it is returned).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from mmgen.errors import ConfigError, DataError
from mmgen.inference.types import RetrievedImage

FORMAT = "mmgen-retrieval-index"
FORMAT_VERSION = 1
META_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
PATHS_FILE = "paths.json"
FAISS_FILE = "faiss.index"
EMBEDDINGS_KEY = "embeddings"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BACKENDS = ("exact", "faiss")

# Fingerprint: tensors up to this many elements are hashed whole, larger ones on this many
# evenly spaced elements (a pretrained and a random backbone differ everywhere; hashing every
# value of a 1B-parameter encoder would take seconds for nothing).
_HASH_WHOLE = 1 << 20
_HASH_SAMPLES = 1 << 16


# -- which model made it ----------------------------------------------------------------------
def image_side(model) -> dict[str, torch.nn.Module]:
    """The modules that turn an image into its retrieval embedding: the visual encoder and the
    retrieval head's image projection. ConfigError for a model without them (MiniGPT-5)."""
    encoder = getattr(model, "visual_encoder", None)
    head = getattr(model, "retrieval_head", None)
    if encoder is None or head is None or not hasattr(head, "embed_image"):
        raise ConfigError(
            f"{type(model).__name__} has no visual_encoder + retrieval_head (with embed_image): it cannot "
            "embed images for retrieval (FROMAGe and GILL can; MiniGPT-5 only generates)"
        )
    if hasattr(head, "image_proj"):  # RetrievalHead: only its image side decides image embeddings
        if head.image_proj is None:
            raise ConfigError(f"{type(model).__name__}.retrieval_head is not built: call configure_model() first")
        return {"visual_encoder": encoder, "retrieval_head.image_proj": head.image_proj}
    return {"visual_encoder": encoder, "retrieval_head": head}


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > _HASH_WHOLE:
        step = math.ceil(flat.numel() / _HASH_SAMPLES)
        flat = flat[::step]  # evenly spaced elements, on the tensor's own device
    if flat.is_floating_point():
        # bfloat16 rounding: the same model loaded in float32 or bfloat16 has the same fingerprint
        flat = flat.to(torch.bfloat16).view(torch.int16)
    return flat.cpu().contiguous().numpy().tobytes()


def embed_dim_of(model) -> int:
    head = model.retrieval_head
    return int(getattr(head, "embed_dim", None) or head.image_proj.out_features)


def fingerprint(model) -> str:
    """A hash of everything that decides a model's image embeddings: the classes, image size,
    feature and embedding widths, and the name, shape, dtype class and values of every tensor of
    the visual encoder and the retrieval head's image projection ("sha256:<hex>").

    Values are hashed after rounding to bfloat16, so a float32 and a bfloat16 copy of one model
    agree; tensors over 2^20 elements are hashed on 2^16 evenly spaced elements.
    """
    modules = image_side(model)
    digest = hashlib.sha256()
    encoder = modules["visual_encoder"]
    facts = {
        "encoder": type(encoder).__name__,
        "head": type(model.retrieval_head).__name__,
        "image_size": getattr(encoder, "image_size", None),
        "feature_dim": getattr(encoder, "feature_dim", None),
        "embed_dim": embed_dim_of(model),
    }
    digest.update(json.dumps(facts, sort_keys=True, default=str).encode())
    for prefix, module in modules.items():
        for name, tensor in sorted(module.state_dict().items()):
            if tensor.device.type == "meta":
                raise ConfigError(f"{type(model).__name__}.{prefix}.{name} is on the meta device (a dry run): "
                                  "it has no values to fingerprint")
            kind = "float" if tensor.is_floating_point() else str(tensor.dtype)
            digest.update(f"{prefix}.{name}|{tuple(tensor.shape)}|{kind}".encode())
            digest.update(_tensor_bytes(tensor))
    return "sha256:" + digest.hexdigest()


# -- which images -----------------------------------------------------------------------------
def list_images(
    images: str | Path | Sequence[str | Path],
    image_dir: str | Path | None = None,
    image_column: str | None = None,
) -> tuple[Path, list[str], str]:
    """The images to index, as (root, paths relative to root, description of the source).

    ``images``: a folder (every image file below it, sorted; ``IMAGE_EXTENSIONS``), a caption
    TSV with a header row (its ``image`` or ``image_path`` column, or ``image_column``; paths
    relative to ``image_dir``, default the TSV's folder) or a list of paths (relative to
    ``image_dir``, default the working directory).
    """
    if isinstance(images, (str, Path)):
        source = Path(images)
        if source.is_dir():
            root = source
            paths = sorted(
                p.relative_to(root).as_posix() for p in root.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if not paths:
                raise DataError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            return root, paths, f"folder {source}"
        if source.is_file():
            root = Path(image_dir) if image_dir is not None else source.parent
            return root, _tsv_images(source, image_column), f"TSV {source}"
        raise DataError(f"{source}: no such image folder or caption TSV")
    root = Path(image_dir) if image_dir is not None else Path(".")
    paths = [Path(p).as_posix() for p in images]
    if not paths:
        raise DataError("no images to index (empty list)")
    return root, paths, f"{len(paths)} listed images"


def _tsv_images(tsv: Path, image_column: str | None) -> list[str]:
    lines = tsv.read_text(encoding="utf-8-sig").splitlines()
    if not lines:
        raise DataError(f"{tsv}: empty file, expected a header row")
    header = lines[0].split("\t")
    if image_column is None:
        image_column = next((c for c in ("image", "image_path") if c in header), None)
        if image_column is None:
            raise DataError(f"{tsv}: header has no 'image' or 'image_path' column (columns: {header}); "
                            "name it with image_column")
    elif image_column not in header:
        raise DataError(f"{tsv}: header has no column {image_column!r}; columns found: {header}")
    at = header.index(image_column)
    paths = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{tsv}, line {number}: {len(fields)} tab-separated fields, expected {len(header)}")
        if not fields[at].strip():
            raise DataError(f"{tsv}, line {number}: empty {image_column!r}")
        paths.append(fields[at].strip())
    if not paths:
        raise DataError(f"{tsv}: no rows")
    return paths


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, root: Path, paths: list[str], image_size: int):
        self.root, self.paths, self.image_size = root, paths, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from mmgen.data.images import load_image

        path = self.root / self.paths[i]
        try:
            return load_image(path, self.image_size)  # (3, s, s) in [0, 1]
        except (OSError, ValueError) as error:  # missing, truncated or not an image
            raise DataError(f"cannot read image {path}: {error}") from error


def _missing(root: Path, paths: Iterable[str]) -> list[str]:
    return [p for p in paths if not (root / p).is_file()]


def _missing_message(where: str, root: Path, missing: list[str], total: int) -> str:
    shown = ", ".join(str(root / p) for p in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"{where}: {len(missing)} of {total} indexed images are missing: {shown}{more}"


# -- the index --------------------------------------------------------------------------------
class RetrievalIndex:
    """L2-normalised image embeddings (n, e) and the images they came from.

    Args:
        embeddings: (n, e); rows are L2-normalised here.
        paths: The n image paths, relative to ``root`` (or absolute).
        root: Folder the paths are relative to.
        model_fingerprint: :func:`fingerprint` of the model that made the embeddings (None: not
            known, nothing to check).
        backend: "exact" (torch matmul + top-k, the default) or "faiss".
        faiss_factory: FAISS ``index_factory`` string for the faiss backend: "Flat" (exact inner
            product), "HNSW32", "IVF4096,Flat", ... (inner-product metric; trained on the
            embeddings when the type needs training).
        faiss_nprobe: IVF lists visited per query (faiss backend; None: FAISS's default).
        meta: Further metadata (what ``index.json`` holds).
    """

    def __init__(
        self,
        embeddings: torch.Tensor,
        paths: Sequence[str],
        root: str | Path = ".",
        model_fingerprint: str | None = None,
        backend: str = "exact",
        faiss_factory: str = "Flat",
        faiss_nprobe: int | None = None,
        meta: dict | None = None,
    ):
        if embeddings.ndim != 2:
            raise DataError(f"index embeddings must be (n, e), got shape {tuple(embeddings.shape)}")
        if embeddings.shape[0] != len(paths):
            raise DataError(f"{embeddings.shape[0]} embeddings but {len(paths)} image paths")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown retrieval index backend {backend!r}; choose one of {BACKENDS}")
        self.embeddings = F.normalize(embeddings.detach().float(), dim=-1)  # (n, e) float32
        self.paths = [str(p) for p in paths]
        self.root = Path(root)
        self.model_fingerprint = model_fingerprint
        self.backend = backend
        self.faiss_factory = faiss_factory
        self.faiss_nprobe = faiss_nprobe
        self.meta = dict(meta or {})
        self.directory: Path | None = None  # the folder it was loaded from or saved to
        self.check_results = False  # load(check_images=False): check each result's file instead
        self._faiss = None
        self._rows_by_path: dict[str, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        where = f", {self.directory}" if self.directory else ""
        return f"RetrievalIndex({len(self)} images, embed_dim={self.embed_dim}, backend={self.backend!r}{where})"

    @property
    def embed_dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def name(self) -> str:
        """How error messages name this index: its folder, or where it was built from."""
        if self.directory is not None:
            return f"retrieval index {self.directory}"
        return f"retrieval index of {self.meta.get('images', {}).get('source', 'unknown images')} (in memory)"

    def path_of(self, row: int) -> str:
        """The file of row ``row``: root joined with its stored path."""
        return str(self.root / self.paths[row])

    def to(self, device: str | torch.device) -> "RetrievalIndex":
        """Move the embeddings (exact backend) to ``device``, e.g. the model's GPU."""
        self.embeddings = self.embeddings.to(device)
        return self

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        images: str | Path | Sequence[str | Path],
        image_dir: str | Path | None = None,
        image_column: str | None = None,
        batch_size: int = 64,
        image_size: int | None = None,
        num_workers: int = 0,
        source: str | None = None,
        progress: bool = False,
        **index_args,
    ) -> "RetrievalIndex":
        """Embed ``images`` (a folder, a caption TSV or a list of paths; see :func:`list_images`)
        with ``model``'s visual encoder and retrieval head, on the model's device.

        ``image_size``: side the images are resized and centre-cropped to (default: the visual
        encoder's). ``source``: where the model came from (a checkpoint or folder), recorded in
        the metadata. ``index_args``: backend options of :class:`RetrievalIndex`.
        """
        modules = image_side(model)
        encoder, head = modules["visual_encoder"], model.retrieval_head
        root, paths, described = list_images(images, image_dir, image_column)
        missing = _missing(root, paths)
        if missing:
            raise DataError(_missing_message(f"images of {described}", root, missing, len(paths)))
        size = image_size or getattr(encoder, "image_size", None) or 224
        try:
            device = next(p.device for p in head.parameters())
        except StopIteration as error:
            raise ConfigError(f"{type(model).__name__}.retrieval_head has no parameters: "
                              "call configure_model() first") from error
        loader = torch.utils.data.DataLoader(
            _ImageFiles(root, paths, size), batch_size=batch_size, num_workers=num_workers
        )
        if progress:
            from tqdm import tqdm

            loader = tqdm(loader, desc="embedding images", unit="batch")
        was_training = model.training
        model.eval()
        try:
            chunks = []
            for pixels in loader:  # (b, 3, s, s) in [0, 1]
                features = encoder(pixels.to(device))  # (b, 1, f) pooled
                chunks.append(head.embed_image(features.float()).float().cpu())  # (b, e)
        finally:
            model.train(was_training)
        meta = {
            "images": {"source": str(images) if isinstance(images, (str, Path)) else described,
                       "count": len(paths)},
            "model": {"class": f"{type(model).__module__}.{type(model).__qualname__}", "source": source,
                      "image_size": size},
        }
        return cls(torch.cat(chunks), paths, root, fingerprint(model), meta=meta, **index_args)

    # -- the folder ---------------------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: str = "float16") -> Path:
        """Write the index folder (``index.json`` last: a folder without it is incomplete and is
        refused). ``dtype``: "float16" (half the size; scores change by about 1e-3) or "float32"."""
        from safetensors.torch import save_file

        if dtype not in ("float16", "float32"):
            raise ConfigError(f"index embeddings are stored as float16 or float32, not {dtype!r}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)  # incomplete from here until the end
        embeddings = self.embeddings.to("cpu", getattr(torch, dtype)).contiguous()
        save_file({EMBEDDINGS_KEY: embeddings}, str(directory / EMBEDDINGS_FILE), metadata={"format": FORMAT})
        (directory / PATHS_FILE).write_text(json.dumps(self.paths, ensure_ascii=False), encoding="utf-8")
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "count": len(self),
            "embed_dim": self.embed_dim,
            "dtype": dtype,
            "normalized": True,
            "image_root": _relative_root(self.root, directory),
            "model": {**self.meta.get("model", {}), "fingerprint": self.model_fingerprint},
            "images": self.meta.get("images", {}),
            "created": self.meta.get("created")
            or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if self.backend == "faiss" and self.faiss_factory != "Flat":
            import faiss

            faiss.write_index(self._faiss_index(), str(directory / FAISS_FILE))
            meta["faiss"] = {"file": FAISS_FILE, "factory": self.faiss_factory}
        else:
            (directory / FAISS_FILE).unlink(missing_ok=True)
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self.directory = directory
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        backend: str = "exact",
        check_images: bool = True,
        faiss_factory: str | None = None,
        faiss_nprobe: int | None = None,
    ) -> "RetrievalIndex":
        """Read an index folder, checking every file (DataError naming the file and what is wrong).

        ``check_images``: check now that every indexed image exists (refused, naming the missing
        files, if not); False: check only the files of the results search() returns.
        ``faiss_factory``: for the faiss backend, the FAISS index type (default: the one saved in
        the folder, else "Flat").
        """
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not directory.is_dir():
            raise DataError(f"retrieval index {directory}: no such folder")
        if not meta_path.is_file():
            raise DataError(f"retrieval index {directory}: no {META_FILE} (not an index, or its writing "
                            "was interrupted: build it again)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{meta_path}: not valid JSON: {error}") from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: not an mmgen retrieval index (format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
        version = meta.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise DataError(f"{meta_path}: format version {version!r}; this mmgen reads version {FORMAT_VERSION} "
                            "(made by a newer mmgen?)")
        for key in ("count", "embed_dim", "image_root", "model"):
            if key not in meta:
                raise DataError(f"{meta_path}: missing key {key!r}")

        embeddings = _read_embeddings(directory / EMBEDDINGS_FILE, meta)
        paths_path = directory / PATHS_FILE
        if not paths_path.is_file():
            raise DataError(f"retrieval index {directory}: no {PATHS_FILE}")
        try:
            paths = json.loads(paths_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{paths_path}: not valid JSON: {error}") from error
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise DataError(f"{paths_path}: expected a JSON list of path strings")
        if len(paths) != meta["count"]:
            raise DataError(f"{paths_path}: {len(paths)} paths, but {META_FILE} says count={meta['count']}")

        root = Path(meta["image_root"])
        if not root.is_absolute():
            root = Path(os.path.normpath(directory / root))  # "index/../images" -> "images"
        if check_images:
            missing = _missing(root, paths)
            if missing:
                raise DataError(_missing_message(f"retrieval index {directory}", root, missing, len(paths)))

        saved_faiss = meta.get("faiss") or {}
        factory = faiss_factory or saved_faiss.get("factory") or "Flat"
        index = cls(
            embeddings, paths, root, (meta.get("model") or {}).get("fingerprint"), backend=backend,
            faiss_factory=factory, faiss_nprobe=faiss_nprobe,
            meta={k: v for k, v in meta.items() if k in ("model", "images", "created")},
        )
        index.directory = directory
        index.check_results = not check_images
        if backend == "faiss" and saved_faiss.get("factory") == factory and (directory / FAISS_FILE).is_file():
            faiss = _import_faiss()
            try:
                index._faiss = faiss.read_index(str(directory / FAISS_FILE))
            except RuntimeError as error:
                raise DataError(f"{directory / FAISS_FILE}: not a readable FAISS index: {error}") from error
            if index._faiss.ntotal != len(index) or index._faiss.d != index.embed_dim:
                raise DataError(f"{directory / FAISS_FILE}: holds {index._faiss.ntotal} vectors of width "
                                f"{index._faiss.d}, the index {len(index)} of width {index.embed_dim}")
            index._set_nprobe()
        return index

    # -- the model ------------------------------------------------------------------------------------
    def check_model(self, model) -> None:
        """ConfigError naming this index if ``model`` did not make its embeddings (another
        visual encoder, retrieval head or embedding width): its text queries would be compared
        with image embeddings of a different space."""
        width = embed_dim_of(model)
        if width != self.embed_dim:
            raise ConfigError(f"{self.name} holds {self.embed_dim}-d embeddings, but "
                              f"{type(model).__name__}'s retrieval head makes {width}-d ones: rebuild it "
                              "with `mmgen index build` for this model")
        if self.model_fingerprint is None:
            return
        theirs = fingerprint(model)
        if theirs != self.model_fingerprint:
            made_by = (self.meta.get("model") or {}).get("source") or "an unrecorded source"
            raise ConfigError(
                f"{self.name} was made by another model (from {made_by}; fingerprint "
                f"{self.model_fingerprint[:19]}..., this {type(model).__name__} has {theirs[:19]}...): its "
                "image embeddings are not comparable with this model's queries; rebuild it with "
                "`mmgen index build --model ... --images ... --out ...`"
            )

    # -- searching ---------------------------------------------------------------------------------------
    def search(
        self,
        queries: torch.Tensor,
        k: int = 1,
        exclude: Sequence[Iterable[str | Path] | None] | None = None,
    ) -> list[list[RetrievedImage]]:
        """The k images most similar to each query: ``q`` lists of up to k
        ``RetrievedImage(path, score, rank)``, best first.

        queries: (q, e) or (e,), L2-normalised here; scores are cosine similarities.
        exclude: per query, image paths not to return (the images already shown in its
            conversation); paths match after making them absolute. With fewer than k images left
            a list is shorter.
        """
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.embed_dim:
            raise ConfigError(f"{self.name}: queries must be (q, {self.embed_dim}), got {tuple(queries.shape)}")
        if k < 1:
            raise ConfigError(f"search needs k >= 1, got {k}")
        q = queries.shape[0]
        if exclude is not None and len(exclude) != q:
            raise ConfigError(f"search: {q} queries but {len(exclude)} exclude sets")
        excluded = [self._rows_of(paths or ()) for paths in exclude] if exclude is not None else [[] for _ in range(q)]
        queries = F.normalize(queries.detach().float(), dim=-1)
        if self.backend == "faiss":
            scores, rows = self._search_faiss(queries, k, excluded)
        else:
            scores, rows = self._search_exact(queries, k, excluded)
        results = []
        for i in range(q):
            hits, rank = [], 0
            for score, row in zip(scores[i], rows[i]):
                if row < 0 or row in excluded[i] or not math.isfinite(score):
                    continue  # FAISS pads with -1; excluded rows come back as -inf
                hits.append(RetrievedImage(self.path_of(row), float(score), rank))
                rank += 1
                if rank == k:
                    break
            results.append(hits)
        if self.check_results:
            missing = sorted({hit.path for hits in results for hit in hits if not Path(hit.path).is_file()})
            if missing:
                raise DataError(f"{self.name}: retrieved images are missing: {', '.join(missing[:5])}")
        return results

    def _rows_of(self, paths: Iterable[str | Path]) -> set[int]:
        if self._rows_by_path is None:
            self._rows_by_path = {}
            for row in range(len(self)):
                self._rows_by_path.setdefault(os.path.abspath(self.path_of(row)), []).append(row)
        rows: set[int] = set()
        for path in paths:
            rows.update(self._rows_by_path.get(os.path.abspath(str(path)), ()))
        return rows

    def _search_exact(self, queries, k, excluded, chunk: int = 1024):
        n = len(self)
        take = min(k, n)
        scores, rows = [], []
        embeddings = self.embeddings
        for start in range(0, queries.shape[0], chunk):
            block = queries[start:start + chunk].to(embeddings.device, embeddings.dtype)  # (c, e)
            sim = (block @ embeddings.T).float()  # (c, n) cosine similarities
            for j in range(block.shape[0]):
                drop = excluded[start + j]
                if drop:
                    sim[j, list(drop)] = float("-inf")
            top = sim.topk(take, dim=1)  # exact top-k
            scores.extend(top.values.cpu().tolist())
            rows.extend(top.indices.cpu().tolist())
        return scores, rows

    # -- FAISS ---------------------------------------------------------------------------------------------
    def _faiss_index(self):
        if self._faiss is None:
            faiss = _import_faiss()
            vectors = self.embeddings.detach().float().cpu().contiguous().numpy()  # (n, e)
            try:
                index = faiss.index_factory(self.embed_dim, self.faiss_factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as error:
                raise ConfigError(f"FAISS cannot build index type {self.faiss_factory!r}: {error}") from error
            if not index.is_trained:
                index.train(vectors)
            index.add(vectors)
            self._faiss = index
            self._set_nprobe()
        return self._faiss

    def _set_nprobe(self) -> None:
        if self.faiss_nprobe is not None:
            faiss = _import_faiss()
            faiss.ParameterSpace().set_index_parameter(self._faiss, "nprobe", int(self.faiss_nprobe))

    def _search_faiss(self, queries, k, excluded):
        index = self._faiss_index()
        extra = max((len(rows) for rows in excluded), default=0)
        take = min(k + extra, len(self))  # excluded rows may take places in the top k
        scores, rows = index.search(queries.cpu().contiguous().numpy(), take)
        return scores.tolist(), rows.tolist()


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ConfigError("the faiss retrieval backend needs FAISS: pip install 'mmgen[faiss]' "
                          "(or faiss-gpu); the default backend='exact' needs nothing") from error
    return faiss


def _relative_root(root: Path, directory: Path) -> str:
    """image_root as stored: relative to the index folder where both are on one tree, so that the
    index and its images can move together."""
    try:
        return Path(os.path.relpath(root.resolve(), directory.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return root.resolve().as_posix()


def _read_embeddings(path: Path, meta: dict) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise DataError(f"retrieval index {path.parent}: no {path.name}")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable safetensors file (truncated or damaged?): {error}") from error
    if EMBEDDINGS_KEY not in tensors:
        raise DataError(f"{path}: no tensor {EMBEDDINGS_KEY!r} (found {sorted(tensors)})")
    embeddings = tensors[EMBEDDINGS_KEY]
    expected = (meta["count"], meta["embed_dim"])
    if tuple(embeddings.shape) != expected:
        raise DataError(f"{path}: embeddings have shape {tuple(embeddings.shape)}, {META_FILE} says {expected}")
    if embeddings.dtype not in (torch.float16, torch.float32):
        raise DataError(f"{path}: embeddings are {embeddings.dtype}, expected float16 or float32")
    embeddings = embeddings.float()
    if not torch.isfinite(embeddings).all():
        raise DataError(f"{path}: embeddings contain NaN or infinite values")
    norms = embeddings.norm(dim=1)
    bad = (norms - 1).abs() > 1e-2
    if bad.any():
        row = int(bad.nonzero()[0])
        raise DataError(f"{path}: row {row} has norm {norms[row]:.4f}; index embeddings must be L2-normalised")
    return embeddings
