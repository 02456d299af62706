// Device helpers shared by the kernels of csrc/: loads of any input dtype as float, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace proalign {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace proalign
