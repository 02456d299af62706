"""The fused ops: one folder per op with everything that defines, runs and checks it.

An op's folder holds `reference.py` (its float64 torch definition), `host.py` (planning a ragged
batch, merging the per-program partials, finishing in float64), `numba_cpu.py` (the CPU
backend) and `torch_op.py` (the CUDA C++ kernel registered with torch.library, with a CPU kernel
and a fake); its Triton kernel is `kernels/<op>.py`, its CUDA source `csrc/<op>.cu`, its tests
`tests/ops/test_<op>.py`. Shared by every op: `plans.py` (programs and work items),
`checks.py` (validating launch inputs), `runtime.py` (which runtimes are live), `numba_simd.py`
(the numba kernels' explicit 16-lane vectors, float16/bfloat16 conversion and block GEMMs).
"""
