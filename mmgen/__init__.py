"""mmgen: frozen language models that read and write images (FROMAGe, GILL, MiniGPT-5)."""

from mmgen import _torchvision_fix

_torchvision_fix.apply()  # before anything imports torchvision (transformers, peft, timm, lightning)

__version__ = "0.1.0"
