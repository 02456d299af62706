"""Explicit 16-lane float32 vectors for the numba kernels, and the block GEMMs both fused ops share.

Why explicit vectors: LLVM's auto-vectoriser keeps to 256-bit registers on Intel CPUs with
AVX-512 (its `prefer-256-bit` tuning), which halves the FMA peak there, and it cannot keep a tile
of accumulators in registers across the rows of a block. A `F32x16` value here is an LLVM
`<16 x float>`: on AVX-512 one zmm register, elsewhere LLVM splits it (two ymm on AVX2, four
NEON registers), so the kernels stay portable. The intrinsics are the few operations the
kernels need (load/store at a flat element index of a C-contiguous array, broadcast, FMA,
max, horizontal sum and max, a float32 exp, a transposing sum of 16 vectors).

Inputs of 16-bit floats are read as their raw bits (uint16 arrays) and converted per vector in
registers (`vload_src`): bfloat16 is the high half of a float32; float16 uses the CPU's
conversion instruction when numba's target has one (F16C on x86-64, every aarch64), else an
exact integer conversion (subnormals, inf and nan included). No float32 copy of X is made.

Block GEMMs (`block_scores`, `block_pool`) work on a block of rows copied (converted) into a
float32 buffer whose rows are padded with zeros to a multiple of 64 columns, so every vector
load is full. Scores: 4 rows x 4 prototypes per register tile (8 loads per 16 FMAs), one
transposing reduction per tile. Pooling: 4 prototypes x 64 columns per register tile (16
accumulators) summed over the block's rows, then added into the item's accumulator.

numba keys a cached kernel on its own file only, so a kernel that inlines these functions would
load as it was compiled against an older version of this file: `drop_stale_caches` (run on import)
drops the ops' cached kernels whenever these sources change.
"""
from __future__ import annotations

import functools
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

# numba parallel options of the kernels: only their prange runs in parallel; the few small array
# initialisations around it stay serial (auto-parallelised, each would be a scheduled region of
# its own, one region per element with items handed out one at a time)
PRANGE_ONLY = {"comprehension": False, "reduction": False, "inplace_binop": False, "setitem": False,
               "numpy": False, "stencil": False, "fusion": False, "prange": True}
W = 16  # lanes per vector
COLS = 64  # columns per pooling tile (4 vectors); buffers are padded to a multiple of this
FMT_F32, FMT_F16, FMT_BF16, FMT_F16_SOFT = 0, 1, 2, 3  # FMT_F16_SOFT: the integer path (tests)


def drop_stale_caches(ops: Path = Path(__file__).parent) -> None:
    """Delete the cached numba kernels of ops/ (`__pycache__/*.nbi`, `*.nbc` beside the sources)
    when the hash of the kernels' sources (this file and every `ops/*/numba_cpu.py`) differs from
    the one recorded beside them: numba would otherwise load a kernel compiled against an older
    version of this file. Where the folders are read-only, nothing is done (numba then caches
    elsewhere, keyed on the installed files, which change together)."""
    sources = sorted([ops / "numba_simd.py", *ops.glob("*/numba_cpu.py")])
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    stamp = ops / "__pycache__" / "numba_sources.sha256"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    try:
        for cache in {p.parent / "__pycache__" for p in sources}:
            for f in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:
                f.unlink(missing_ok=True)
        stamp.parent.mkdir(exist_ok=True)
        tmp = stamp.with_suffix(f".{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, stamp)
    except OSError:
        pass


drop_stale_caches()

_f32, _f64, _i32, _i16, _i1 = ir.FloatType(), ir.DoubleType(), ir.IntType(32), ir.IntType(16), ir.IntType(1)
_V = ir.VectorType(_f32, W)
_VD = ir.VectorType(_f64, W)
_VI = ir.VectorType(_i32, W)
_VH = ir.VectorType(_i16, W)


class F32x16Type(types.Type):
    def __init__(self):
        super().__init__(name="F32x16")


f32x16 = F32x16Type()


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V)


# --- IR helpers ---------------------------------------------------------------------------------

