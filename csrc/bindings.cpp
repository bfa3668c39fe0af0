// bindings.cpp: the pybind11 module kernelrl._native.
//
// Torch-free: every tensor arrives as an int (tensor.data_ptr()), with sizes and strides in
// elements; the Python side (kernelrl/ops) checks dtype, device, contiguity and shapes first.
// CPU functions release the GIL while they run. Invalid arguments raise ValueError naming the
// argument; CUDA errors raise RuntimeError with the CUDA error string.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/cpu_features.h"
#include "common/dtype.h"
#include "logprobs/logprobs.h"
#ifdef KERNELRL_WITH_CUDA
#include "common/cuda_info.h"
#endif

#ifndef KERNELRL_VERSION
#define KERNELRL_VERSION "0.0.0+unknown"
#endif

namespace py = pybind11;

namespace {

using kernelrl::DType;

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

constexpr const char* kModuleDoc = R"doc(kernelrl native kernels: C++ CPU twins and (if built) CUDA.

Pointers are ints (tensor.data_ptr()); sizes and strides are in elements. dtype codes for
logits / grad_logits: 0 = float32, 1 = float16, 2 = bfloat16. labels are int64 [N]; logp,
entropy, grad_logp, grad_entropy are float32 contiguous [N]; stats is float32 contiguous [N, 2].
A pointer of 0 means "absent" for entropy (forward: not computed) and grad_entropy (backward:
no entropy term).

logprobs, per row i with label y, logits x_j (j in [0, V)), T = 1 / inv_temperature, all relative
to the row max m = max_j x_j, d_j = (x_j - m) / T (one online pass):
  log s = log1p(sum_j e^{d_j} - 1)      (the max's own e^0 = 1 kept out of the sum)
  logp  = (x_y - m) / T - log s         (= log softmax(x / T)[y]; NaN if y is outside [0, V))
  H     = log s - sum_j e^{d_j} d_j / s (entropy of softmax(x / T))
  stats = (m, log s)                    (lse = m / T + log s)
  rows with y == ignore_index: logp = entropy = 0, stats = (0, 0).
Backward over a tile of n_cols columns holding vocab ids col_offset .. col_offset + n_cols - 1:
  log p_j = (x_j - m) / T - log s
  grad_x_j = inv_temperature * (g_i (1[y == col_offset + j] - p_j)
                                - ge_i (p_j > 0 ? p_j (log p_j + H_i) : 0))
  with g = grad_logp, ge = grad_entropy, H = entropy; ignored rows get 0, out-of-range labels NaN.
  grad_logits may alias logits (same pointer and row stride).
All arithmetic is fp32.
)doc";

void fwd_cpu(std::uintptr_t logits, std::uintptr_t labels, std::uintptr_t logp,
             std::uintptr_t stats, std::uintptr_t entropy, int64_t n_rows, int64_t n_cols,
             int64_t stride_row, int64_t dtype, float inv_temperature, int64_t ignore_index) {
  const DType dt = kernelrl::dtype_from_code(dtype, "logprobs_fwd_cpu", "dtype");
  kernelrl::logprobs_fwd_cpu(ptr<const void>(logits), ptr<const int64_t>(labels),
                             ptr<float>(logp), ptr<float>(stats), ptr<float>(entropy), n_rows,
                             n_cols, stride_row, dt, inv_temperature, ignore_index);
}

void bwd_cpu(std::uintptr_t logits, std::uintptr_t labels, std::uintptr_t stats,
             std::uintptr_t entropy, std::uintptr_t grad_logp, std::uintptr_t grad_entropy,
             std::uintptr_t grad_logits, int64_t n_rows, int64_t n_cols, int64_t vocab_size,
             int64_t col_offset, int64_t stride_row, int64_t stride_grad_row, int64_t dtype,
             float inv_temperature, int64_t ignore_index) {
  const DType dt = kernelrl::dtype_from_code(dtype, "logprobs_bwd_cpu", "dtype");
  kernelrl::logprobs_bwd_cpu(ptr<const void>(logits), ptr<const int64_t>(labels),
                             ptr<const float>(stats), ptr<const float>(entropy),
                             ptr<const float>(grad_logp), ptr<const float>(grad_entropy),
                             ptr<void>(grad_logits), n_rows, n_cols, vocab_size, col_offset,
                             stride_row, stride_grad_row, dt, inv_temperature, ignore_index);
}

#ifdef KERNELRL_WITH_CUDA
void fwd_cuda(std::uintptr_t logits, std::uintptr_t labels, std::uintptr_t logp,
              std::uintptr_t stats, std::uintptr_t entropy, int64_t n_rows, int64_t n_cols,
              int64_t stride_row, int64_t dtype, float inv_temperature, int64_t ignore_index,
              std::uintptr_t stream) {
  const DType dt = kernelrl::dtype_from_code(dtype, "logprobs_fwd_cuda", "dtype");
  kernelrl::logprobs_fwd_cuda(ptr<const void>(logits), ptr<const int64_t>(labels),
                              ptr<float>(logp), ptr<float>(stats), ptr<float>(entropy), n_rows,
                              n_cols, stride_row, dt, inv_temperature, ignore_index,
                              ptr<void>(stream));
}

void bwd_cuda(std::uintptr_t logits, std::uintptr_t labels, std::uintptr_t stats,
              std::uintptr_t entropy, std::uintptr_t grad_logp, std::uintptr_t grad_entropy,
              std::uintptr_t grad_logits, int64_t n_rows, int64_t n_cols, int64_t vocab_size,
              int64_t col_offset, int64_t stride_row, int64_t stride_grad_row, int64_t dtype,
              float inv_temperature, int64_t ignore_index, std::uintptr_t stream) {
  const DType dt = kernelrl::dtype_from_code(dtype, "logprobs_bwd_cuda", "dtype");
  kernelrl::logprobs_bwd_cuda(ptr<const void>(logits), ptr<const int64_t>(labels),
                              ptr<const float>(stats), ptr<const float>(entropy),
                              ptr<const float>(grad_logp), ptr<const float>(grad_entropy),
                              ptr<void>(grad_logits), n_rows, n_cols, vocab_size, col_offset,
                              stride_row, stride_grad_row, dt, inv_temperature, ignore_index,
                              ptr<void>(stream));
}
#endif

void cast_cpu(std::uintptr_t src, std::uintptr_t dst, int64_t n, int64_t src_dtype,
              int64_t dst_dtype) {
  kernelrl::cast_cpu(ptr<const void>(src), ptr<void>(dst), n,
                     kernelrl::dtype_from_code(src_dtype, "_cast_cpu", "src_dtype"),
                     kernelrl::dtype_from_code(dst_dtype, "_cast_cpu", "dst_dtype"));
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  using py::arg;
  using release_gil = py::call_guard<py::gil_scoped_release>;
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
        "Instruction set the CPU kernels use now: 'avx2' or 'generic' "
        "(KERNELRL_CPU_ISA=generic forces the baseline path).");
  m.def("get_num_threads", &kernelrl::cpu_num_threads,
        "OpenMP threads the CPU kernels use (1 without OpenMP).");
  m.def("set_num_threads", &kernelrl::cpu_set_num_threads, arg("n"),
        "Sets the CPU kernels' thread count, process-wide.");

