"""Every fused backend against the float64 reference over a grid of shapes, dtypes and tau."""
import numpy as np
import pytest
import torch

import float64_reference as ref
import proalign
from proalign.aggregate import BACKENDS

CPU_FUSED = [b for b in ("numba",) if BACKENDS[b].available() is None]
GRID = [(n, d, k) for n in (1, 7, 1000) for d in (64, 512, 768, 1024) for k in (1, 16, 32)]
GRID += [(100_003, 512, 16), (100_003, 1024, 32)]


def _data(rng, n, d, k):
    x = rng.standard_normal((n, d)) + rng.standard_normal(d)
    return x.astype(np.float32), rng.standard_normal((k, d)).astype(np.float32)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("n,d,k", GRID)
def test_fused_cpu_matches_float64(rng, backend, n, d, k):
    x, c = _data(rng, n, d, k)
    taus = [0.02, 0.1, 1.0]
    got = proalign.aggregate(x, c, tau=taus, backend=backend)
    for row, t in zip(got, taus):
        np.testing.assert_allclose(row, ref.proalign(x, c, t), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fused_cpu_dtypes(rng, backend, dtype):
    x, c = _data(rng, 777, 64, 16)
    xt = torch.from_numpy(x).to(dtype)
    got = proalign.aggregate(xt, torch.from_numpy(c), backend=backend)
    np.testing.assert_allclose(got.numpy(), ref.proalign(xt.double().numpy(), c, 0.1), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("tau", [1e-2, 1e-3, 1e-5])
def test_fused_cpu_extreme_inverse_temperature(rng, backend, tau):
    x, c = _data(rng, 5000, 64, 16)
    x *= 100
    got = proalign.aggregate(x, c, tau=tau, backend=backend)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref.proalign(x, c, tau), rtol=1e-3, atol=1e-3 * np.abs(x).max())


def test_dispatch_prefers_fused_and_falls_back():
    from proalign.aggregate import resolve_backend

    x = torch.zeros(3, 4)
    best = resolve_backend("proalign", None, x, {}).name
    assert best == (CPU_FUSED[0] if CPU_FUSED else "torch")
    assert resolve_backend("proalign", None, x, {"over": "prototypes"}).name == "torch"
    assert resolve_backend("panther", None, x, {}).name == "torch"
    if CPU_FUSED:
        with pytest.raises(ValueError, match="does not support"):
            resolve_backend("proalign", CPU_FUSED[0], x, {"over": "prototypes"})
