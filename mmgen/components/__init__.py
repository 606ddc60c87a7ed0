"""Swappable model parts, one per module; see ``mmgen.components.base`` for the kinds.

Importing this package imports every module in it, and each registers its own components, so a
new component is one new file here (or anywhere in research code that is imported) and nothing
else to edit.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
