"""`proalign-engine doctor`: what is installed, which backends and devices are live, and why not."""
from __future__ import annotations

import importlib
import platform


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # an optional package may fail to import in many ways; say how
        return f"not available ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def report() -> dict:
    from .aggregate import BACKENDS

    import torch

    packages = ["numpy", "torch", "h5py", "lmdb", "click", "safetensors", "pyarrow", "numba", "triton", "cupy",
                "nvidia.dali"]
    devices = {"cuda": torch.cuda.is_available()}
    devices["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    backends = {}
    for name, b in BACKENDS.items():
        why_not = b.available()
        backends[name] = {"live": why_not is None, "methods": list(b.methods), **({"why_not": why_not} if why_not else {})}
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in packages},
        "native_module": _version("proalign._C"),
        "devices": devices,
        "backends": backends,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(report(), indent=2))
