"""The fused PANTHER E/M step (numba, Triton, CUDA C++) against float64, and CPU ragged batches.

GPU kernels write their per-program partials into NaN-poisoned buffers (a slot a kernel forgets
to write poisons the result). Without a GPU, Triton runs in its interpreter on CPU tensors and
the CUDA C++ tests skip.
"""
import os

import numpy as np
import pytest
import torch

import float64_reference as ref
import proalign
from proalign.aggregate import BACKENDS, resolve_backend
from proalign.ops import plans
from proalign.ops.panther_moments import host, moments_function, numba_cpu, torch_op

FUSED = ["numba", "triton", "cuda"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RTOL, ATOL = 1e-4, 2e-5  # as for the fused ProAlign kernels (float32 vs float64)


def _live(backend):
    why_not = BACKENDS[backend].available()
    if why_not:
        pytest.skip(f"{backend}: {why_not}")


def _device(backend):
    return "cpu" if backend == "numba" or INTERPRETED else "cuda"


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Partial buffers of the GPU kernels start as NaN."""
    modules = [torch_op]
    try:
        from proalign.kernels import panther_moments

        modules.append(panther_moments)
    except ImportError:  # no triton: its tests skip
        pass
    for module in modules:
        monkeypatch.setattr(module, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))


def _data(rng, n, d, k, scale=1.0):
    x = (rng.standard_normal((n, d)) + rng.standard_normal(d)) * scale
    return x.astype(np.float32), rng.standard_normal((k, d)).astype(np.float32)


def _panther(backend, x, c, **opts):
    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
    out = proalign.aggregate(xt.to(_device(backend)), torch.from_numpy(c), method="panther", backend=backend, **opts)
    return out.cpu().numpy()


# --- the moments themselves: any GMM (per-component variances), shared or one per slide ---------

def _moments_float64(x, lengths, shift, mu, var, log_pi):
    """n, sum q (x - shift), sum q (x - shift)^2 per slide, q from the Gaussian log-likelihood."""
    out, start = [], 0
    for s, n in enumerate(lengths):
        p = s if len(mu) > 1 else 0
        xs = x[start:start + n].astype(np.float64)
        start += n
        ll = np.stack([log_pi[p, j] - 0.5 * (np.log(2 * np.pi * var[p, j]) + (xs - mu[p, j]) ** 2 / var[p, j]).sum(1)
                       for j in range(mu.shape[1])], axis=1)
        q = np.exp(ll - ll.max(axis=1, keepdims=True))
        q /= q.sum(axis=1, keepdims=True)
        xc = xs - shift
        out.append((q.sum(0), q.T @ xc, q.T @ xc ** 2))
    return [np.stack(v) for v in zip(*out)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("per_slide", [False, True])
@pytest.mark.parametrize("d,k", [(96, 5), (64, 16), (200, 33)])
def test_moments_match_float64(rng, backend, per_slide, d, k):
    _live(backend)
    lengths = [1, 300, 7, 1000, 64]
    x = (rng.standard_normal((sum(lengths), d)) * 1.5 + 0.5).astype(np.float32)
    p = len(lengths) if per_slide else 1
    mu = rng.standard_normal((p, k, d))
    var = rng.uniform(0.5, 4.0, (p, k, d))  # a different variance per component: the x^2 dot matters
    log_pi = np.log(rng.dirichlet(np.ones(k), p))
    shift = (0.3 * rng.standard_normal(d)).astype(np.float32)
    a, b, cst = host.estep_params(*map(torch.from_numpy, (mu, var, log_pi)), torch.from_numpy(shift).double())
    dev = _device(backend)
    got = moments_function(backend)(torch.from_numpy(x).to(dev), torch.tensor(lengths), torch.from_numpy(shift).to(dev),
                                    a.to(dev), b.to(dev), cst.to(dev))
    want = _moments_float64(x, lengths, shift, mu, var, log_pi)
    for g, w, name in zip(got, want, ("n", "s1", "s2")):
        assert g.dtype == torch.float64 and g.shape == w.shape, name
        np.testing.assert_allclose(g.cpu().numpy(), w, rtol=RTOL, atol=ATOL * np.abs(w).max(), err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,k", [(33, 5), (200, 17)])
def test_numba_moments_of_half_inputs_match_float64(rng, dtype, d, k):
    """float16 / bfloat16 features are read by the numba kernel as they are (converted per block
    in registers): the moments of the rounded values against float64, odd d and K, a row of
    float16 subnormals and one near its largest value."""
    _live("numba")
    lengths = [1, 300, 7, 4099]
    x = (rng.standard_normal((sum(lengths), d)) * 1.5 + 0.5).astype(np.float32)
    if dtype == torch.float16:
        x[5] *= 1e-6  # subnormal in float16
        x[6] = np.clip(x[6] * 3e4, -65504, 65504)
    xt = torch.from_numpy(x).to(dtype)
    x64 = xt.double().numpy()
    mu = rng.standard_normal((1, k, d))
    var = rng.uniform(0.5, 4.0, (1, k, d))
    log_pi = np.log(rng.dirichlet(np.ones(k), 1))
    shift = (0.3 * rng.standard_normal(d)).astype(np.float32)
    a, b, cst = host.estep_params(*map(torch.from_numpy, (mu, var, log_pi)), torch.from_numpy(shift).double())
    got = moments_function("numba")(xt, torch.tensor(lengths), torch.from_numpy(shift), a, b, cst)
    want = _moments_float64(x64, lengths, shift, mu, var, log_pi)
    for g, w, name in zip(got, want, ("n", "s1", "s2")):
        np.testing.assert_allclose(g.numpy(), w, rtol=RTOL, atol=ATOL * np.abs(w).max(), err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_panther_moments_op_half_equals_float32_upcast(rng, dtype):
    """The op's CPU kernel on half-precision x gives bit for bit the partials it gives on x upcast
    to float32: the conversion in registers is exact."""
    _live("numba")
    from proalign.ops.plans import gpu_programs, padded_k

    lengths, d, k = [300, 1, 517], 40, 5
    x = torch.from_numpy(_data(rng, sum(lengths), d, k)[0]).to(dtype)
    k_pad = padded_k(k, 8)
    a, b, cst = torch.zeros(1, k_pad, d), torch.zeros(1, k_pad, d), torch.zeros(1, k_pad)
    a[:, :k] = -0.5 / torch.rand(1, k, d).add(0.5)
    b[:, :k] = torch.randn(1, k, d)
    cst[:, :k] = torch.randn(1, k)
    plan = gpu_programs(torch.tensor(lengths), torch_op.rows_per_program())
    args = (torch.zeros(d), a, b, cst, *plan, k, torch_op.rows_per_program())
    got = torch.ops.proalign.panther_moments(x, *args)
    want = torch.ops.proalign.panther_moments(x.float(), *args)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# --- PANTHER end to end ------------------------------------------------------------------------

GRID = [(n, d, k) for n in (1, 7, 1000) for d in (64, 512, 768, 1024) for k in (1, 16, 32)]
# The interpreter runs every program in numpy: all d and K, fewer combinations.
GPU_GRID = [(n, d, k) for n in (1, 7, 1000) for d, k in ((64, 1), (512, 16), (768, 32), (1024, 16))]
CASES = [("numba", *g) for g in GRID]
CASES += [(b, *g) for b in ("triton", "cuda") for g in (GPU_GRID if INTERPRETED else GRID)]


@pytest.mark.parametrize("backend,n,d,k", CASES)
def test_panther_matches_float64(rng, backend, n, d, k):
    _live(backend)
    x, c = _data(rng, n, d, k)
    got = _panther(backend, x, c)
    assert got.shape == (k + 2 * k * d,)
    np.testing.assert_allclose(got, ref.panther(x, c), rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def large_slide():
    """One slide of 100k+ patches and its float64 PANTHER embedding, shared by the backends."""
    seed = int(os.environ.get("PROALIGN_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"random seed for large_slide: {seed} (replay with PROALIGN_TEST_SEED={seed})")
    x, c = _data(np.random.default_rng(seed), 100_003, 128, 16)
    return x, c, ref.panther(x, c, eps=20.0)  # eps=20: soft responsibilities over many components


def _multi_program_n() -> int:
    """Rows spanning 3 full programs of the Triton kernel and a 4th with an odd tail (a full tile, a
    3-row tile and empty tiles): every path of the multi-program combine."""
    from proalign.kernels.panther_moments import BLOCK_N, ROWS_PER_PROGRAM

    return 3 * ROWS_PER_PROGRAM + BLOCK_N + 3


@pytest.mark.parametrize("backend", FUSED)
def test_panther_large_slide(large_slide, backend):
    """100,003 rows against float64; Triton in its interpreter (no GPU) takes a slide of a few
    programs instead (every program runs in numpy: 100k rows took 28 s for no more of the kernel's
    paths)."""
    _live(backend)
    x, c, want = large_slide
    if backend == "triton" and INTERPRETED:
        x = x[:_multi_program_n()]
        want = ref.panther(x, c, eps=20.0)
    np.testing.assert_allclose(_panther(backend, x, c, eps=20.0), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_panther_input_dtypes(rng, backend, dtype):
    _live(backend)
    x, c = _data(rng, 777, 64, 16)
    xt = torch.from_numpy(x).to(dtype)
    got = _panther(backend, xt, c, eps=4.0)
    np.testing.assert_allclose(got, ref.panther(xt.double().numpy(), c, eps=4.0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scale,eps", [(1e3, 0.1), (30.0, 1e-4), (1e-3, 1e-6)])
def test_panther_extreme_log_likelihoods(rng, backend, scale, eps):
    """Log-likelihoods of -1e9 (or tiny differences): max-subtracted softmax, no overflow or 0/0."""
    _live(backend)
    x, c = _data(rng, 999, 64, 16, scale)
    c *= scale
    got = _panther(backend, x, c, eps=eps)
    want = ref.panther(x, c, eps=eps)
    assert np.isfinite(got).all()
    k = c.shape[0]
    np.testing.assert_allclose(got[:k], want[:k], rtol=1e-3, atol=1e-5)  # pi
    for part in (slice(k, k + k * 64), slice(k + k * 64, None)):  # mu, var
        np.testing.assert_allclose(got[part], want[part], rtol=1e-3, atol=1e-4 * np.abs(want[part]).max())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("opts", [{"eps": 0.1, "prior_strength": 1e-3}, {"em_steps": 0}, {"em_steps": 2, "eps": 3.0},
                                  {"em_steps": 3, "eps": 10.0, "prior_strength": 0.5}])
def test_panther_options_match_torch_reference(rng, backend, opts):
    _live(backend)
    x, c = _data(rng, 1500, 96, 12)
    want = proalign.aggregate(x, c, method="panther", backend="torch", **opts)  # float64 on the CPU
    got = _panther(backend, x, c, **opts)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * max(1.0, np.abs(want).max()))


# --- ragged batches in one call ----------------------------------------------------------------

LENGTHS = (1, 250, 3, 2600, 64, 5000, 2)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("em_steps", [1, 2])
def test_panther_ragged_batch(rng, backend, em_steps):
    _live(backend)
    xs = [_data(rng, n, 48, 5)[0] for n in LENGTHS]
    c = _data(rng, 1, 48, 5)[1]
    dev = _device(backend)
    got = proalign.aggregate_batch([torch.from_numpy(x).to(dev) for x in xs], c, method="panther", backend=backend,
                                   eps=5.0, em_steps=em_steps)
    assert len(got) == len(xs)
    for x, e in zip(xs, got):
        want = proalign.aggregate(x, c, method="panther", backend="torch", eps=5.0, em_steps=em_steps)
        np.testing.assert_allclose(e.cpu().numpy(), want, rtol=RTOL, atol=ATOL * max(1.0, np.abs(want).max()))


@pytest.fixture
def numba_calls(monkeypatch):
    """Counts the calls into the numba kernels."""
    if BACKENDS["numba"].available():
        pytest.skip(BACKENDS["numba"].available())
    from proalign.ops.proalign_attention import numba_cpu as attention_numba

    calls = {"_partials": 0, "_moments": 0}
    for module, name in ((attention_numba, "_partials"), (numba_cpu, "_moments")):
        kernel = getattr(module, name)

        def counted(*a, _kernel=kernel, _name=name):
            calls[_name] += 1
            return _kernel(*a)
        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("em_steps", [1, 3])
def test_numba_ragged_batch_is_one_call_per_pass(rng, numba_calls, em_steps):
    xs = [_data(rng, n, 32, 6)[0] for n in LENGTHS]
    c = _data(rng, 1, 32, 6)[1]
    taus = [0.05, 0.5]
    got = proalign.aggregate_batch(xs, c, tau=taus, backend="numba", over="patches")
    assert numba_calls["_partials"] == 1
    for x, e in zip(xs, got):
        assert e.shape == (2, 6 + 6 * 32)
        for row, t in zip(e, taus):
            np.testing.assert_allclose(row, ref.proalign(x, c, t), rtol=RTOL, atol=ATOL)
    got = proalign.aggregate_batch(xs, c, method="panther", backend="numba", eps=4.0, em_steps=em_steps)
    assert numba_calls["_moments"] == em_steps
    for x, e in zip(xs, got):
        want = (ref.panther(x, c, eps=4.0) if em_steps == 1 else
                proalign.aggregate(x, c, method="panther", backend="torch", eps=4.0, em_steps=em_steps))
        assert e.shape == want.shape
        np.testing.assert_allclose(e, want, rtol=RTOL, atol=ATOL * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("lengths", [[1], [7, 1, 3], [5000, 1, 20000, 1024, 1025], [100_000] * 3])
def test_numba_plan_covers_each_slide_once(lengths):
    if BACKENDS["numba"].available():
        pytest.skip(BACKENDS["numba"].available())
    start, end, slide, first = plans.cpu_items(np.array(lengths))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    assert (first == np.searchsorted(slide, np.arange(len(lengths)))).all()  # items grouped by slide
    for s in range(len(lengths)):
        mine = slice(first[s], first[s + 1] if s + 1 < len(lengths) else None)
        st, en = start[mine], end[mine]
        assert st[0] == bounds[s] and en[-1] == bounds[s + 1] and (st[1:] == en[:-1]).all()
    assert (end > start).all()


# --- dispatch ----------------------------------------------------------------------------------

def test_dispatch_picks_fused_panther_and_respects_override(rng):
    cpu = torch.zeros(3, 4)
    best = resolve_backend("panther", None, cpu, {"eps": 0.1}).name
    assert best == ("numba" if BACKENDS["numba"].available() is None else "torch")
    assert resolve_backend("panther", "torch", cpu, {}).name == "torch"
    if torch.cuda.is_available():
        assert resolve_backend("panther", None, cpu.cuda(), {}).name in ("triton", "cuda")
    x, c = _data(rng, 50, 8, 3)
    np.testing.assert_allclose(proalign.aggregate(x, c, method="panther"),
                               proalign.aggregate(x, c, method="panther", backend="torch"), rtol=RTOL, atol=ATOL)
    if best == "numba":
        with pytest.raises(ValueError, match="em_steps"):
            proalign.aggregate(x, c, method="panther", em_steps=-1)


def test_numba_plan_independent_of_threads_and_batch():
    """A slide's work items depend on its own N only: bit-identical records across thread counts
    (--workers 1 vs 2) and batch neighbours."""
    a = plans.cpu_items(np.array([10_000]))
    b = plans.cpu_items(np.array([5, 10_000, 70_000]))
    sl = slice(b[3][1], b[3][2])
    assert np.array_equal(a[0], b[0][sl] - 5) and np.array_equal(a[1], b[1][sl] - 5)


# --- the torch op (torch.library): its CPU kernel, its fake, opcheck ---------------------------

def _op_devices():
    from proalign.ops.runtime import cuda_unavailable

    return ["cpu"] + ([] if cuda_unavailable() else ["cuda"])


@pytest.mark.parametrize("device", _op_devices())
@pytest.mark.parametrize("per_slide", [False, True])
def test_panther_moments_op(rng, device, per_slide):
    """torch.ops.proalign.panther_moments passes torch.library.opcheck on every device it has a
    kernel for (numba on CPU, CUDA C++ on a GPU), and its partials merged by host.gpu_moments match
    the float64 moments."""
    lengths, d, k = [300, 1, 2500], 48, 5
    x, _ = _data(rng, sum(lengths), d, k)
    n_par = len(lengths) if per_slide else 1
    mu = rng.standard_normal((n_par, k, d))
    var = rng.uniform(0.5, 2.0, (n_par, k, d))
    log_pi = np.log(rng.dirichlet(np.ones(k), n_par))
    shift = x.mean(0)
    a, b, cst = host.estep_params(*map(torch.from_numpy, (mu, var, log_pi)), torch.from_numpy(shift).double())
    xt, sh = torch.from_numpy(x).to(device), torch.from_numpy(shift).to(device)
    want = _moments_float64(x, lengths, shift, mu, var, log_pi)
    moments = host.gpu_moments(torch_op.launch, torch_op.rows_per_program(), 8)
    got = moments(xt, torch.tensor(lengths), sh, a.to(device), b.to(device), cst.to(device))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.cpu().numpy(), w, rtol=RTOL, atol=ATOL * max(1.0, np.abs(w).max()))

    from proalign.ops.plans import gpu_programs, padded_k

    k_pad = padded_k(k, 8)
    pad = [torch.zeros(n_par, k_pad, d), torch.zeros(n_par, k_pad, d), torch.zeros(n_par, k_pad)]
    pad[0][:, :k], pad[1][:, :k], pad[2][:, :k] = a, b, cst
    plan = gpu_programs(torch.tensor(lengths), torch_op.rows_per_program())
    args = (xt, sh, *(p.to(device) for p in pad), *(p.to(device) for p in plan), k, torch_op.rows_per_program())
    torch.library.opcheck(torch.ops.proalign.panther_moments.default, args)
