// Fused ProAlign attention, CUDA C++. One block streams `tiles` tiles of kRows rows of one slide:
// phase A, each warp computes a row's cosine similarity to the prototypes (lanes stride over d,
// 8 prototypes per pass, shuffle reduction); phase B, per tau, the per-row softmax over
// prototypes (pi) and the online softmax over rows (running max m, sum l); phase C, threads
// stride over d and fold p^T X of the tile into the block's accumulator slot, rescaled by
// exp(m_old - m_new); with over_prototypes the weights are the per-row softmax itself (nothing to
// rescale), and with `second` a second accumulator sums weight * (x - shift)^2. Partials are
// merged per slide on the host side (torch segment ops).
#include <math_constants.h>

#include "device_utils.cuh"
#include "proalign_attention.cuh"

namespace proalign {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kKChunk = 8;

template <typename T>
__global__ void __launch_bounds__(kThreads) partials_kernel(PartialsArgs a) {
  __shared__ float s[kRows][kMaxK];  // cosine similarities of the tile
  __shared__ float p[kRows][kMaxK];  // exp(s/tau - m_new), 0 outside the slide
  __shared__ float m_s[kMaxTau][kMaxK], l_s[kMaxTau][kMaxK], pi_s[kMaxTau][kMaxK], alpha_s[kMaxK];
  __shared__ float row_max[kRows], row_sum[kRows];

  const T* x = static_cast<const T*>(a.x);
  const int pid = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t start = a.prog_start[pid];
  const int64_t end = a.seg_end[a.prog_slide[pid]];
  const int d = a.d, k = a.k, kp = a.k_pad;

  for (int i = tid; i < a.n_tau * kMaxK; i += kThreads) {
    m_s[i / kMaxK][i % kMaxK] = a.over_prototypes ? 0.f : -CUDART_INF_F;
    l_s[i / kMaxK][i % kMaxK] = 0.f;
    pi_s[i / kMaxK][i % kMaxK] = 0.f;
  }
  __syncthreads();

  for (int tile = 0; tile < a.tiles; ++tile) {
    const int64_t r0 = start + int64_t(tile) * kRows;
    if (r0 >= end) break;  // uniform across the block
    const int rows = end - r0 < kRows ? int(end - r0) : kRows;

    // Phase A: similarities, one warp per row.
    for (int r = warp; r < rows; r += kWarps) {
      const T* xr = x + (r0 + r) * a.stride_x;
      float sq = 0.f;
      for (int kc = 0; kc < kp; kc += kKChunk) {
        float dot[kKChunk];
#pragma unroll
        for (int q = 0; q < kKChunk; ++q) dot[q] = 0.f;
        for (int j = lane; j < d; j += 32) {
          const float xv = to_float(xr[j]);
          if (kc == 0) sq += xv * xv;
#pragma unroll
          for (int q = 0; q < kKChunk; ++q) dot[q] += xv * a.cn[int64_t(kc + q) * d + j];
        }
#pragma unroll
        for (int q = 0; q < kKChunk; ++q) dot[q] = warp_sum(dot[q]);
        if (kc == 0) sq = warp_sum(sq);
        if (lane == 0) {
          const float inv = 1.f / fmaxf(sqrtf(sq), 1e-12f);
#pragma unroll
          for (int q = 0; q < kKChunk; ++q) s[r][kc + q] = dot[q] * inv;
        }
      }
    }
    __syncthreads();

    for (int t = 0; t < a.n_tau; ++t) {
      const float it = a.inv_tau[t];
      // Phase B1: per-row max and sum of the softmax over prototypes.
      if (tid < rows) {
        float mx = -CUDART_INF_F, sum = 0.f;
        for (int c = 0; c < k; ++c) mx = fmaxf(mx, s[tid][c] * it);
        for (int c = 0; c < k; ++c) sum += expf(s[tid][c] * it - mx);
        row_max[tid] = mx;
        row_sum[tid] = sum;
      }
      __syncthreads();
      // Phase B2: one thread per prototype: pi, running max, weights, running sum.
      if (tid < kp) {
        float* acc_scale = &alpha_s[tid];
        if (tid < k && a.over_prototypes) {
          float l_add = 0.f;
          for (int r = 0; r < kRows; ++r) {
            const float w = r < rows ? expf(s[r][tid] * it - row_max[r]) / row_sum[r] : 0.f;
            p[r][tid] = w;
            l_add += w;
          }
          pi_s[t][tid] += l_add;
          l_s[t][tid] += l_add;
          *acc_scale = 1.f;
        } else if (tid < k) {
          float pi_add = 0.f, mt = -CUDART_INF_F;
          for (int r = 0; r < rows; ++r) {
            const float z = s[r][tid] * it;
            pi_add += expf(z - row_max[r]) / row_sum[r];
            mt = fmaxf(mt, z);
          }
          const float m_old = m_s[t][tid], m_new = fmaxf(m_old, mt);
          const float alpha = expf(m_old - m_new);  // 0 on the first tile
          float l_add = 0.f;
          for (int r = 0; r < kRows; ++r) {
            const float w = r < rows ? expf(s[r][tid] * it - m_new) : 0.f;
            p[r][tid] = w;
            l_add += w;
          }
          pi_s[t][tid] += pi_add;
          l_s[t][tid] = l_s[t][tid] * alpha + l_add;
          m_s[t][tid] = m_new;
          *acc_scale = alpha;
        } else {
          for (int r = 0; r < kRows; ++r) p[r][tid] = 0.f;
          *acc_scale = 0.f;
        }
      }
      __syncthreads();
      // Phase C: acc[k][j] = alpha_k acc[k][j] + sum_r p[r][k] x[r][j], threads over j.
      float* acc = a.acc + (int64_t(pid) * a.n_tau + t) * kp * d;
      float* acc2 = a.second ? a.acc2 + (int64_t(pid) * a.n_tau + t) * kp * d : nullptr;
      for (int j = tid; j < d; j += kThreads) {
        const float sh = a.second ? a.shift[j] : 0.f;
        for (int kc = 0; kc < kp; kc += kKChunk) {
          float v[kKChunk], v2[kKChunk];
#pragma unroll
          for (int q = 0; q < kKChunk; ++q) {
            v[q] = tile == 0 ? 0.f : acc[int64_t(kc + q) * d + j] * alpha_s[kc + q];
            v2[q] = tile == 0 || !acc2 ? 0.f : acc2[int64_t(kc + q) * d + j] * alpha_s[kc + q];
          }
          for (int r = 0; r < rows; ++r) {
            const float xv = to_float(x[(r0 + r) * a.stride_x + j]);
            const float xs = (xv - sh) * (xv - sh);
#pragma unroll
            for (int q = 0; q < kKChunk; ++q) {
              v[q] += p[r][kc + q] * xv;
              if (acc2) v2[q] += p[r][kc + q] * xs;
            }
          }
#pragma unroll
          for (int q = 0; q < kKChunk; ++q) {
            acc[int64_t(kc + q) * d + j] = v[q];
            if (acc2) acc2[int64_t(kc + q) * d + j] = v2[q];
          }
        }
      }
      __syncthreads();
    }
  }

  for (int i = tid; i < a.n_tau * kp; i += kThreads) {
    const int t = i / kp, c = i % kp;
    const int64_t o = (int64_t(pid) * a.n_tau + t) * kp + c;
    a.m[o] = m_s[t][c];
    a.l[o] = l_s[t][c];
    a.pi[o] = pi_s[t][c];
  }
}

}  // namespace

cudaError_t launch_partials(const PartialsArgs& a, cudaStream_t stream) {
  if (a.k < 1 || a.k_pad > kMaxK || a.k_pad % kKChunk != 0 || a.n_tau < 1 || a.n_tau > kMaxTau)
    return cudaErrorInvalidValue;
  if (a.n_prog == 0) return cudaSuccess;
  const dim3 grid(a.n_prog), block(kThreads);
  switch (a.dtype) {
    case DType::kFloat32: partials_kernel<float><<<grid, block, 0, stream>>>(a); break;
    case DType::kFloat16: partials_kernel<__half><<<grid, block, 0, stream>>>(a); break;
    case DType::kBFloat16: partials_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace proalign
