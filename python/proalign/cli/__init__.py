"""The `proalign-engine` command line: one module per command group, each command a thin call
into the library (the Python API and the demo call the same functions).

app (the group, exit codes) · options (what several commands share) · embed · slides (manifest,
patch) · prototypes (describe, prototypes build/train) · store · eval (eval, heatmap, plot,
report) · doctor.
"""
from . import doctor, embed, prototypes, slides, store  # noqa: F401  (each registers its commands on main)
from .app import RUNTIME_ERROR_EXIT, main
from .eval import register as _register_eval

_register_eval(main)

__all__ = ["RUNTIME_ERROR_EXIT", "main"]
