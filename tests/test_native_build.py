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
    from proalign.kernels.proalign_attention import proalign_partials_kernel as kernel
    cc, xdtype = int(sys.argv[1]), sys.argv[2]
    sig = {"x_ptr": "*" + xdtype, "cn_ptr": "*fp32", "inv_tau_ptr": "*fp32", "prog_slide_ptr": "*i32",
           "prog_start_ptr": "*i64", "seg_end_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32", "pi_ptr": "*fp32",
           "acc_ptr": "*fp32", "d": "i32", "k": "i32", "stride_x": "i64", "T": "constexpr", "K_PAD": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "TILES": "constexpr"}
    src = ASTSource(fn=kernel, signature=sig, constexprs={"T": 2, "K_PAD": 32, "BLOCK_N": 64, "BLOCK_D": 64, "TILES": 4})
    out = triton.compile(src, target=GPUTarget("cuda", cc, 32))
    assert len(out.asm["cubin"]) > 10000 and f"sm_{cc}" in out.asm["ptx"]
    print("compiled", cc, xdtype)
""")


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("xdtype", ["fp32", "fp16", "bf16"])
def test_triton_kernel_compiles_ahead_of_time(cc, xdtype):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", AOT, str(cc), xdtype], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0 and f"compiled {cc}" in p.stdout, p.stderr[-3000:]


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
        _C.proalign_partials(0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 8, 3, 12, 1, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="taus"):
        _C.proalign_partials(0, 0, 1, 0, 0, 9, 0, 0, 0, 1, 8, 3, 8, 1, 0, 0, 0, 0, 0)
