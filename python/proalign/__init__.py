"""proalign-engine: ProAlign slide embeddings for whole-slide-image archives.

The facade is lazy (PEP 562): `import proalign` loads only the version; each name below imports its
defining module on first use and is that module's own object (real signature and docstring). Nothing
inside the package imports this module: they import the defining modules (and `_version`).
"""
from __future__ import annotations

import importlib
import sys
import types

from ._version import __version__

# name -> the module that defines it
_LAZY = {
    "aggregate": "proalign.aggregate",
    "aggregate_batch": "proalign.aggregate",
    "create_encoder": "proalign.encoders",
    "embed_archive": "proalign.pipeline.slide_worker",
    "embed_slide": "proalign.pipeline.embed_slides",
    "load_prototypes": "proalign.prototypes.io",
    "open_slide": "proalign.slides.slide",
    "open_store": "proalign.store",  # lmdb loads on first use: GPU hosts may lack it
    "read_patches": "proalign.slides.patches",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Facade(types.ModuleType):
    """`proalign.aggregate` is the function, also after the `proalign.aggregate` subpackage was
    imported by some other route (the import system then binds the subpackage to the attribute)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Facade
