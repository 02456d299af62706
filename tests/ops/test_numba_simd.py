"""The numba kernels' vector layer (ops/numba_simd.py): the in-register float16/bfloat16 converters
on every bit pattern, the float32 exp, and the two block GEMMs against float64."""
import numpy as np
import pytest
import torch

from proalign.aggregate import BACKENDS

if BACKENDS["numba"].available():
    pytest.skip(BACKENDS["numba"].available(), allow_module_level=True)

from numba import njit, prange  # noqa: E402

from proalign.ops import numba_simd as ns  # noqa: E402

ALL_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _same_value(got, want):
    """Bit-identical, nan anywhere counting as nan."""
    return (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))


@pytest.mark.parametrize("fmt", [ns.FMT_F16, ns.FMT_F16_SOFT])
def test_float16_converter_every_bit_pattern(fmt):
    """Zero, subnormals (2^-24 .. 2^-14), normals up to 65504, inf and nan of both signs: exactly
    the float32 value (the integer path also keeps nan payloads; the CPU's instruction may quiet
    signalling nans)."""
    got = ns.convert(ALL_BITS, fmt)
    want = ALL_BITS.view(np.float16).astype(np.float32)
    assert _same_value(got, want).all()
    if fmt == ns.FMT_F16_SOFT:
        assert (got.view(np.uint32) == want.view(np.uint32)).all()
    sub = ALL_BITS[(ALL_BITS & 0x7C00) == 0]  # exponent 0: zero and subnormals
    assert (ns.convert(sub, fmt) == sub.view(np.float16).astype(np.float32)).all()
    assert ns.convert(np.array([1], np.uint16), fmt)[0] == 2.0 ** -24


