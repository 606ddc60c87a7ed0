"""Interleaved prompts from a JSONL file, for ``mmgen predict``.

One JSON object per line::

    {"id": "red-1", "conversation": ["Show me", {"image": "imgs/red.png"}, "in blue"], "mode": "retrieve"}

- ``conversation`` (required): a non-empty list in reading order; a string is text, ``{"image":
  path}`` an image. Relative image paths are relative to ``image_root`` (default: the JSONL
  file's folder).
- ``id`` (optional, unique): names the conversation in the outputs; default ``line<N>``.
- ``mode`` (optional): what an answer's images may be: "retrieve", "generate", "both" or "auto"
  (the model decides, e.g. GILL's decision module). Absent: the run's default.

Blank lines are skipped. A line that is not valid JSON, has an unknown key, a wrong type or an
image file that does not exist is refused with a DataError naming the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from mmgen.errors import DataError
from mmgen.inference.types import Conversation, ImageRef

MODES = ("retrieve", "generate", "both", "auto")
KEYS = {"id", "conversation", "mode"}


@dataclass
class Prompt:
    id: str
    conversation: Conversation  # str and ImageRef parts, image paths resolved
    mode: str | None  # None: the run's default
    line: int  # 1-based line of the JSONL file, for messages


def read_prompts(path: str | Path, image_root: str | Path | None = None) -> list[Prompt]:
    """Parse and check a prompts JSONL file (see the module docstring for the format)."""
    from mmgen.files import jsonl_records

    path = Path(path)
    if not path.exists():
        raise DataError(f"prompts file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, where, record in jsonl_records(path, "prompts file", allow_empty=True):
        unknown = sorted(set(record) - KEYS)
        if unknown:
            raise DataError(f"{where}: unknown key(s) {unknown}; a prompt has {sorted(KEYS)}")
        prompt_id = record.get("id", f"line{number}")
        if not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool) or str(prompt_id) == "":
            raise DataError(f"{where}: 'id' must be a non-empty string, got {prompt_id!r}")
        prompt_id = str(prompt_id)
        if prompt_id in seen:
            raise DataError(f"{where}: id {prompt_id!r} already used on line {seen[prompt_id]}")
        seen[prompt_id] = number
        mode = record.get("mode")
        if mode is not None and mode not in MODES:
            raise DataError(f"{where}: 'mode' must be one of {list(MODES)}, got {mode!r}")
        prompts.append(Prompt(prompt_id, _conversation(record.get("conversation"), root, where), mode, number))
    if not prompts:
        raise DataError(f"{path}: no prompts (empty file)")
    return prompts


def _conversation(parts, root: Path, where: str) -> Conversation:
    if not isinstance(parts, list) or not parts:
        raise DataError(f"{where}: 'conversation' must be a non-empty list of strings and {{\"image\": path}} "
                        f"objects, got {parts!r}")
    conversation: Conversation = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            conversation.append(part)
        elif isinstance(part, dict) and set(part) == {"image"} and isinstance(part["image"], str) and part["image"]:
            image = Path(part["image"])
            resolved = image if image.is_absolute() else root / image
            if not resolved.is_file():
                raise DataError(f"{where}: conversation[{i}]: image not found: {resolved}")
            conversation.append(ImageRef(str(resolved)))
        else:
            raise DataError(f"{where}: conversation[{i}] must be a string or {{\"image\": path}}, got {part!r}")
    return conversation


class PromptDataset(Dataset):
    """The prompts of a JSONL file; items are :class:`Prompt`."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None):
        self.path = Path(path)
        self.prompts = read_prompts(self.path, image_root)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]


def collate_prompts(prompts: list[Prompt]) -> dict:
    """Plain lists: ``{"ids", "conversations", "modes"}`` (images stay paths; the model's input
    format reads them)."""
    return {
        "ids": [p.id for p in prompts],
        "conversations": [list(p.conversation) for p in prompts],
        "modes": [p.mode for p in prompts],
    }


