import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (must be set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def optional_import(name: str, why: str = ""):
    """Import an optional package for a test, or skip the test saying why it does not import.

    Any exception counts, not only ImportError: beside the local CPU torch wheel, torchvision (which
    timm, open_clip and conch import) raises RuntimeError ('operator torchvision::nms does not
    exist'). Packages named in $PROALIGN_REQUIRE_OFFICIAL (comma-separated; `make parity` sets it
    for the official packages it installs) fail the test instead: there they must import."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0]
        msg = f"{name} does not import here ({type(e).__name__}: {first})" + (f"; {why}" if why else "")
        required = {n.strip() for n in os.environ.get("PROALIGN_REQUIRE_OFFICIAL", "").split(",") if n.strip()}
        if name in required or name.split(".")[0] in required:
            pytest.fail(f"{msg}; PROALIGN_REQUIRE_OFFICIAL says it must", pytrace=False)
        pytest.skip(msg)


@pytest.fixture
def rng(request):
    """Fresh random inputs every run; the seed is printed on failure so it can be replayed."""
    seed = int(os.environ.get("PROALIGN_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"random seed for {request.node.name}: {seed} (replay with PROALIGN_TEST_SEED={seed})")
    return np.random.default_rng(seed)


def run_cli(*args, check=None, timeout=300, env=None):
    """Run the installed `proalign-engine` console script in a subprocess."""
    exe = Path(sys.executable).parent / "proalign-engine"
    p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def conch(tmp_path_factory):
    """A small random-weight CONCH v1 folder (it records its architecture), 5 prototypes for it, the
    --encoder-arg flags that restate that architecture, and the overrides: (folder, args, prototypes, over)."""
    from proalign.prototypes.io import save_prototypes
    from proalign.testing.random_weights import write_random_conch

    root = tmp_path_factory.mktemp("conch")
    over = write_random_conch(root / "conch")
    c = np.random.default_rng(3).standard_normal((5, over["embed_dim"])).astype(np.float32)
    save_prototypes(root / "p.safetensors", c, {})
    args = [a for k, v in over.items() for a in ("--encoder-arg", f"{k}={v}")]
    return root / "conch", args, root / "p.safetensors", over
