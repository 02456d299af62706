// The CUDA C++ kernels of csrc/ in proalign._C, called with device pointers (tensor.data_ptr()).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "panther_moments.cuh"
#include "proalign_attention.cuh"

namespace py = pybind11;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;  // no driver or no GPU: 0, not an error
}

void proalign_partials(uintptr_t x, int dtype, int64_t stride_x, uintptr_t cn, uintptr_t inv_tau, int n_tau,
                       uintptr_t prog_slide, uintptr_t prog_start, uintptr_t seg_end, int n_prog, int d, int k,
                       int k_pad, int tiles, uintptr_t m, uintptr_t l, uintptr_t pi, uintptr_t acc, int over_prototypes,
                       int second, uintptr_t shift, uintptr_t acc2, uintptr_t stream) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (k_pad > proalign::kMaxK || k_pad % 8 != 0 || k < 1 || k > k_pad)
    throw std::invalid_argument("need 1 <= k <= k_pad <= 64 and k_pad a multiple of 8");
  if (n_tau < 1 || n_tau > proalign::kMaxTau) throw std::invalid_argument("between 1 and 8 taus per launch");
  proalign::PartialsArgs a{reinterpret_cast<const void*>(x), static_cast<proalign::DType>(dtype), stride_x,
                           reinterpret_cast<const float*>(cn), reinterpret_cast<const float*>(inv_tau), n_tau,
                           reinterpret_cast<const int32_t*>(prog_slide), reinterpret_cast<const int64_t*>(prog_start),
                           reinterpret_cast<const int64_t*>(seg_end), n_prog, d, k, k_pad, tiles,
                           reinterpret_cast<float*>(m), reinterpret_cast<float*>(l), reinterpret_cast<float*>(pi),
                           reinterpret_cast<float*>(acc), over_prototypes != 0, second != 0,
                           reinterpret_cast<const float*>(shift), reinterpret_cast<float*>(acc2)};
  if (second && (!shift || !acc2)) throw std::invalid_argument("second moments need shift and acc2");
  py::gil_scoped_release release;
  check(proalign::launch_partials(a, reinterpret_cast<cudaStream_t>(stream)), "proalign_partials launch");
}

void panther_moments(uintptr_t x, int dtype, int64_t stride_x, uintptr_t shift, uintptr_t a, uintptr_t b,
                     uintptr_t cst, int per_slide, uintptr_t prog_slide, uintptr_t prog_start, uintptr_t seg_end,
                     int n_prog, int d, int k, int k_pad, int tiles, uintptr_t nq, uintptr_t s1, uintptr_t s2,
                     uintptr_t stream) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (k_pad > proalign::kMaxK || k_pad % 8 != 0 || k < 1 || k > k_pad)
    throw std::invalid_argument("need 1 <= k <= k_pad <= 64 and k_pad a multiple of 8");
  if (d < 1) throw std::invalid_argument("need d >= 1");
  if (per_slide != 0 && per_slide != 1) throw std::invalid_argument("per_slide must be 0 or 1");
  proalign::MomentsArgs m{reinterpret_cast<const void*>(x), static_cast<proalign::DType>(dtype), stride_x,
                          reinterpret_cast<const float*>(shift), reinterpret_cast<const float*>(a),
                          reinterpret_cast<const float*>(b), reinterpret_cast<const float*>(cst), per_slide,
                          reinterpret_cast<const int32_t*>(prog_slide), reinterpret_cast<const int64_t*>(prog_start),
                          reinterpret_cast<const int64_t*>(seg_end), n_prog, d, k, k_pad, tiles,
                          reinterpret_cast<float*>(nq), reinterpret_cast<float*>(s1), reinterpret_cast<float*>(s2)};
  py::gil_scoped_release release;
  check(proalign::launch_moments(m, reinterpret_cast<cudaStream_t>(stream)), "panther_moments launch");
}

}  // namespace

void register_kernels(py::module_& mod) {
  mod.def("device_count", &device_count, "CUDA devices visible to the CUDA runtime (0 when none)");
  mod.def("proalign_partials", &proalign_partials, "Launch the fused ProAlign partials kernel (device pointers)");
  mod.def("panther_moments", &panther_moments, "Launch the fused PANTHER E-step moments kernel (device pointers)");
  mod.attr("ROWS_PER_TILE") = proalign::kRows;
  mod.attr("MAX_K") = proalign::kMaxK;
  mod.attr("MAX_TAUS") = proalign::kMaxTau;
}