def test_bfloat16_converter_every_bit_pattern():
    got = ns.convert(ALL_BITS, ns.FMT_BF16)
    want = torch.from_numpy(ALL_BITS.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert (got.view(np.uint32) == want.view(np.uint32)).all()  # a shift: payloads kept too


def test_float32_passes_through():
    x = np.random.default_rng(0).standard_normal(1001).astype(np.float32)
    x[:4] = [np.inf, -np.inf, np.nan, 1e-45]
    assert (ns.convert(x, ns.FMT_F32).view(np.uint32) == x.view(np.uint32)).all()


def test_kernel_input_keeps_half_precision_memory():
    """float16 / bfloat16 tensors (and float16 arrays) reach the kernels as uint16 views of the
    caller's memory; float32 as it is; other dtypes as a float32 copy."""
    for dtype, fmt in ((torch.float16, ns.FMT_F16), (torch.bfloat16, ns.FMT_BF16)):
        t = torch.randn(5, 7).to(dtype)
        arr, f = ns.kernel_input(t)
        assert f == fmt and arr.dtype == np.uint16 and arr.ctypes.data == t.data_ptr()
    a = np.ones((3, 4), np.float16)
    arr, f = ns.kernel_input(a)
    assert f == ns.FMT_F16 and arr.dtype == np.uint16 and np.shares_memory(arr, a)
    t = torch.randn(5, 7)
    arr, f = ns.kernel_input(t)
    assert f == ns.FMT_F32 and arr.ctypes.data == t.data_ptr()
    arr, f = ns.kernel_input(t.double())
    assert f == ns.FMT_F32 and arr.dtype == np.float32


@njit
def _exp(x):
    out = np.empty_like(x)
    for i in range(0, x.shape[0], ns.W):
        ns.vstore(out, i, ns.vexp(ns.vload(x, i)))
    return out


def test_vector_exp():
    x = np.linspace(-50.0, 88.0, 16 * 60_000).astype(np.float32)
    got = _exp(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert (np.abs(got - want) / want).max() < 2.5e-7  # about 2 float32 ulp
    # below -50: 0, never a subnormal weight (see numba_simd._EXP_MIN)
    special = np.array([-np.inf, -1e30, -88.0, -50.01, 0.0, -0.0, 1e-30, 100.0] * 2, np.float32)
    out = _exp(special)
    assert list(out[:8]) == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, np.float32(np.exp(np.float32(88.0)))]


@pytest.mark.parametrize("rows,kp,width", [(1, 4, 16), (61, 8, 128), (64, 20, 192)])
def test_block_scores(rng, rows, kp, width):
    rb = 64
    buf = rng.standard_normal(3 + rb * width).astype(np.float32)
    cm = rng.standard_normal(kp * width).astype(np.float32)
    s = np.zeros(kp * rb, np.float32)
    ns.block_scores(buf, 3, width, rows, cm, width, kp, width, s, rb, buf, 0, buf.size)  # prefetching buf too
    x = buf[3:].reshape(rb, width).astype(np.float64)
    want = cm.reshape(kp, width).astype(np.float64) @ x.T  # prototype-major
    np.testing.assert_allclose(s.reshape(kp, rb)[:, :rows], want[:, :rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("acc_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows,nt,kp,width", [(1, 1, 4, 64), (61, 3, 8, 128), (64, 2, 20, 192)])
def test_block_pool(rng, acc_dtype, rows, nt, kp, width):
    rb = 64
    buf = rng.standard_normal(rb * width).astype(np.float32)
    w = rng.random(nt * kp * rb).astype(np.float32)
    acc = rng.standard_normal(nt * kp * width).astype(acc_dtype)
    scale = rng.random(nt * kp).astype(np.float32)
    want = (acc.reshape(nt, kp, width).astype(np.float64) * scale.reshape(nt, kp, 1)
            + np.einsum("tkr,rj->tkj", w.reshape(nt, kp, rb)[:, :, :rows].astype(np.float64),
                        buf.reshape(rb, width)[:rows].astype(np.float64)))
    ns.block_pool(buf, 0, width, rows, w, kp * rb, rb, nt, kp, width, acc, kp * width, width, scale, kp, buf, 0, 0)
    np.testing.assert_allclose(acc.reshape(nt, kp, width), want, rtol=1e-5, atol=1e-4)


def test_stale_kernel_caches_dropped(tmp_path):
    """numba keys a cached kernel on its own file: when numba_simd.py (which kernels inline) changes,
    every ops kernel cache goes; while nothing changes, they stay."""
    (tmp_path / "numba_simd.py").write_text("A = 1\n")
    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "numba_cpu.py").write_text("B = 1\n")
    caches = [tmp_path / "__pycache__" / "numba_simd.f-1.py311.nbi",
              tmp_path / "op" / "__pycache__" / "numba_cpu.g-2.py311.1.nbc"]

    def cache():
        for f in caches:
            f.parent.mkdir(exist_ok=True)
            f.write_bytes(b"x")
    ns.drop_stale_caches(tmp_path)  # no stamp yet: a first run drops whatever is there
    cache()
    ns.drop_stale_caches(tmp_path)
    assert all(f.exists() for f in caches)
    (tmp_path / "numba_simd.py").write_text("A = 2\n")
    ns.drop_stale_caches(tmp_path)
    assert not any(f.exists() for f in caches)
    cache()
    (tmp_path / "op" / "numba_cpu.py").write_text("B = 2\n")
    ns.drop_stale_caches(tmp_path)
    assert not any(f.exists() for f in caches)


@ns.parallel_kernel
def _doubled(x, out):
    for i in prange(x.shape[0]):
        out[i] = 2 * x[i]


def test_parallel_kernel_one_dispatcher_per_type():
    """Each combination of input dtypes gets a numba dispatcher of its own, compiled once for it
    (a parallel dispatcher's second specialisation ran at half speed)."""
    for dtype in (np.float32, np.float64, np.float32, np.uint16):
        x = np.arange(1000).astype(dtype)
        out = np.zeros(1000, dtype)
        _doubled(x, out)
        np.testing.assert_array_equal(out, 2 * x)
    assert len(_doubled.kernels) == 3
    assert all(len(k.signatures) == 1 for k in _doubled.kernels.values())