def _splat(ty, value):
    """A constant of `ty` (scalar or vector) with every lane `value`."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [value] * ty.count)
    return ir.Constant(ty, value)


def _ptr(context, builder, aryty, ary, idx, idxty, elem):
    """Pointer to `elem` at flat element `idx` of a C-contiguous array."""
    a = context.make_array(aryty)(context, builder, ary)
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.bitcast(builder.gep(a.data, [i]), elem.as_pointer())


def _call(builder, name, ret, args, fastmath=()):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args, fastmath=fastmath)


def _vec(builder, x):
    """Broadcast a float scalar to all lanes."""
    u = builder.insert_element(ir.Constant(_V, ir.Undefined), x, ir.Constant(_i32, 0))
    return builder.shuffle_vector(u, u, ir.Constant(_VI, [0] * W))


def _is_f32_array(a):
    return isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C"


def _is_src_array(a):
    return isinstance(a, types.Array) and a.dtype in (types.float32, types.uint16) and a.layout == "C"


def _bf16(builder, h):
    """bfloat16 bits (i16 or <16 x i16>) -> float32: the bits are the float32's high half."""
    it, ft = (_VI, _V) if isinstance(h.type, ir.VectorType) else (_i32, _f32)
    return builder.bitcast(builder.shl(builder.zext(h, it), _splat(it, 16)), ft)


def _f16_soft(builder, h):
    """float16 bits -> float32 with integer operations, exact for every input: normal numbers and
    inf/nan move their exponent from bias 15 to bias 127 (nan payloads kept), subnormals (and
    zero) are their 10-bit significand times 2^-24, computed in float32 (exact)."""
    it, ft = (_VI, _V) if isinstance(h.type, ir.VectorType) else (_i32, _f32)
    w = builder.zext(h, it)
    sign = builder.shl(builder.and_(w, _splat(it, 0x8000)), _splat(it, 16))
    em = builder.and_(w, _splat(it, 0x7FFF))  # exponent and significand
    bits = builder.add(builder.shl(em, _splat(it, 13)), _splat(it, 112 << 23))
    inf_nan = builder.icmp_unsigned(">=", em, _splat(it, 0x7C00))
    bits = builder.select(inf_nan, builder.add(bits, _splat(it, 112 << 23)), bits)  # exponent 31 -> 255
    sub = builder.fmul(builder.uitofp(em, ft), _splat(ft, 2.0 ** -24))
    bits = builder.select(builder.icmp_unsigned("<", em, _splat(it, 0x400)), builder.bitcast(sub, it), bits)
    return builder.bitcast(builder.or_(bits, sign), ft)


def _hw_f16(context) -> bool:
    """Whether numba's target converts float16 in hardware (else LLVM would call a runtime helper
    numba does not link)."""
    try:
        triple, _, features = context.codegen().magic_tuple()
    except Exception:  # noqa: BLE001 - an unknown codegen: the exact integer path
        return False
    if triple.startswith(("aarch64", "arm64")):
        return True
    return triple.startswith("x86_64") and "+f16c" in str(features).split(",")


def _f16_hw(builder, h):
    ht, ft = (ir.VectorType(ir.HalfType(), W), _V) if isinstance(h.type, ir.VectorType) else (ir.HalfType(), _f32)
    return builder.fpext(builder.bitcast(h, ht), ft)


def _load_src(context, builder, sig, args, vector: bool):
    aryty, idxty, fmtty = sig.args
    ary, idx, fmt = args
    if aryty.dtype == types.float32:
        return builder.load(_ptr(context, builder, aryty, ary, idx, idxty, _V if vector else _f32), align=4)
    h = builder.load(_ptr(context, builder, aryty, ary, idx, idxty, _VH if vector else _i16), align=2)
    out = cgutils.alloca_once(builder, _V if vector else _f32)
    f = context.cast(builder, fmt, fmtty, types.int64)
    hw = _hw_f16(context)
    with builder.if_else(builder.icmp_signed("==", f, ir.Constant(ir.IntType(64), FMT_BF16))) as (bf, other):
        with bf:
            builder.store(_bf16(builder, h), out)
        with other:
            soft = builder.icmp_signed("==", f, ir.Constant(ir.IntType(64), FMT_F16_SOFT))
            with builder.if_else(soft if hw else ir.Constant(_i1, 1)) as (sw, native):
                with sw:
                    builder.store(_f16_soft(builder, h), out)
                with native:
                    builder.store(_f16_hw(builder, h) if hw else _f16_soft(builder, h), out)
    return builder.load(out)


# --- intrinsics ---------------------------------------------------------------------------------

@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return _splat(_V, 0.0)
    return f32x16(), codegen


