"""Methods: LightningModules that assemble components and define an objective.

Importing this package imports every module in it, so each method registers itself.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
