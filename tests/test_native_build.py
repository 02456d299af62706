"""The compiled pieces build for the GPUs we target, even on a machine without one."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

AOT = textwrap.dedent("""
    import sys, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from proalign.kernels.panther_moments import panther_moments_kernel
    from proalign.kernels.proalign_attention import proalign_partials_kernel
    name, cc, xdtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    ragged = {"prog_slide_ptr": "*i32", "prog_start_ptr": "*i64", "seg_end_ptr": "*i64"}
    if name == "proalign":
        kernel = proalign_partials_kernel
        sig = {"x_ptr": "*" + xdtype, "cn_ptr": "*fp32", "inv_tau_ptr": "*fp32", **ragged, "shift_ptr": "*fp32",
               "m_ptr": "*fp32", "l_ptr": "*fp32", "pi_ptr": "*fp32", "acc_ptr": "*fp32", "acc2_ptr": "*fp32",
               "d": "i32", "k": "i32", "stride_x": "i64", "T": "constexpr", "K_PAD": "constexpr",
               "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "TILES": "constexpr", "OVER_PROTOTYPES": "constexpr",
               "SECOND": "constexpr"}
        over, second = (int(v) for v in sys.argv[4].split(","))  # the variant: over=prototypes, moments=2
        consts = {"T": 2, "K_PAD": 32, "BLOCK_N": 64, "BLOCK_D": 64, "TILES": 4, "OVER_PROTOTYPES": over,
                  "SECOND": second}
    else:
        kernel = panther_moments_kernel
        sig = {"x_ptr": "*" + xdtype, "shift_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "cst_ptr": "*fp32",
               **ragged, "nq_ptr": "*fp32", "s1_ptr": "*fp32", "s2_ptr": "*fp32", "d": "i32", "k": "i32",
               "stride_x": "i64", "per_slide": "i32", "K_PAD": "constexpr", "BLOCK_N": "constexpr",
               "BLOCK_D": "constexpr", "TILES": "constexpr"}
        consts = {"K_PAD": 32, "BLOCK_N": 64, "BLOCK_D": 64, "TILES": 4}
    out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", cc, 32))
    assert len(out.asm["cubin"]) > 10000 and f"sm_{cc}" in out.asm["ptx"]
    print("compiled", name, cc, xdtype)
""")


@pytest.mark.parametrize("kernel,variant", [("proalign", "0,0"), ("proalign", "1,1"), ("proalign", "0,1"),
                                            ("panther", "-")])
@pytest.mark.optional
@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("xdtype", ["fp32", "fp16", "bf16"])
def test_triton_kernel_compiles_ahead_of_time(kernel, variant, cc, xdtype):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", AOT, kernel, str(cc), xdtype, variant], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0 and f"compiled {kernel} {cc}" in p.stdout, p.stderr[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: proalign._C is not built")
def test_native_module_is_built_for_sm80_and_sm90():
    from proalign import _C

    assert _C.device_count() == torch.cuda.device_count()
    assert _C.MAX_K == 64 and _C.ROWS_PER_TILE == 64
    if shutil.which("cuobjdump"):
        elfs = subprocess.run(["cuobjdump", "--list-elf", _C.__file__], capture_output=True, text=True).stdout
        assert "sm_80" in elfs and "sm_90" in elfs, elfs


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: proalign._C is not built")
def test_native_launch_rejects_bad_arguments():
    from proalign import _C

    with pytest.raises(ValueError, match="k_pad"):
        _C.proalign_partials(0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 8, 3, 12, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="taus"):
        _C.proalign_partials(0, 0, 1, 0, 0, 9, 0, 0, 0, 1, 8, 3, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: proalign._C is not built")
def test_native_moments_launch_rejects_bad_arguments():
    from proalign import _C

    assert hasattr(_C, "panther_moments"), "proalign._C predates csrc/panther_moments.cu: rebuild (pip install -e .)"
    names = ("x dtype stride_x shift a b cst per_slide prog_slide prog_start seg_end n_prog d k k_pad tiles nq s1 s2 "
             "stream").split()
    ok = dict.fromkeys(names, 0) | {"stride_x": 1, "n_prog": 1, "d": 8, "k": 3, "k_pad": 8, "tiles": 1}
    for bad, match in (({"k_pad": 12}, "k_pad"), ({"k": 9}, "k_pad"), ({"k_pad": 72, "k": 3}, "k_pad"),
                       ({"per_slide": 2}, "per_slide"), ({"dtype": 3}, "dtype"), ({"d": 0}, "d >= 1")):
        with pytest.raises(ValueError, match=match):
            _C.panther_moments(*{**ok, **bad}.values())