@intrinsic
def vbcast(typingctx, x):
    """All 16 lanes = x (any number, rounded to float32)."""
    if not isinstance(x, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _vec(builder, context.cast(builder, args[0], sig.args[0], types.float32))
    return f32x16(x), codegen


@intrinsic
def vbcast_at(typingctx, a, i):
    """All 16 lanes = a[i] (float32 array, flat index, no bounds or negative-index check)."""
    if not (_is_f32_array(a) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _vec(builder, builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _f32),
                                          align=4))
    return f32x16(a, i), codegen


@intrinsic
def vload(typingctx, a, i):
    """a[i:i+16] of a C-contiguous float32 array (flat element index; no bounds check)."""
    if not (_is_f32_array(a) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V), align=4)
    return f32x16(a, i), codegen


@intrinsic
def vstore(typingctx, a, i, v):
    """a[i:i+16] = v."""
    if not (_is_f32_array(a) and isinstance(i, types.Integer) and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V), align=4)
        return context.get_dummy_value()
    return types.none(a, i, v), codegen


@intrinsic
def prefetch(typingctx, a, i):
    """Hint the cache line holding a[i] (flat index, any C-contiguous array) into L2; no effect on
    results, never faults."""
    if not (isinstance(a, types.Array) and a.layout == "C" and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        at = builder.gep(arr.data, [context.cast(builder, args[1], sig.args[1], types.intp)])
        p = builder.bitcast(at, ir.IntType(8).as_pointer())
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [p.type, _i32, _i32, _i32]), "llvm.prefetch.p0")
        builder.call(fn, [p, ir.Constant(_i32, 0), ir.Constant(_i32, 2), ir.Constant(_i32, 1)])
        return context.get_dummy_value()
    return types.none(a, i), codegen


