"""Streaming aggregation (features arriving in batches) equals aggregate() on the whole slide."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from proalign import aggregate
from proalign.aggregate.streaming import StreamingAggregator


def _batches(x, rng):
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=min(len(x) - 1, 6), replace=False))
    return np.split(x, cuts)


@pytest.mark.parametrize("method, opts", [
    ("proalign", {"tau": 0.1}), ("proalign", {"tau": [0.02, 0.5]}), ("proalign", {"tau": 0.1, "over": "prototypes"}),
    ("proalign", {"tau": 0.005}),  # large 1/tau: the running max must keep exp() finite
    ("proalign", {"tau": [0.1, 0.03], "over": "patches", "moments": 2}),
    ("proalign", {"tau": [0.2, 0.05], "over": "prototypes", "moments": 2, "prior": 1.0}),
    ("proalign", {}),  # the default reading
    ("panther", {}), ("panther", {"eps": 0.1, "prior_strength": 0.001}), ("panther", {"em_steps": 2}),
    ("h2t", {}), ("protocount", {}), ("mean", {}),
])
def test_streaming_equals_whole_slide(method, opts, rng):
    n, d, k = int(rng.integers(50, 700)), 64, 8
    x = rng.normal(size=(n, d)).astype(np.float32) + rng.normal(size=(1, d)).astype(np.float32)
    c = rng.normal(size=(k, d)).astype(np.float32)
    tau = opts.pop("tau", None)
    ref = aggregate(x, c, method, tau=tau, backend="torch", **opts)
    agg = StreamingAggregator(c, method, tau=tau, **opts)
    for b in _batches(x, rng):
        agg.update(torch.from_numpy(b))
    out = agg.result().numpy()
    assert out.shape == np.asarray(ref).shape
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    assert np.isfinite(out).all()


def test_joint_space_keys(rng):
    n, d, dj, k = 300, 32, 16, 5
    x = rng.normal(size=(n, d)).astype(np.float32)
    z = rng.normal(size=(n, dj)).astype(np.float32)
    c, t = rng.normal(size=(k, d)).astype(np.float32), rng.normal(size=(k, dj)).astype(np.float32)
    ref = aggregate(x, c, "proalign", tau=0.1, backend="torch", keys=z, queries=t)
    agg = StreamingAggregator(c, "proalign", tau=0.1, queries=t)
    for s in range(0, n, 64):
        agg.update(torch.from_numpy(x[s:s + 64]), keys=torch.from_numpy(z[s:s + 64]))
    np.testing.assert_allclose(agg.result().numpy(), ref, rtol=2e-5, atol=2e-5)


def test_errors():
    agg = StreamingAggregator(np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="no patches"):
        agg.result()
    with pytest.raises(ValueError, match=r"\(b, 4\)"):
        agg.update(torch.ones(3, 5))
    with pytest.raises(ValueError, match="unknown method"):
        StreamingAggregator(np.ones((2, 4)), "nope")