  m.def("logprobs_fwd_cpu", &fwd_cpu, release_gil(),
        arg("logits"), arg("labels"), arg("logp"), arg("stats"), arg("entropy"),
        arg("n_rows"), arg("n_cols"), arg("stride_row"), arg("dtype"),
        arg("inv_temperature"), arg("ignore_index"),
        "Forward on CPU: logp, stats (m, log s) and (if entropy != 0) entropy per row. "
        "See the module doc.");
  m.def("logprobs_bwd_cpu", &bwd_cpu, release_gil(),
        arg("logits"), arg("labels"), arg("stats"), arg("entropy"), arg("grad_logp"),
        arg("grad_entropy"), arg("grad_logits"), arg("n_rows"), arg("n_cols"),
        arg("vocab_size"), arg("col_offset"), arg("stride_row"), arg("stride_grad_row"),
        arg("dtype"), arg("inv_temperature"), arg("ignore_index"),
        "Backward on CPU for a column tile; grad_logits may alias logits. See the module doc.");
#ifdef KERNELRL_WITH_CUDA
  m.def("logprobs_fwd_cuda", &fwd_cuda, release_gil(),
        arg("logits"), arg("labels"), arg("logp"), arg("stats"), arg("entropy"),
        arg("n_rows"), arg("n_cols"), arg("stride_row"), arg("dtype"),
        arg("inv_temperature"), arg("ignore_index"), arg("stream"),
        "Forward on CUDA (device pointers; stream is a cudaStream_t as int). Asynchronous.");
  m.def("logprobs_bwd_cuda", &bwd_cuda, release_gil(),
        arg("logits"), arg("labels"), arg("stats"), arg("entropy"), arg("grad_logp"),
        arg("grad_entropy"), arg("grad_logits"), arg("n_rows"), arg("n_cols"),
        arg("vocab_size"), arg("col_offset"), arg("stride_row"), arg("stride_grad_row"),
        arg("dtype"), arg("inv_temperature"), arg("ignore_index"), arg("stream"),
        "Backward on CUDA for a column tile; grad_logits may alias logits. Asynchronous.");
#endif

  m.def("_cast_cpu", &cast_cpu, release_gil(), arg("src"), arg("dst"), arg("n"),
        arg("src_dtype"), arg("dst_dtype"),
        "Test helper: converts n elements between dtype codes with the kernels' conversions.");
}
