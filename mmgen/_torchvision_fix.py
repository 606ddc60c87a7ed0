"""Make a CUDA build of torchvision importable next to a CPU build of torch, in every process.

pip's torchvision wheels are CUDA builds. Next to the CPU torch wheel their C++ extension cannot
load, so the two ops that ``torchvision/_meta_registrations.py`` decorates at import time
(``torchvision::nms``, ``torchvision::qnms``) are never defined and ``import torchvision`` raises
``RuntimeError: operator torchvision::nms does not exist``. That breaks peft, lightning,
torchmetrics, transformers and diffusers, which all import torchvision when it is installed.

mmgen itself needs no torchvision (its image path is PIL); torchvision is there for what other
packages use it for (LPIPS's AlexNet in evaluation). The fix: just before torchvision is first
imported, try to load its extension as torchvision would; only where that fails define the two op
schemas (no kernels). torchvision's models and transforms then work; its compiled ops (nms, jpeg
decoding) do not. Where the extension loads, this changes nothing.

It must run before any package imports torchvision, in any process, whatever is imported first:
``make setup`` therefore writes ``mmgen-torchvision-fix.pth`` into the venv (:func:`write_pth`). Python runs a ``.pth`` line at start-up; ours only puts a
finder on ``sys.meta_path`` (no torch import, so start-up stays fast), which applies the fix the
first time anything imports torchvision. ``import mmgen`` installs the same finder.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "mmgen-torchvision-fix.pth"
# A .pth line that starts with "import" is executed at start-up; any failure (mmgen uninstalled)
# must not break the interpreter, hence the exec'd try block.
PTH_LINE = 'import sys; exec("try:\\n import mmgen._torchvision_fix as f; f.install()\\nexcept Exception: pass")\n'


def _extension_loads(package_dir: Path) -> bool:
    import torch

    extensions = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    if not extensions:
        return False
    try:
        torch.ops.load_library(str(extensions[0]))
    except (OSError, RuntimeError):
        return False
    return True


def apply() -> None:
    """Define torchvision's two op schemas unless its extension loads (or they exist already)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

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


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`apply` when torchvision is first imported, then leaves the import to Python."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        uninstall()  # first: apply() looks torchvision up, which would come back here
        apply()
        return None  # the regular finders import it


def install() -> None:
    """Put the finder in front of ``sys.meta_path`` (once); apply now if torchvision is loaded."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BeforeTorchvision)]


def write_pth(site_packages: str | Path | None = None) -> Path:
    """Write the start-up hook into an environment's site-packages (default: this one's)."""
    folder = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = folder / PTH_NAME
    path.write_text(PTH_LINE)
    return path