class PromptDataModule(pl.LightningDataModule):
    """Prediction data: interleaved prompts from a JSONL file, and a retrieval index for the
    methods that retrieve (FROMAGe, GILL).

    Batches are ``{"ids": [str], "conversations": [Conversation], "modes": [str | None],
    "index": RetrievalIndex | None, "options": dict}``. The index is opened (or built) in the main
    process at the first batch, once the trained weights are in the model, and checked against
    that model; methods without a retrieval head get None (a warning says an index was
    configured for nothing).

    Args:
        prompts: JSONL file of prompts (``mmgen.data.prompts`` has the format).
        index: Folder of a retrieval index made by ``mmgen index build`` with this model.
        index_images: Instead of ``index``: a folder of images or a caption TSV to embed with the
            model when prediction starts (in memory; fine for thousands of images).
        index_image_dir: Folder the TSV's image paths are relative to (default: the TSV's folder).
        index_backend: "exact" (torch) or "faiss" (``pip install 'mmgen[faiss]'``).
        batch_size: Conversations per batch.
        image_root: Folder relative image paths in the prompts are relative to (default: the
            JSONL file's folder).
        options: Decoding and generation options passed to every batch (e.g. max_new_tokens,
            seed, guidance scale; ``docs/inference.md`` lists them).
        unsupported_mode: What to do with a prompt whose ``mode`` the model cannot run (FROMAGe
            cannot generate, MiniGPT-5 cannot retrieve), so that one prompts file serves every
            method: "auto" answers it in auto mode (a warning names the prompts once); "error"
            refuses it.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        prompts: str,
        index: str | None = None,
        index_images: str | None = None,
        index_image_dir: str | None = None,
        index_backend: str = "exact",
        batch_size: int = 4,
        image_root: str | None = None,
        options: dict | None = None,
        unsupported_mode: str = "auto",
        num_workers: int = 0,
    ):
        super().__init__()
        if index is not None and index_images is not None:
            raise DataError("PromptDataModule: give index (a saved index folder) or index_images (images to "
                            "embed), not both")
        self.prompts = prompts
        self.index = index
        self.index_images = index_images
        self.index_image_dir = index_image_dir
        self.index_backend = index_backend
        self.batch_size = batch_size
        self.image_root = image_root
        if unsupported_mode not in ("auto", "error"):
            raise DataError(f"PromptDataModule: unsupported_mode must be 'auto' or 'error', not {unsupported_mode!r}")
        self.options = dict(options or {})
        self.unsupported_mode = unsupported_mode
        self.num_workers = num_workers
        self._mode_checked: dict[str, bool] = {}
        self.dataset: PromptDataset | None = None
        self._index = None
        self._index_ready = False

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = PromptDataset(self.prompts, self.image_root)

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_prompts)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # Nothing to move: strings and image paths (the model reads the images onto its device).
        # Lightning's default would also refuse the frozen ImageRef dataclasses.
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # In the main process, after the checkpoint is loaded: the index is made by (or checked
        # against) the trained model; workers never carry it.
        if isinstance(batch, dict) and "conversations" in batch:
            batch["index"] = self.retrieval_index()
            batch["options"] = dict(self.options)
            if self.trainer is not None:
                batch["modes"] = self._runnable_modes(self.trainer.lightning_module, batch)
        return batch

    def _runnable_modes(self, model, batch) -> list[str | None]:
        """The batch's modes, those the model cannot run replaced by "auto" (unsupported_mode)."""
        check = getattr(model, "check_mode", None)
        modes = list(batch.get("modes") or [None] * len(batch["ids"]))
        if check is None or self.unsupported_mode == "error":
            return modes  # the model refuses what it cannot run
        for i, mode in enumerate(modes):
            if mode is None or mode == "auto":
                continue
            if mode not in self._mode_checked:
                try:
                    check(mode, batch["index"])
                    self._mode_checked[mode] = True
                except ValueError as error:  # ConfigError: the method cannot run this mode
                    self._mode_checked[mode] = False
                    rank_zero_warn(f"{self.prompts}: prompts with mode {mode!r} are answered in mode 'auto': {error}")
            if not self._mode_checked[mode]:
                modes[i] = "auto"
        return modes

    def retrieval_index(self, model=None):
        """The retrieval index for ``model`` (default: the trainer's), opened or built once."""
        if self._index_ready:
            return self._index
        if self.index is None and self.index_images is None:
            self._index_ready = True
            return None
        if model is None:
            if self.trainer is None:
                raise DataError("PromptDataModule.retrieval_index needs a model outside a Trainer")
            model = self.trainer.lightning_module
        from mmgen.inference.index import RetrievalIndex

        if getattr(model, "retrieval_head", None) is None:
            rank_zero_warn(f"{type(model).__name__} has no retrieval head: the configured retrieval index "
                           f"({self.index or self.index_images}) is not used")
            self._index_ready = True
            return None
        if self.index is not None:
            index = RetrievalIndex.load(self.index, backend=self.index_backend)
            index.check_model(model)
        else:
            index = RetrievalIndex.build(model, self.index_images, image_dir=self.index_image_dir,
                                         backend=self.index_backend)
        if index.backend == "exact":
            index.to(model.device)
        self._index, self._index_ready = index, True
        return index
