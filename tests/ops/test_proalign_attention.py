"""Every fused backend against the float64 reference over a grid of shapes, dtypes and tau."""
import os

import numpy as np
import pytest
import torch

import float64_reference as ref
import proalign
from proalign.aggregate import BACKENDS

CPU_FUSED = [b for b in ("numba",) if BACKENDS[b].available() is None]
GRID = [(n, d, k) for n in (1, 7, 1000) for d in (64, 512, 768, 1024) for k in (1, 16, 32)]
# Slides cut into several work items (plans.ITEM_ROWS = 4096 rows each at most, a ragged last
# one): the per-item float32 accumulation is as long as in a 100k-patch slide, the combine merges
# 5 and 4 items (100,003-row cases took 4-5 min here, mostly in the float64 reference).
GRID += [(20_003, 512, 16), (12_289, 1024, 32)]


def _data(rng, n, d, k):
    x = rng.standard_normal((n, d)) + rng.standard_normal(d)
    return x.astype(np.float32), rng.standard_normal((k, d)).astype(np.float32)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("n,d,k", GRID)
def test_fused_cpu_matches_float64(rng, backend, n, d, k):
    x, c = _data(rng, n, d, k)
    taus = [0.02, 0.1, 1.0]
    got = proalign.aggregate(x, c, tau=taus, backend=backend, over="patches")
    for row, t in zip(got, taus):
        np.testing.assert_allclose(row, ref.proalign(x, c, t), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fused_cpu_dtypes(rng, backend, dtype):
    x, c = _data(rng, 777, 64, 16)
    xt = torch.from_numpy(x).to(dtype)
    got = proalign.aggregate(xt, torch.from_numpy(c), backend=backend)  # the default reading
    np.testing.assert_allclose(got.numpy(), ref.default_reading(xt.double().numpy(), c), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("tau", [1e-2, 1e-3, 1e-5])
def test_fused_cpu_extreme_inverse_temperature(rng, backend, tau):
    x, c = _data(rng, 5000, 64, 16)
    x *= 100
    got = proalign.aggregate(x, c, tau=tau, backend=backend, over="patches")
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref.proalign(x, c, tau), rtol=1e-3, atol=1e-3 * np.abs(x).max())


# --- float16 / bfloat16 read by the numba kernel as they are (issue 15 item 2) -----------------

def _half_data(rng, n, d, k, dtype):
    """Rows of very different magnitudes: ordinary rows, rows of tiny values (float16: subnormals,
    below 2^-14, so the converter's subnormal path is taken) and rows of large values (float16 up
    to its largest finite value, 65504). bfloat16 spans float32's exponent range; its rows stay
    within 1e-10..1e15, where the float32 sums of squares behind the cosine neither underflow nor
    overflow and the norm stays above the normalisation's 1e-12 floor (as for float32 input)."""
    x, c = _data(rng, n, d, k)
    tiny, big = (1e-6, 65504.0) if dtype == torch.float16 else (1e-10, 1e15)
    rows = rng.permutation(n)
    x[rows[: n // 5]] *= tiny
    x[rows[n // 5: 2 * n // 5]] = np.clip(x[rows[n // 5: 2 * n // 5]] * big / 4, -big, big)
    xt = torch.from_numpy(x).to(dtype)
    assert torch.isfinite(xt).all()
    return xt, c


HALF_CASES = [(1, 33, 1), (7, 96, 5), (1001, 200, 17), (4099, 64, 16), (9001, 512, 11)]


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d,k", HALF_CASES)
def test_fused_cpu_half_inputs_match_float64(rng, backend, dtype, n, d, k):
    """float16 / bfloat16 features against the float64 reference of the same rounded values, odd
    sizes (d not a multiple of 16, K not of 4, a last work item of 3 rows), every reading."""
    xt, c = _half_data(rng, n, d, k, dtype)
    x64 = xt.double().numpy()
    if dtype == torch.float16 and n >= 5:
        assert ((np.abs(x64) < 2.0 ** -14) & (x64 != 0)).any()  # subnormal inputs present
    taus = [0.02, 0.1, 1.0]
    for opts in [dict(over="patches")] + VARIANTS:
        got = proalign.aggregate(xt, torch.from_numpy(c), tau=taus, backend=backend, **opts)
        want = ref.proalign_rows(x64, c, taus, **opts)
        scale = max(1.0, float(np.abs(want).max()))  # the big rows: float32 sums, relative error
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=_tol(opts)["atol"] * scale, err_msg=str(opts))


@pytest.fixture
def kernel_inputs(monkeypatch):
    """Records the array each call of the numba kernels receives as x."""
    from proalign.ops.panther_moments import numba_cpu as moments_numba
    from proalign.ops.proalign_attention import numba_cpu as attention_numba

    seen = []
    for module, name in ((attention_numba, "_partials"), (moments_numba, "_moments")):
        kernel = getattr(module, name)

        def recorded(x, *rest, _kernel=kernel):
            seen.append(x)
            return _kernel(x, *rest)
        monkeypatch.setattr(module, name, recorded)
    return seen


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_reach_the_kernel_without_a_float32_copy(rng, kernel_inputs, backend, dtype):
    """The kernel reads the caller's own half-precision memory (a uint16 view of it), for a slide,
    a ragged batch, PANTHER and the torch op's CPU kernel: no float32 copy of X is ever made."""
    from proalign.ops.plans import gpu_programs
    from proalign.ops.proalign_attention import torch_op

    xt = torch.from_numpy(_data(rng, 3000, 96, 5)[0]).to(dtype)
    c = torch.from_numpy(_data(rng, 1, 96, 5)[1])
    proalign.aggregate(xt, c, backend=backend)
    proalign.aggregate(xt, c, method="panther", backend=backend)
    proalign.aggregate_batch([xt[:1000], xt[1000:]], c, backend=backend, over="patches", tau=0.1)
    plan = gpu_programs(torch.tensor([3000]), torch_op.rows_per_program())
    cn = torch.nn.functional.normalize(c, dim=1)
    torch.ops.proalign.attention_partials(xt, cn, torch.tensor([10.0]), *plan, torch.zeros(96), 5,
                                          torch_op.rows_per_program(), False, False)
    assert len(kernel_inputs) == 4
    for x in kernel_inputs:
        assert x.dtype == np.uint16 and x.shape[1] == 96
    for x in kernel_inputs[:2] + kernel_inputs[3:]:
        assert x.ctypes.data == xt.data_ptr() and x.shape[0] == 3000
    batch = kernel_inputs[2]  # aggregate_batch stacks the slides: one copy, still half precision
    assert batch.shape[0] == 3000 and batch.nbytes == xt.numel() * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_partials_equal_float32_upcast(rng, dtype):
    """Converting in registers is exact: the op's CPU kernel on half-precision x gives bit for bit
    the partials it gives on x upcast to float32 (moments=2 and over=prototypes included)."""
    if not CPU_FUSED:
        pytest.skip("numba not available")
    for over_prototypes, second in ((False, False), (True, True)):
        args = list(_op_args(rng, "cpu", lengths=(300, 1, 517), d=72, k=5, over_prototypes=over_prototypes,
                             second=second))
        half = args[0].to(dtype)
        got = torch.ops.proalign.attention_partials(half, *args[1:])
        want = torch.ops.proalign.attention_partials(half.float(), *args[1:])
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_numba_bit_identical_across_threads_and_batches(rng):
    """A slide's embedding does not depend on the thread count nor on the slides batched with it
    (before it, after it, or none), for float32 and bfloat16 input, ProAlign and PANTHER."""
    if not CPU_FUSED:
        pytest.skip("numba not available")
    import numba

    before = numba.get_num_threads()
    counts = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})
    x = _data(rng, 9001, 512, 16)[0]  # 3 work items; d a multiple of 64
    others = [_data(rng, n, 512, 16)[0] for n in (5, 4101)]
    c = _data(rng, 1, 512, 16)[1]
    runs = [dict(over="patches", tau=[0.05, 0.5], moments=2), dict(), dict(method="panther")]
    try:
        for dtype in (torch.float32, torch.bfloat16):
            xs = [torch.from_numpy(v).to(dtype) for v in (x, *others)]
            for opts in runs:
                results = []
                for threads in counts:
                    numba.set_num_threads(threads)
                    results.append(proalign.aggregate(xs[0], c, backend="numba", **opts))
                    results.append(proalign.aggregate_batch([xs[1], xs[0], xs[2]], c, backend="numba", **opts)[1])
                    results.append(proalign.aggregate_batch([xs[2], xs[0]], c, backend="numba", **opts)[1])
                for r in results[1:]:
                    assert np.array_equal(r, results[0]), (dtype, opts)
    finally:
        numba.set_num_threads(before)


def test_dispatch_prefers_fused_and_falls_back():
    from proalign.aggregate import resolve_backend

    x = torch.zeros(3, 4)
    best = resolve_backend("proalign", None, x, {}).name
    assert best == (CPU_FUSED[0] if CPU_FUSED else "torch")
    assert resolve_backend("proalign", None, x, {"over": "prototypes", "moments": 2, "prior": 1.0}).name == best
    assert resolve_backend("proalign", None, x, {"keys": x, "queries": x}).name == "torch"  # space=joint
    assert resolve_backend("panther", None, x, {}).name == best  # the fused PANTHER moments
    assert resolve_backend("h2t", None, x, {}).name == "torch"
    if CPU_FUSED:
        with pytest.raises(ValueError, match="does not support"):
            resolve_backend("proalign", CPU_FUSED[0], x, {"keys": x, "queries": x})


# Every ProAlign reading other than over=patches/moments=1 (covered above), on every backend.
VARIANTS = [dict(over="prototypes", prior=0.0), dict(over="patches", moments=2),
            dict(over="prototypes", moments=2, prior=0.0), dict(over="prototypes", moments=2, prior=1.0),
            dict(over="prototypes", prior=0.5)]


def _tol(opts):  # variances are differences of second moments: a little more float32 rounding
    return dict(rtol=1e-4, atol=1e-4 if opts.get("moments") == 2 else 2e-5)


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("n,d,k", [(1, 64, 1), (7, 512, 16), (1000, 768, 32), (9001, 96, 11)])
def test_fused_cpu_variants_match_float64(rng, backend, opts, n, d, k):
    x, c = _data(rng, n, d, k)
    taus = [0.02, 0.1, 1.0]
    got = proalign.aggregate(x, c, tau=taus, backend=backend, **opts)
    assert got.shape == (3, k + opts.get("moments", 1) * k * d)
    np.testing.assert_allclose(got, ref.proalign_rows(x, c, taus, **opts), **_tol(opts))


# A tau may repeat with another prior (the default reading's sharpest row does): computed once,
# finished once per row; moments=2 and one row without prior included.
ROW_PRIORS = dict(tau=[0.05, 0.02, 0.05, 1.0], prior=[0.5, 1.0, 0.0, 0.25], over="prototypes")


@pytest.mark.parametrize("backend", ["torch", *CPU_FUSED])
@pytest.mark.parametrize("moments", [1, 2])
def test_per_row_priors_match_float64(rng, backend, moments):
    xs = [_data(rng, n, 64, 7)[0] for n in (1, 40, 2003)]
    c = _data(rng, 1, 64, 7)[1]
    opts = dict(ROW_PRIORS, moments=moments)
    got = proalign.aggregate_batch(xs, c, backend=backend, **opts)
    taus = opts.pop("tau")
    for x, e in zip(xs, got):
        assert e.shape == (4, 7 + moments * 7 * 64)
        np.testing.assert_allclose(e, ref.proalign_rows(x, c, taus, **opts), **_tol(opts))


def test_variant_options_are_checked():
    x, c = np.ones((3, 4), np.float32), np.ones((2, 4), np.float32)
    for bad, match in ((dict(over="both"), "over must"), (dict(moments=3), "moments must"),
                       (dict(over="patches", prior=1.0), "prior"), (dict(over="prototypes", prior=-1.0), "prior"),
                       (dict(tau=[0.1, 0.2], over="patches", prior=[0.0, 1.0]), "prior"),
                       (dict(tau=[0.1, 0.2], over="prototypes", prior=[1.0]), "one prior per tau"),
                       (dict(tau=[0.1, 0.2], over="prototypes", prior=[1.0, -0.5]), "prior must be >= 0")):
        with pytest.raises(ValueError, match=match):
            proalign.aggregate(x, c, **bad)


TRITON = [b for b in ("triton", "cuda") if BACKENDS[b].available() is None]  # the GPU kernels
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _multi_program_n() -> int:
    """Rows of one slide spanning 3 full programs of the Triton kernel and a 4th with an odd tail
    (a full tile, a 3-row tile and empty tiles): the multi-program combine, in the interpreter."""
    if "triton" not in TRITON:
        return 3 * 256 + 64 + 3
    from proalign.kernels.proalign_attention import BLOCK_N, ROWS_PER_PROGRAM

    return 3 * ROWS_PER_PROGRAM + BLOCK_N + 3


# The interpreter runs every program in numpy: a reduced grid (all d and K, small and large N; 835
# rows are 4 programs, where 100,003 rows took 35 s for no more coverage of the kernel's paths).
TRITON_GRID = [(n, d, k) for n in (1, 7, 1000) for d, k in ((64, 1), (512, 16), (768, 32), (1024, 16))]
TRITON_GRID += [(_multi_program_n(), 128, 16)] if INTERPRETED else [(100_003, 1024, 32), (100_003, 512, 16)]


@pytest.fixture
def poisoned(monkeypatch):
    """Partial buffers start as NaN: a slot the kernel forgets to write poisons the result."""
    from proalign.kernels import proalign_attention
    from proalign.ops.proalign_attention import torch_op

    for module in (proalign_attention, torch_op):
        monkeypatch.setattr(module, "_alloc", lambda *a, **kw: torch.full(*a, float("nan"), **kw))


def _device():
    return "cpu" if INTERPRETED else "cuda"


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("n,d,k", TRITON_GRID)
def test_gpu_kernels_match_float64(rng, poisoned, backend, n, d, k):
    x, c = _data(rng, n, d, k)
    taus = [0.05, 1.0]
    got = proalign.aggregate(torch.from_numpy(x).to(_device()), torch.from_numpy(c), tau=taus, backend=backend,
                             over="patches")
    for row, t in zip(got.cpu().numpy(), taus):
        np.testing.assert_allclose(row, ref.proalign(x, c, t), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_kernels_dtypes_and_extreme_tau(rng, poisoned, backend, dtype):
    x, c = _data(rng, 999, 64, 16)
    xt = torch.from_numpy(x * 30).to(dtype)
    for tau in (0.1, 1e-4):
        got = proalign.aggregate(xt.to(_device()), torch.from_numpy(c), tau=tau, backend=backend,
                                 over="patches").cpu().numpy()
        assert np.isfinite(got).all()
        want = ref.proalign(xt.double().numpy(), c, tau)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("opts", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_variants_match_float64(rng, poisoned, backend, opts, dtype):
    xs = [_data(rng, n, d, 11)[0][:, :96] for n, d in ((1, 96), (300, 96), (1300, 96))]
    c = _data(rng, 1, 96, 11)[1]
    xts = [torch.from_numpy(x).to(dtype) for x in xs]
    got = proalign.aggregate_batch([x.to(_device()) for x in xts], c, tau=[0.05, 1.0], backend=backend, **opts)
    for x, e in zip(xts, got):
        np.testing.assert_allclose(e.cpu().numpy(), ref.proalign_rows(x.double().numpy(), c, [0.05, 1.0], **opts),
                                   **_tol(opts))


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("moments", [1, 2])
def test_gpu_kernels_per_row_priors_match_float64(rng, poisoned, backend, moments):
    xs = [_data(rng, n, 96, 11)[0] for n in (1, 300, 1300)]
    c = _data(rng, 1, 96, 11)[1]
    opts = dict(ROW_PRIORS, moments=moments)
    got = proalign.aggregate_batch([torch.from_numpy(x).to(_device()) for x in xs], c, backend=backend, **opts)
    taus = opts.pop("tau")
    for x, e in zip(xs, got):
        np.testing.assert_allclose(e.cpu().numpy(), ref.proalign_rows(x, c, taus, **opts), **_tol(opts))


def _count_launches(monkeypatch, backend):
    """Patch the kernel entry point a backend calls (the Triton JIT kernel's [grid] launch, or the
    CUDA C++ op) to record each launch; returns the list of launches (Triton: the grid of each)."""
    launches = []
    if backend == "triton":
        from proalign.kernels import proalign_attention as kern

        real = kern.proalign_partials_kernel

        class Counted:
            def __getitem__(self, grid):
                launches.append(grid)
                return real[grid]

        monkeypatch.setattr(kern, "proalign_partials_kernel", Counted())
    else:
        from proalign import _C

        real_op = _C.proalign_partials

        def counted(*args):
            launches.append(args[9])  # n_prog
            return real_op(*args)

        monkeypatch.setattr(_C, "proalign_partials", counted)
    return launches


def _rows_per_program(backend):
    if backend == "triton":
        from proalign.kernels import proalign_attention as kern

        return kern.ROWS_PER_PROGRAM
    from proalign.ops.proalign_attention import torch_op

    return torch_op.rows_per_program()


@pytest.mark.parametrize("backend", TRITON)
def test_ragged_batch_one_launch(rng, poisoned, monkeypatch, backend):
    """Five slides of different N (one spanning several programs) in one aggregate_batch call: one
    kernel launch whose grid holds every slide's programs, each slide equal to the float64 reference."""
    rows = _rows_per_program(backend)
    ns = (1, 250, 3, 700, 64)  # 700: several programs
    xs = [_data(rng, n, 48, 5)[0] for n in ns]
    c = _data(rng, 1, 48, 5)[1]
    launches = _count_launches(monkeypatch, backend)
    got = proalign.aggregate_batch([torch.from_numpy(x).to(_device()) for x in xs], c, tau=[0.1, 0.3], backend=backend,
                                   over="patches")
    n_prog = sum(-(-n // rows) for n in ns)
    assert len(launches) == 1, f"{len(launches)} launches for one batch of {len(ns)} slides"
    assert launches[0] in ((n_prog,), n_prog), (launches, n_prog)  # one grid over every slide's programs
    assert len(got) == len(ns)
    for x, e in zip(xs, got):
        for row, t in zip(e.cpu().numpy(), [0.1, 0.3]):
            np.testing.assert_allclose(row, ref.proalign(x, c, t), rtol=1e-4, atol=2e-5)


def test_aggregate_batch_on_cpu_backends(rng):
    xs = [_data(rng, n, 16, 3)[0] for n in (5, 40)]
    c = _data(rng, 1, 16, 3)[1]
    for x, e in zip(xs, proalign.aggregate_batch(xs, c, tau=0.2, over="patches")):
        np.testing.assert_allclose(e, ref.proalign(x, c, 0.2), rtol=1e-4, atol=2e-5)
    for x, e in zip(xs, proalign.aggregate_batch(xs, c)):  # the default reading
        np.testing.assert_allclose(e, ref.default_reading(x, c), rtol=1e-4, atol=2e-5)


# --- the torch op (torch.library): its CPU kernel, its fake, opcheck, torch.compile -------------

def _op_devices():
    from proalign.ops.runtime import cuda_unavailable

    return ["cpu"] + ([] if cuda_unavailable() else ["cuda"])


def _op_args(rng, device, lengths=(300, 1, 5000), d=96, k=5, n_tau=2, over_prototypes=False, second=False):
    from proalign.ops.plans import gpu_programs, padded_k
    from proalign.ops.proalign_attention.torch_op import rows_per_program

    k_pad = padded_k(k, 8)
    x = torch.from_numpy(_data(rng, sum(lengths), d, k)[0]).to(device)
    cn = torch.zeros(k_pad, d, device=device)
    cn[:k] = torch.nn.functional.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(1)), dim=1)
    plan = gpu_programs(torch.tensor(lengths), rows_per_program())
    inv_taus = torch.tensor([10.0, 2.0][:n_tau], device=device)
    shift = x.mean(0).contiguous()
    return (x, cn, inv_taus, *(p.to(device) for p in plan), shift, k, rows_per_program(), over_prototypes, second)


@pytest.mark.parametrize("device", _op_devices())
@pytest.mark.parametrize("over_prototypes,second", [(False, False), (True, True)])
def test_attention_partials_opcheck(rng, device, over_prototypes, second):
    """The registered op passes torch.library.opcheck (schema, fake tensors, autograd registration,
    AOT dispatch) on every device it has a kernel for: the numba CPU kernel here, CUDA C++ on a GPU."""
    args = _op_args(rng, device, over_prototypes=over_prototypes, second=second)
    torch.library.opcheck(torch.ops.proalign.attention_partials.default, args)


@pytest.mark.parametrize("device", _op_devices())
def test_attention_partials_op_matches_float64(rng, device):
    """The op's kernel on `device`, merged and finished by host.py, against the float64 reference
    (the CPU kernel is the numba kernel on the GPU's program plan)."""
    from proalign.ops.proalign_attention import host, torch_op

    lengths = [300, 1, 5000]
    x, c = _data(rng, sum(lengths), 96, 5)
    taus = [0.1, 0.5]
    for over, moments, prior in (("patches", 1, 0.0), ("prototypes", 2, 0.5)):
        got = host.proalign_ragged(torch_op.launch, torch_op.rows_per_program(), 8, torch.from_numpy(x).to(device),
                                   torch.tensor(lengths), torch.from_numpy(c), taus, over=over, moments=moments,
                                   prior=prior).cpu().numpy()
        at = np.cumsum([0] + lengths)
        for s in range(len(lengths)):
            want = proalign.aggregate(x[at[s]:at[s + 1]].astype(np.float64), c.astype(np.float64), tau=taus,
                                      backend="torch", over=over, moments=moments, prior=prior)
            np.testing.assert_allclose(got[s], want, rtol=1e-4, atol=3e-5)


def test_attention_partials_composes_with_torch_compile(rng):
    """A function calling the op compiles as one graph (fullgraph: no break at the op) and gives the
    eager result."""
    args = _op_args(rng, "cpu")

    def pooled(x, *rest):
        m, l, pi, acc, _ = torch.ops.proalign.attention_partials(x * 1.0, *rest)
        return acc.sum(0) / l.sum(0)[..., None].clamp_min(1e-30)

    eager = pooled(*args)
    compiled = torch.compile(pooled, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)


def test_launch_inputs_are_checked(rng):
    """Wrong dtypes, strided or misshapen buffers fail with the argument's name before any kernel
    sees a pointer."""
    args = list(_op_args(rng, "cpu"))
    op = torch.ops.proalign.attention_partials
    bad = {0: args[0].double(), 1: args[1][:, :10], 3: args[3].long(), 6: args[6][:3]}
    names = {0: "x must be float32", 1: "cn must be", 3: "prog_slide must be", 6: "shift must be"}
    for i, value in bad.items():
        with pytest.raises((TypeError, ValueError), match=names[i]):
            op(*args[:i], value, *args[i + 1:])
    strided = torch.zeros(args[0].shape[0], args[0].shape[1] * 2)[:, ::2]
    with pytest.raises(ValueError, match="contiguous rows"):
        op(strided, *args[1:])
