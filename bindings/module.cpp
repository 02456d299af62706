// proalign._C: the C++ tile engine (engine/, always built) and, when nvcc was found at build time,
// the CUDA C++ kernels of csrc/.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_engine(py::module_& mod);
#ifdef PROALIGN_WITH_CUDA
void register_kernels(py::module_& mod);
#endif

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "proalign-engine native code: tile engine and CUDA C++ kernels";
  register_engine(mod);
#ifdef PROALIGN_WITH_CUDA
  mod.attr("HAS_CUDA_KERNELS") = true;
  register_kernels(mod);
#else
  mod.attr("HAS_CUDA_KERNELS") = false;
#endif
}
