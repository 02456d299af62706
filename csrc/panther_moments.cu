// Fused PANTHER E-step moments, CUDA C++. One block streams `tiles` tiles of kRows rows of one
// slide: phase A, each warp computes a row's log-likelihood under the components (lanes stride
// over d, 8 components per pass, shuffle reduction); phase B, one thread per row turns them into
// responsibilities (softmax over components, max-subtracted); phase C, threads stride over d and
// fold q^T X' and q^T X'^2 of the tile into the block's partial slot. q is normalised per row, so
// partials add up without rescaling; they are summed per slide on the host side.
#include <math_constants.h>

#include "device_utils.cuh"
#include "panther_moments.cuh"

namespace proalign {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kKChunk = 8;

// At least 3 blocks per SM: caps registers at 85, which ptxas meets without spilling (its default
// cap for 256 threads spills on sm_80).
template <typename T>
__global__ void __launch_bounds__(kThreads, 3) moments_kernel(MomentsArgs a) {
  // Log-likelihoods of the tile, overwritten in place by the responsibilities. +1 column: the
  // thread-per-row passes of phase B hit distinct banks.
  __shared__ float w[kRows][kMaxK + 1];
  __shared__ float nq_s[kMaxK];

  const T* x = static_cast<const T*>(a.x);
  const int pid = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int slide = a.prog_slide[pid];
  const int64_t start = a.prog_start[pid];
  const int64_t end = a.seg_end[slide];
  const int d = a.d, k = a.k, kp = a.k_pad;
  const int64_t par = a.per_slide ? slide : 0;
  const float* A = a.a + par * kp * d;
  const float* B = a.b + par * kp * d;
  const float* cst = a.cst + par * kp;
  float* s1 = a.s1 + int64_t(pid) * kp * d;
  float* s2 = a.s2 + int64_t(pid) * kp * d;

  for (int c = tid; c < kMaxK; c += kThreads) nq_s[c] = 0.f;
  __syncthreads();

  for (int tile = 0; tile < a.tiles; ++tile) {
    const int64_t r0 = start + int64_t(tile) * kRows;
    if (r0 >= end) break;  // uniform across the block
    const int rows = end - r0 < kRows ? int(end - r0) : kRows;

    // Phase A: log-likelihoods, one warp per row.
    for (int r = warp; r < rows; r += kWarps) {
      const T* xr = x + (r0 + r) * a.stride_x;
      for (int kc = 0; kc < kp; kc += kKChunk) {
        float dot[kKChunk];
#pragma unroll
        for (int q = 0; q < kKChunk; ++q) dot[q] = 0.f;
        for (int j = lane; j < d; j += 32) {
          const float xv = to_float(xr[j]) - a.shift[j], x2 = xv * xv;
#pragma unroll
          for (int q = 0; q < kKChunk; ++q) {
            const int64_t o = int64_t(kc + q) * d + j;
            dot[q] += x2 * A[o] + xv * B[o];
          }
        }
#pragma unroll
        for (int q = 0; q < kKChunk; ++q) dot[q] = warp_sum(dot[q]);
        if (lane == 0) {
#pragma unroll
          for (int q = 0; q < kKChunk; ++q) w[r][kc + q] = dot[q] + cst[kc + q];
        }
      }
    }
    __syncthreads();

    // Phase B: responsibilities, one thread per row; padded components get q = 0.
    if (tid < rows) {
      float mx = -CUDART_INF_F, sum = 0.f;
      for (int c = 0; c < k; ++c) mx = fmaxf(mx, w[tid][c]);
      for (int c = 0; c < k; ++c) {
        const float e = expf(w[tid][c] - mx);
        w[tid][c] = e;
        sum += e;
      }
      const float inv = 1.f / sum;
      for (int c = 0; c < k; ++c) w[tid][c] *= inv;
      for (int c = k; c < kp; ++c) w[tid][c] = 0.f;
    }
    __syncthreads();
    if (tid < k) {
      float add = 0.f;
      for (int r = 0; r < rows; ++r) add += w[r][tid];
      nq_s[tid] += add;
    }

    // Phase C: s1[c][j] += sum_r q[r][c] x'[r][j], s2 likewise with x'^2; threads over j.
    for (int j = tid; j < d; j += kThreads) {
      const float sh = a.shift[j];
      for (int kc = 0; kc < kp; kc += kKChunk) {
        float v1[kKChunk], v2[kKChunk];
#pragma unroll
        for (int q = 0; q < kKChunk; ++q) {
          const int64_t o = int64_t(kc + q) * d + j;
          v1[q] = tile == 0 ? 0.f : s1[o];
          v2[q] = tile == 0 ? 0.f : s2[o];
        }
        for (int r = 0; r < rows; ++r) {
          const float xv = to_float(x[(r0 + r) * a.stride_x + j]) - sh, x2 = xv * xv;
#pragma unroll
          for (int q = 0; q < kKChunk; ++q) {
            v1[q] += w[r][kc + q] * xv;
            v2[q] += w[r][kc + q] * x2;
          }
        }
#pragma unroll
        for (int q = 0; q < kKChunk; ++q) {
          const int64_t o = int64_t(kc + q) * d + j;
          s1[o] = v1[q];
          s2[o] = v2[q];
        }
      }
    }
    __syncthreads();
  }

  if (start >= end)  // a program without rows still owns its slot: zero it
    for (int64_t i = tid; i < int64_t(kp) * d; i += kThreads) s1[i] = s2[i] = 0.f;
  for (int c = tid; c < kp; c += kThreads) a.nq[int64_t(pid) * kp + c] = c < k ? nq_s[c] : 0.f;
}

}  // namespace

cudaError_t launch_moments(const MomentsArgs& a, cudaStream_t stream) {
  if (a.k < 1 || a.k > a.k_pad || a.k_pad > kMaxK || a.k_pad % kKChunk != 0 || a.d < 1) return cudaErrorInvalidValue;
  if (a.n_prog == 0) return cudaSuccess;
  const dim3 grid(a.n_prog), block(kThreads);
  switch (a.dtype) {
    case DType::kFloat32: moments_kernel<float><<<grid, block, 0, stream>>>(a); break;
    case DType::kFloat16: moments_kernel<__half><<<grid, block, 0, stream>>>(a); break;
    case DType::kBFloat16: moments_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace proalign
