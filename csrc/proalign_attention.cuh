// Fused ProAlign prototype attention (METHOD.md Step 5), CUDA C++ over a ragged batch of slides.
// Plain CUDA runtime, no torch headers: tensors arrive as device pointers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace proalign {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Per-program partials of the online softmax, laid out as the Triton kernel's:
// m, l, pi: (n_prog, n_tau, k_pad); acc: (n_prog, n_tau, k_pad, d). k_pad is a multiple of 8
// and cn (k_pad, d) is zero beyond the k real unit-norm prototypes.
struct PartialsArgs {
  const void* x;  // (sum N, d) rows of every slide, one after another; row stride stride_x elements
  DType dtype;
  int64_t stride_x;
  const float* cn;
  const float* inv_tau;  // (n_tau,)
  int n_tau;
  const int32_t* prog_slide;  // (n_prog,) slide of each program
  const int64_t* prog_start;  // (n_prog,) first row of each program
  const int64_t* seg_end;     // (n_slides,) one past each slide's last row
  int n_prog, d, k, k_pad, tiles;
  float *m, *l, *pi, *acc;
  // over=prototypes: the weights are each row's softmax over prototypes (no running max; m = 0).
  int over_prototypes;
  // moments=2: acc2 (as acc) sums weight * (x - shift)^2; shift (d,) is a fixed centre.
  int second;
  const float* shift;
  float* acc2;
};

constexpr int kMaxK = 64;
constexpr int kMaxTau = 8;
constexpr int kRows = 64;  // rows per tile; a program handles `tiles` consecutive tiles

// Launches the partials kernel on `stream`; returns the launch's error code.
cudaError_t launch_partials(const PartialsArgs& a, cudaStream_t stream);

}  // namespace proalign
