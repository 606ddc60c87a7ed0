"""Make a CUDA build of torchvision importable next to a CPU build of torch.

pip's torchvision wheels are CUDA builds. Next to the CPU torch wheel their C++ extension cannot
load, so the two ops that `torchvision/_meta_registrations.py` decorates at import time
(`torchvision::nms`, `torchvision::qnms`) are never defined and `import torchvision` raises
``RuntimeError: operator torchvision::nms does not exist``. That breaks transformers, peft, timm,
lightning and torchmetrics, which all import torchvision when it is installed.

We try to load torchvision's extension the way torchvision itself would; only where that fails do
we define the two op schemas (no kernels) before torchvision is first imported. torchvision's
transforms then work; its compiled ops (nms, jpeg decoding) do not, and mmgen uses neither.
Where the extension loads, this changes nothing.
"""

import importlib.util
from pathlib import Path

import torch


def _extension_loads(package_dir: Path) -> bool:
    extensions = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    if not extensions:
        return False
    try:
        torch.ops.load_library(str(extensions[0]))
    except (OSError, RuntimeError):
        return False
    return True


def apply() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    try:
        torch.ops.torchvision.nms  # defined already (extension loaded, or a second apply())
        return
    except (AttributeError, RuntimeError):
        pass
    if _extension_loads(Path(spec.origin).parent):
        return
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    apply.library = library  # keep it alive: dropping the Library object unregisters the schemas
