"""API methods: every module in this package is imported, and its ``@api_method``
definitions register themselves. Modules whose name starts with ``_`` are helpers.
To add methods, drop a new module here (no list to edit)."""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