@intrinsic
def vload_src(typingctx, a, i, fmt):
    """16 float32 values from a C-contiguous float32 array, or from the raw bits of float16/bfloat16
    values in a uint16 array (fmt FMT_F16, FMT_BF16 or FMT_F16_SOFT), converted in registers."""
    if not (_is_src_array(a) and isinstance(i, types.Integer) and isinstance(fmt, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _load_src(context, builder, sig, args, True)
    return f32x16(a, i, fmt), codegen


@intrinsic
def load_src(typingctx, a, i, fmt):
    """One value, as vload_src."""
    if not (_is_src_array(a) and isinstance(i, types.Integer) and isinstance(fmt, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _load_src(context, builder, sig, args, False)
    return types.float32(a, i, fmt), codegen


def _binary(op):
    @intrinsic
    def fn(typingctx, a, b):
        if not (a == f32x16 and b == f32x16):
            return None

        def codegen(context, builder, sig, args):
            return op(builder, *args)
        return f32x16(a, b), codegen
    return fn


vadd = _binary(lambda b, x, y: b.fadd(x, y))
vsub = _binary(lambda b, x, y: b.fsub(x, y))
vmul = _binary(lambda b, x, y: b.fmul(x, y))
vdiv = _binary(lambda b, x, y: b.fdiv(x, y))
vmax = _binary(lambda b, x, y: b.select(b.fcmp_ordered(">", x, y), x, y))


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, one rounding."""
    if not (a == f32x16 and b == f32x16 and c == f32x16):
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v16f32", _V, list(args))
    return f32x16(a, b, c), codegen


@intrinsic
def vhsum(typingctx, v):
    """Sum of the 16 lanes (a fixed pairwise order)."""
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.vector.reduce.fadd.v16f32", _f32, [ir.Constant(_f32, -0.0), args[0]],
                     fastmath=("reassoc",))
    return types.float32(v), codegen


@intrinsic
def vhmax(typingctx, v):
    """Largest of the 16 lanes."""
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.vector.reduce.fmax.v16f32", _f32, [args[0]])
    return types.float32(v), codegen


_LN2_HI = 0.693145751953125  # ln 2 split in two (8 significant bits in the high part): n * hi exact
_LN2_LO = 1.4286068203094172e-06
# exp below -50 gives 0. The kernels take exp of (score - the running max) only, as weights whose
# total is >= 1, so a term below e^-50 changes no result; kept, such terms make subnormal numbers
# downstream (q * x), whose arithmetic takes a microcode assist (~100x slower) on x86: 13% of the
# PANTHER pass on spread-out data (46.7 -> 40.7 ms).
_EXP_MIN = -50.0
_EXP_MAX = 88.0


@intrinsic
def vexp(typingctx, v):
    """exp of each lane in float32 (about 1 ulp): x = n ln2 + f with |f| <= ln2/2, exp(f) by its
    degree-7 Taylor polynomial (truncation < 6e-9 relative), 2^n built in the exponent bits.
    Lanes below -50 (and -inf) give 0 (see _EXP_MIN), lanes above 88 are clamped there."""
    if v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        b = builder
        x = b.select(b.fcmp_ordered("<", args[0], _splat(_V, _EXP_MAX)), args[0], _splat(_V, _EXP_MAX))
        n = _call(b, "llvm.rint.v16f32", _V, [b.fmul(x, _splat(_V, 1.4426950408889634))])
        f = _call(b, "llvm.fma.v16f32", _V, [n, _splat(_V, -_LN2_HI), x])
        f = _call(b, "llvm.fma.v16f32", _V, [n, _splat(_V, -_LN2_LO), f])
        p = _splat(_V, 1.0 / 5040.0)
        for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
            p = _call(b, "llvm.fma.v16f32", _V, [p, f, _splat(_V, c)])
        ni = b.fptosi(n, _VI)
        scale = b.bitcast(b.shl(b.add(ni, _splat(_VI, 127)), _splat(_VI, 23)), _V)
        out = b.fmul(p, scale)
        return b.select(b.fcmp_ordered("<", args[0], _splat(_V, _EXP_MIN)), _splat(_V, 0.0), out)
    return f32x16(v), codegen


def _shuffle_add(b, x, y, lo, hi):
    return b.fadd(b.shuffle_vector(x, y, ir.Constant(_VI, lo)), b.shuffle_vector(x, y, ir.Constant(_VI, hi)))


def _transpose_sum(b, vs):
    """16 vectors -> one vector whose lane i is the sum of vs[i]'s lanes, in 4 levels of
    shuffle + add (45 instructions instead of 16 separate reductions)."""
    # level 1: pairs (v0, v1): [v0 lanes 0-7 + 8-15 | v1 lanes 0-7 + 8-15]
    lo = list(range(8)) + list(range(16, 24))
    hi = list(range(8, 16)) + list(range(24, 32))
    vs = [_shuffle_add(b, vs[2 * i], vs[2 * i + 1], lo, hi) for i in range(8)]
    # level 2: each input holds 2 sources x 8 partials -> 4 sources x 4 partials
    lo = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
    hi = [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31]
    vs = [_shuffle_add(b, vs[2 * i], vs[2 * i + 1], lo, hi) for i in range(4)]
    # level 3: 4 x 4 partials -> 8 sources x 2 partials
    lo = [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29]
    hi = [2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31]
    vs = [_shuffle_add(b, vs[2 * i], vs[2 * i + 1], lo, hi) for i in range(2)]
    # level 4: 8 x 2 partials -> 16 sums
    return _shuffle_add(b, vs[0], vs[1], list(range(0, 32, 2)), list(range(1, 32, 2)))


@intrinsic
def vstore_sums4x4(typingctx, a, i, stride, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13,
                   v14, v15):
    """a[i + c * stride + r] = sum of the lanes of v(4r + c), r, c in 0..3: a 4 (rows r) x 4
    (prototypes c) tile of dot products from their 16 vector partial sums, stored transposed
    (prototype-major, rows contiguous)."""
    vs = (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15)
    if not (_is_f32_array(a) and isinstance(i, types.Integer) and isinstance(stride, types.Integer)
            and all(v == f32x16 for v in vs)):
        return None

    def codegen(context, builder, sig, args):
        s = _transpose_sum(builder, list(args[3:]))
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        base = context.cast(builder, args[1], sig.args[1], types.intp)
        step = context.cast(builder, args[2], sig.args[2], types.intp)
        v4t = ir.VectorType(_f32, 4)
        for c in range(4):
            at = builder.add(base, builder.mul(step, ir.Constant(step.type, c)))
            part = builder.shuffle_vector(s, s, ir.Constant(ir.VectorType(_i32, 4), [4 * r + c for r in range(4)]))
            builder.store(part, builder.bitcast(builder.gep(arr.data, [at]), v4t.as_pointer()), align=4)
        return context.get_dummy_value()
    return types.none(a, i, stride, *vs), codegen


@intrinsic
def vaccumulate(typingctx, a, i, v, scale):
    """a[i:i+16] = a[i:i+16] * scale + v, in a's precision (float32 or float64)."""
    if not (isinstance(a, types.Array) and a.dtype in (types.float32, types.float64) and a.layout == "C"
            and isinstance(i, types.Integer) and v == f32x16 and isinstance(scale, (types.Float, types.Integer))):
        return None

    def codegen(context, builder, sig, args):
        aryty, ity, _, sty = sig.args
        if aryty.dtype == types.float32:
            p = _ptr(context, builder, aryty, args[0], args[1], ity, _V)
            s = _vec(builder, context.cast(builder, args[3], sty, types.float32))
            builder.store(_call(builder, "llvm.fma.v16f32", _V, [builder.load(p, align=4), s, args[2]]), p, align=4)
        else:
            p = _ptr(context, builder, aryty, args[0], args[1], ity, _VD)
            sd = context.cast(builder, args[3], sty, types.float64)
            u = builder.insert_element(ir.Constant(_VD, ir.Undefined), sd, ir.Constant(_i32, 0))
            s = builder.shuffle_vector(u, u, ir.Constant(_VI, [0] * W))
            new = _call(builder, "llvm.fma.v16f64", _VD, [builder.load(p, align=8), s, builder.fpext(args[2], _VD)])
            builder.store(new, p, align=8)
        return context.get_dummy_value()
    return types.none(a, i, v, scale), codegen


# --- block GEMMs --------------------------------------------------------------------------------

@njit(nogil=True, cache=True)
def _prefetch_every(x, steps, pf, pf_end):
    """Elements of x per cache line, and how many of a GEMM's `steps` inner iterations pass between
    two prefetches, so that the lines of x[pf:pf_end] are spread evenly over it. (The prefetch step
    itself stays written out in each GEMM's inner loop: as a function it made the loops 2-5x
    slower.)"""
    line = 64 // x.itemsize
    return line, max(1, steps // max(1, (max(pf_end - pf, 0) + line - 1) // line))


@njit(fastmath=True, nogil=True, cache=True)
def block_scores(buf, boff, bstride, rows, cm, cstride, kp, width, s, sstride, x, pf, pf_end):
    """s[k * sstride + r] = sum_j buf[boff + r * bstride + j] * cm[k * cstride + j] for r < rows rounded up
    to 4 (the buffer's rows past `rows` must hold finite numbers), k < kp (a multiple of 4), j < width
    (a multiple of 16): the block's scores, prototype-major. Register tile: 4 rows x 4 prototypes,
    16 accumulators.
    Meanwhile x[pf:pf_end] (flat; the kernel's next block) is prefetched, one cache line every few
    inner iterations (evenly over the GEMM: a burst would hold every line-fill buffer and stall the
    GEMM's own loads), so the next block's read from memory overlaps this block's arithmetic."""
    line, every = _prefetch_every(x, ((rows + 3) // 4) * (kp // 4) * (width // W), pf, pf_end)
    count = every
    for r in range(0, rows, 4):
        x0o = boff + r * bstride
        x1o = x0o + bstride
        x2o = x1o + bstride
        x3o = x2o + bstride
        for k in range(0, kp, 4):
            c0o = k * cstride
            c1o = c0o + cstride
            c2o = c1o + cstride
            c3o = c2o + cstride
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = vzero()
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = vzero()
            for j in range(0, width, W):
                count -= 1
                if count == 0:
                    count = every
                    if pf < pf_end:
                        prefetch(x, pf)
                        pf += line
                x0 = vload(buf, x0o + j)
                x1 = vload(buf, x1o + j)
                x2 = vload(buf, x2o + j)
                x3 = vload(buf, x3o + j)
                c0 = vload(cm, c0o + j)
                c1 = vload(cm, c1o + j)
                c2 = vload(cm, c2o + j)
                c3 = vload(cm, c3o + j)
                a00 = vfma(x0, c0, a00)
                a01 = vfma(x0, c1, a01)
                a02 = vfma(x0, c2, a02)
                a03 = vfma(x0, c3, a03)
                a10 = vfma(x1, c0, a10)
                a11 = vfma(x1, c1, a11)
                a12 = vfma(x1, c2, a12)
                a13 = vfma(x1, c3, a13)
                a20 = vfma(x2, c0, a20)
                a21 = vfma(x2, c1, a21)
                a22 = vfma(x2, c2, a22)
                a23 = vfma(x2, c3, a23)
                a30 = vfma(x3, c0, a30)
                a31 = vfma(x3, c1, a31)
                a32 = vfma(x3, c2, a32)
                a33 = vfma(x3, c3, a33)
            vstore_sums4x4(s, k * sstride + r, sstride, a00, a01, a02, a03, a10, a11, a12, a13,
                           a20, a21, a22, a23, a30, a31, a32, a33)


@njit(fastmath=True, nogil=True, cache=True)
def block_pool(buf, boff, bstride, rows, w, wt_stride, wk_stride, nt, kp, width, acc, at_stride, ak_stride, scale,
               st_stride, x, pf, pf_end):
    """For t < nt, k < kp (a multiple of 4), j < width (a multiple of COLS):
        acc[t * at_stride + k * ak_stride + j] = acc[...] * scale[t * st_stride + k]
            + sum_{r < rows} w[t * wt_stride + k * wk_stride + r] * buf[boff + r * bstride + j]
    The block's sum is formed in float32 registers (4 prototypes x 64 columns, 16 accumulators,
    starting from zero) and added once into acc (float32 or float64). x[pf:pf_end] is prefetched
    meanwhile, as in block_scores."""
    line, every = _prefetch_every(x, (width // COLS) * nt * (kp // 4) * rows, pf, pf_end)
    count = every
    for j in range(0, width, COLS):
        for t in range(nt):
            for k in range(0, kp, 4):
                a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = vzero()
                a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = vzero()
                wo = t * wt_stride + k * wk_stride
                xo = boff + j
                for r in range(rows):
                    count -= 1
                    if count == 0:
                        count = every
                        if pf < pf_end:
                            prefetch(x, pf)
                            pf += line
                    x0 = vload(buf, xo)
                    x1 = vload(buf, xo + 16)
                    x2 = vload(buf, xo + 32)
                    x3 = vload(buf, xo + 48)
                    w0 = vbcast_at(w, wo)
                    w1 = vbcast_at(w, wo + wk_stride)
                    w2 = vbcast_at(w, wo + 2 * wk_stride)
                    w3 = vbcast_at(w, wo + 3 * wk_stride)
                    a00 = vfma(w0, x0, a00)
                    a01 = vfma(w0, x1, a01)
                    a02 = vfma(w0, x2, a02)
                    a03 = vfma(w0, x3, a03)
                    a10 = vfma(w1, x0, a10)
                    a11 = vfma(w1, x1, a11)
                    a12 = vfma(w1, x2, a12)
                    a13 = vfma(w1, x3, a13)
                    a20 = vfma(w2, x0, a20)
                    a21 = vfma(w2, x1, a21)
                    a22 = vfma(w2, x2, a22)
                    a23 = vfma(w2, x3, a23)
                    a30 = vfma(w3, x0, a30)
                    a31 = vfma(w3, x1, a31)
                    a32 = vfma(w3, x2, a32)
                    a33 = vfma(w3, x3, a33)
                    wo += 1
                    xo += bstride
                so = t * st_stride + k
                o = t * at_stride + k * ak_stride + j
                vaccumulate(acc, o, a00, scale[so])
                vaccumulate(acc, o + 16, a01, scale[so])
                vaccumulate(acc, o + 32, a02, scale[so])
                vaccumulate(acc, o + 48, a03, scale[so])
                o += ak_stride
                vaccumulate(acc, o, a10, scale[so + 1])
                vaccumulate(acc, o + 16, a11, scale[so + 1])
                vaccumulate(acc, o + 32, a12, scale[so + 1])
                vaccumulate(acc, o + 48, a13, scale[so + 1])
                o += ak_stride
                vaccumulate(acc, o, a20, scale[so + 2])
                vaccumulate(acc, o + 16, a21, scale[so + 2])
                vaccumulate(acc, o + 32, a22, scale[so + 2])
                vaccumulate(acc, o + 48, a23, scale[so + 2])
                o += ak_stride
                vaccumulate(acc, o, a30, scale[so + 3])
                vaccumulate(acc, o + 16, a31, scale[so + 3])
                vaccumulate(acc, o + 32, a32, scale[so + 3])
                vaccumulate(acc, o + 48, a33, scale[so + 3])


@njit(nogil=True, cache=True)
def aligned_zeros(n, dtype):
    """n zeros of dtype whose first element starts a 64-byte cache line, so that every 16-lane
    vector at a multiple-of-16 index (every row of the kernels' buffers) is one line. numba aligns
    its arrays to 32 bytes only, so about half of them split every vector load and store across two
    lines (PANTHER's pass 36.2 -> 29.9 ms once aligned)."""
    raw = np.zeros(n + 64, dtype=dtype)
    off = (64 - raw.ctypes.data % 64) % 64 // raw.itemsize
    return raw[off:off + n]


@njit(fastmath=True, nogil=True, cache=True)
def load_row(x, fmt, row, d, out, o):
    """out[o:o+d] = row `row` of x (float32, or float16/bfloat16 bits), converted; returns the
    float32 sum of its squares."""
    src = row * d
    full = d - d % W
    sq = vzero()
    for j in range(0, full, W):
        v = vload_src(x, src + j, fmt)
        vstore(out, o + j, v)
        sq = vfma(v, v, sq)
    tot = vhsum(sq)
    for j in range(full, d):
        v1 = load_src(x, src + j, fmt)
        out[o + j] = v1
        tot += v1 * v1
    return tot


@njit(fastmath=True, nogil=True, cache=True)
def load_row_centred(x, fmt, row, d, shift, out, o, o2):
    """out[o:o+d] = x' = row `row` of x (converted as load_row) minus shift, out[o2:o2+d] = x'^2."""
    src = row * d
    full = d - d % W
    for j in range(0, full, W):
        v = vsub(vload_src(x, src + j, fmt), vload(shift, j))
        vstore(out, o + j, v)
        vstore(out, o2 + j, vmul(v, v))
    for j in range(full, d):
        v1 = load_src(x, src + j, fmt) - shift[j]
        out[o + j] = v1
        out[o2 + j] = v1 * v1


@njit(nogil=True, cache=True)
def convert(x, fmt):
    """x (float32, or float16/bfloat16 bits as uint16) -> float32, through the kernels' converter (tests)."""
    flat = x.reshape(-1)
    out = np.empty(flat.shape[0], dtype=np.float32)
    load_row(flat, fmt, 0, flat.shape[0], out, 0)
    return out


def parallel_kernel(func):
    """`func` (a kernel whose prange runs over work items) compiled by numba with the kernels'
    options, one dispatcher per combination of its arrays' dtypes and ranks. A parallel dispatcher
    compiled its second specialisation into code that ran at half speed (PANTHER's pass 84-105 ms
    for the type compiled second vs 28-44 ms compiled first, whichever of float32 and float16 came
    first; numba 0.68; the serial kernel and one dispatcher per type were not affected), so each
    input type gets a dispatcher of its own, whose first specialisation it is."""
    kernels = {}

    @functools.wraps(func)
    def call(*args):
        key = tuple((a.dtype.str, a.ndim) for a in args if isinstance(a, np.ndarray))
        kernel = kernels.get(key)
        if kernel is None:
            kernel = kernels[key] = njit(parallel=dict(PRANGE_ONLY), fastmath=True, cache=True, nogil=True)(func)
        return kernel(*args)
    call.kernels = kernels
    return call


@contextmanager
def items_one_at_a_time():
    """Within: a numba prange hands its iterations (the kernels' work items) to threads one at a
    time instead of in one equal share each, so a thread slowed by other work on the machine takes
    fewer. Results do not change: each item writes only its own partials. (Set from Python: a
    kernel setting it itself could not be cached.)"""
    import numba

    before = numba.set_parallel_chunksize(1)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(before)


def kernel_input(x):
    """(C-contiguous array the kernels read, fmt): float32 as it is; float16 and bfloat16 (numpy or
    torch) as a uint16 view of the same memory; any other dtype converted to float32 (a copy)."""
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            raise ValueError("the numba kernels take CPU tensors")
        if x.dtype in (torch.float16, torch.bfloat16):
            bits = x.contiguous().view(torch.int16).numpy().view(np.uint16)
            return bits, (FMT_F16 if x.dtype == torch.float16 else FMT_BF16)
        x = x.numpy() if x.dtype == torch.float32 else x.float().numpy()
    x = np.asarray(x)
    if x.dtype == np.float16:
        return np.ascontiguousarray(x).view(np.uint16), FMT_F16
    return np.ascontiguousarray(x, dtype=np.float32), FMT_F32
