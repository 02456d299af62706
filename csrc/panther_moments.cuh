// Fused PANTHER E-step moments (METHOD.md "Baselines"), CUDA C++ over a ragged batch of slides.
// Plain CUDA runtime, no torch headers: tensors arrive as device pointers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "proalign_attention.cuh"  // DType, kMaxK, kRows

namespace proalign {

// Per-program partials, laid out as the Triton kernel's: nq (n_prog, k_pad); s1, s2
// (n_prog, k_pad, d). The log-likelihood of row x under component c, up to a per-row constant, is
// sum_j a[c][j] x'_j^2 + b[c][j] x'_j + cst[c] with x' = x - shift (proalign.aggregate.moments).
// a, b (P, k_pad, d) and cst (P, k_pad) hold P = 1 GMM (per_slide = 0) or one per slide
// (per_slide = 1); k_pad is a multiple of 8 and a, b are zero beyond the k real components.
struct MomentsArgs {
  const void* x;  // (sum N, d) rows of every slide, one after another; row stride stride_x elements
  DType dtype;
  int64_t stride_x;
  const float* shift;  // (d,)
  const float *a, *b, *cst;
  int per_slide;
  const int32_t* prog_slide;  // (n_prog,) slide of each program
  const int64_t* prog_start;  // (n_prog,) first row of each program
  const int64_t* seg_end;     // (n_slides,) one past each slide's last row
  int n_prog, d, k, k_pad, tiles;
  float *nq, *s1, *s2;
};

// Launches the moments kernel on `stream`; returns the launch's error code.
cudaError_t launch_moments(const MomentsArgs& a, cudaStream_t stream);

}  // namespace proalign
