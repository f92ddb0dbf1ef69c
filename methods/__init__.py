"""Attribution methods, registered by name. Every module in this package is imported here, so a new
method is one file: ``methods/my_method.py`` with a ``@register_method("my_method")`` class."""

import importlib
import pkgutil

from methods.base import Method, RemovalContext

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "RemovalContext"]
