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

