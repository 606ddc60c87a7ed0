"""mmgen: frozen language models that read and write images (FROMAGe, GILL, MiniGPT-5)."""

from mmgen import _torchvision_fix

_torchvision_fix.install()  # a no-op where the venv's start-up hook installed it already

__version__ = "0.1.0"
