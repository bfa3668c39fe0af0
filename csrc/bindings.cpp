// bindings.cpp: the pybind11 module kernelrl._native, its module-wide functions, and every
// kernel family's bindings.
//
// Torch-free: every tensor arrives as an int (tensor.data_ptr()), with sizes and strides in
// elements; the Python side (kernelrl/ops) checks dtype, device, contiguity and shapes first.
// Kernels release the GIL while they run. Invalid arguments raise ValueError naming the
// argument; CUDA errors raise RuntimeError with the CUDA error string.
//
// The families are not listed here: CMake writes kernelrl_families.inc (in the build tree) with
// one KERNELRL_FAMILY(<family>) line per csrc/<family>/bind.cpp, and each family's
// bind_<family> (common/bind.h) adds its functions and its section of the module doc.
#include <pybind11/pybind11.h>

#include <string>

#include "common/bind.h"
#include "common/cpu_features.h"
#include "common/dtype.h"
#ifdef KERNELRL_WITH_CUDA
#include "common/cuda_info.h"
#endif

#ifndef KERNELRL_VERSION
#define KERNELRL_VERSION "0.0.0+unknown"
#endif

namespace kernelrl {
#define KERNELRL_FAMILY(family) void bind_##family(pybind11::module_& m);
#include "kernelrl_families.inc"
#undef KERNELRL_FAMILY
}  // namespace kernelrl

namespace {

constexpr const char* kModuleDoc = R"doc(kernelrl native kernels: C++ CPU twins and (if built) CUDA.

Pointers are ints (tensor.data_ptr()); sizes and strides are in elements. dtype codes:
0 = float32, 1 = float16, 2 = bfloat16. Each family <f> has <f>_<step>_cpu functions and CUDA
twins <f>_<step>_cuda taking the same arguments plus a stream (a cudaStream_t as int), on device
pointers, asynchronous; in a build without CUDA the _cuda functions raise RuntimeError.
Invalid arguments raise ValueError naming the argument. The families:
)doc";

}  // namespace

PYBIND11_MODULE(_native, m) {
  namespace bind = kernelrl::bind;
  using pybind11::arg;
  m.doc() = kModuleDoc;
  m.attr("__version__") = KERNELRL_VERSION;

#ifdef KERNELRL_WITH_CUDA
  m.def("has_cuda", [] { return true; }, "True: this build has the CUDA kernels.");
  m.def("cuda_device_count", &kernelrl::cuda_device_count,
        "Number of visible CUDA devices; 0 without a driver or GPU (never raises).");
#else
  m.def("has_cuda", [] { return false; }, "False: this build has no CUDA kernels.");
  m.def("cuda_device_count", [] { return 0; }, "0: this build has no CUDA kernels.");
#endif

  m.def("cpu_isa", [] { return std::string(kernelrl::cpu_isa_name(kernelrl::cpu_isa())); },
        "Instruction set the CPU kernels of every family but nf4 use now: 'avx2' or "
        "'generic'. The nf4 kernels also have AVX-512 variants; nf4_cpu_isa() gives their "
        "level: 'avx512', 'avx2' or 'generic'. KERNELRL_CPU_ISA=generic forces the baseline "
        "path, =avx2 caps the level at AVX2.");
  m.def("get_num_threads", &kernelrl::cpu_num_threads,
        "OpenMP threads the CPU kernels use (1 without OpenMP).");
  m.def("set_num_threads", &kernelrl::cpu_set_num_threads, arg("n"),
        "Sets the CPU kernels' thread count, process-wide.");
  bind::def_kernel(m, "_cast_cpu", &kernelrl::cast_cpu,
                   bind::args("src", "dst", "n", "src_dtype", "dst_dtype"),
                   "Test helper: converts n elements between dtype codes with the kernels' "
                   "conversions.");

#define KERNELRL_FAMILY(family) kernelrl::bind_##family(m);
#include "kernelrl_families.inc"
#undef KERNELRL_FAMILY
}
