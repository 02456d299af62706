"""Every aggregation method against the independent float64 implementation, fresh random data."""
import numpy as np
import pytest
import torch

import float64_reference as ref
import proalign
from proalign.aggregate import embedding_length


def _data(rng, n, d, k, scale=1.0):
    x = rng.standard_normal((n, d)) * scale + rng.standard_normal(d) * 0.3
    c = rng.standard_normal((k, d)) * scale
    return x.astype(np.float32), c.astype(np.float32)


@pytest.mark.parametrize("n,d,k", [(1, 8, 1), (7, 16, 3), (300, 64, 16), (1000, 32, 5)])
@pytest.mark.parametrize("method", ["proalign", "panther", "h2t", "protocount", "mean"])
def test_methods_match_float64(rng, method, n, d, k):
    x, c = _data(rng, n, d, k)
    got = proalign.aggregate(x, c, method=method)  # proalign: the default reading
    want = ref.default_reading(x, c) if method == "proalign" else getattr(ref, method)(x, c)
    assert got.dtype == np.float32 and got.shape == want.shape and got.shape[-1] == embedding_length(method, k, d)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_proalign_layout(rng):
    x, c = _data(rng, 50, 12, 4)
    e = proalign.aggregate(x, c, tau=0.1, over="patches")
    assert e.shape == (4 + 4 * 12,)
    np.testing.assert_allclose(e[:4].sum(), 1.0, rtol=1e-6)  # pi is a distribution over prototypes
    h1 = e[4:16]  # h_1 is a convex combination of patches: inside their bounding box
    assert (h1 >= x.min(0) - 1e-6).all() and (h1 <= x.max(0) + 1e-6).all()


def test_several_taus_one_pass(rng):
    x, c = _data(rng, 200, 32, 8)
    taus = [0.02, 0.1, 1.0]
    got = proalign.aggregate(x, c, tau=taus, over="patches")
    assert got.shape == (3, 8 + 8 * 32)
    for row, t in zip(got, taus):
        np.testing.assert_allclose(row, ref.proalign(x, c, t), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("opts", [dict(over="patches"), dict(over="prototypes", prior=0.0),
                                  dict(over="prototypes", prior=2.0, moments=2), dict(over="patches", moments=2)])
def test_reading_options(rng, opts):
    x, c = _data(rng, 120, 16, 5)
    np.testing.assert_allclose(proalign.aggregate(x, c, tau=0.3, **opts), ref.proalign(x, c, 0.3, **opts),
                               rtol=2e-5, atol=2e-6)


def test_unset_options_take_the_default_reading(rng):
    from proalign.defaults import DEFAULT_PROALIGN, ROW_PRIOR, default_prior

    x, c = _data(rng, 80, 16, 5)
    np.testing.assert_allclose(proalign.aggregate(x, c), ref.default_reading(x, c), rtol=2e-5, atol=2e-6)
    # over given, prior and tau not: the default temperatures with their per-row priors
    got = proalign.aggregate(x, c, over="prototypes")
    np.testing.assert_allclose(got, ref.default_reading(x, c), rtol=2e-5, atol=2e-6)
    # temperatures of one's own, prior not given: ROW_PRIOR on every row (over=prototypes only)
    got = proalign.aggregate(x, c, tau=[0.3, 0.1], over="prototypes")
    want = ref.proalign_rows(x, c, [0.3, 0.1], over="prototypes", prior=ROW_PRIOR, moments=DEFAULT_PROALIGN["moments"])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert default_prior("prototypes", [0.3, 0.1]) == ROW_PRIOR
    assert default_prior("prototypes") == DEFAULT_PROALIGN["prior"]
    assert default_prior("patches") == 0.0


def test_joint_space_keys_and_queries(rng):
    x, c = _data(rng, 90, 24, 6)
    w = rng.standard_normal((24, 10)).astype(np.float32)
    t = rng.standard_normal((6, 10)).astype(np.float32)
    got = proalign.aggregate(x, c, tau=0.05, over="patches", keys=x @ w, queries=t)
    np.testing.assert_allclose(got, ref.proalign(x, c, 0.05, keys=x @ w, queries=t), rtol=2e-5, atol=2e-6)


def test_extreme_inverse_temperature_does_not_overflow(rng):
    x, c = _data(rng, 500, 16, 4, scale=50.0)
    got = proalign.aggregate(x, c, tau=1e-4, over="patches")
    assert np.isfinite(got).all()
    # The fused fp32 backends compute cos in float32: its ~1e-7 error becomes ~1e-3 in s = cos/tau
    # at 1/tau = 10,000, so the softmax weights (and h) carry relative errors up to ~1e-3 (3.5e-4
    # seen); the tolerance follows that, the point here being no overflow and the right answer.
    np.testing.assert_allclose(got, ref.proalign(x, c, 1e-4), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_input_dtypes_and_torch_io(rng, dtype):
    x, c = _data(rng, 64, 16, 4)
    xt = torch.from_numpy(x).to(dtype)
    got = proalign.aggregate(xt, torch.from_numpy(c))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    # The reference sees exactly the values the kernel saw (after rounding to `dtype`).
    want = ref.default_reading(xt.double().numpy(), c)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=2e-6)


def test_bad_inputs(rng):
    x, c = _data(rng, 10, 8, 3)
    with pytest.raises(ValueError, match="does not match prototype dim"):
        proalign.aggregate(x, c[:, :4])
    with pytest.raises(ValueError, match="zero patches"):
        proalign.aggregate(x[:0], c)
    with pytest.raises(ValueError, match="tau must be > 0"):
        proalign.aggregate(x, c, tau=0)
    with pytest.raises(ValueError, match="unknown method"):
        proalign.aggregate(x, c, method="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        proalign.aggregate(x, c, backend="nope")


def test_panther_with_released_config_values(rng):
    """PANTHER's released config.json runs eps=0.1, tau=0.001; the same formulas hold."""
    x, c = _data(rng, 300, 32, 8, scale=0.3)
    got = proalign.aggregate(x, c, method="panther", eps=0.1, prior_strength=1e-3)
    np.testing.assert_allclose(got, ref.panther(x, c, eps=0.1, tau=1e-3), rtol=1e-4, atol=1e-5)
