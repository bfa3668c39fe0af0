// bind.cpp (nf4): the family's entry points in kernelrl._native (format and math in nf4.h; the
// conversions from Python and the CUDA-less behaviour in common/bind.h):
//   nf4_quantize_cpu                      weight -> packed codes + float32 absmax
//   nf4_double_quantize_cpu               float32 absmax -> 8-bit codes + nested absmax
//   nf4_repack_cpu                        standard layout -> the CPU fast path's tiles
//   nf4_dequantize_rows_cpu               rows [row0, row1) of the weight
//   nf4_gemv_cpu / nf4_gemv_cuda          y = x . W^T for up to 16 rows of x (+ stream)
//   nf4_cpu_isa                           the instruction set the CPU kernels use now
#include <pybind11/pybind11.h>

#include <string>

#include "common/bind.h"
#include "common/cpu_features.h"
#include "nf4/nf4.h"

namespace kernelrl {
namespace {

constexpr const char* kDoc = R"doc(nf4: 4-bit NF4 weights in bitsandbytes' format.

Quantize, dequantize rows, and the decode GEMV.

A weight [N, K] (n = N*K elements, row-major) is stored as data: uint8 [ceil(n/2)] (element i
in byte i/2, the high nibble when i is even), code: float32 [16] (the NF4 table, ascending), and
one scale per block of blocksize elements (32..4096, a power of two): absmax float32 [nblocks],
or, double-quantized (nested_absmax != 0), absmax uint8 [nblocks] with
  s_b = nested_code[absmax[b]] * nested_absmax[b / 256] + offset   (float32, product rounded).
w_i = code[c_i] * s_{i / blocksize} in float32. Quantize: absmax = max |w| per block, the code
index = #midpoints (code[j] + code[j+1]) / 2 below w * (1 / max(absmax, 1e-38)) (ties to the
lower code, NaN -> 15). GEMV: y [M, N] = x [M, K] . W^T, M <= 16, x and y contiguous in dtype,
float32 accumulation; with repacked_data / repacked_scales (from nf4_repack_cpu, needs
K % blocksize == 0) the CPU runs its AVX-512 tile kernel, else a row-by-row path. The CUDA GEMV
reads the standard layout (pass 0 for the repacked pointers).
)doc";

constexpr auto kQuantArgs = bind::args("weight", "data", "absmax", "code", "n", "blocksize",
                                       "dtype");
constexpr auto kDoubleQuantArgs = bind::args("absmax", "codes", "nested_absmax", "table",
                                             "nblocks", "offset");
constexpr auto kRepackArgs = bind::args("data", "absmax", "out_data", "out_scales", "n_rows",
                                        "n_cols", "blocksize", "double_quant");
constexpr auto kDequantArgs = bind::args("data", "absmax", "nested_absmax", "nested_code",
                                         "offset", "code", "out", "n_rows", "n_cols", "blocksize",
                                         "row0", "row1", "out_dtype");
constexpr auto kGemvArgs = bind::args("x", "y", "data", "absmax", "nested_absmax", "nested_code",
                                      "offset", "code", "repacked_data", "repacked_scales", "m",
                                      "n_rows", "n_cols", "blocksize", "dtype");

}  // namespace

void bind_nf4(pybind11::module_& m) {
  bind::append_doc(m, kDoc);
  bind::def_kernel(m, "nf4_quantize_cpu", &nf4_quantize_cpu, kQuantArgs,
                   "Quantizes n elements of dtype to NF4 codes (data) and float32 absmax, bit for "
                   "bit as the torch reference. See the module doc.");
  bind::def_kernel(m, "nf4_double_quantize_cpu", &nf4_double_quantize_cpu, kDoubleQuantArgs,
                   "Double quantization of float32 absmax [nblocks] given the offset: uint8 codes "
                   "into table (256 ascending values) and float32 nested_absmax per group of "
                   "256, bit for bit as format.double_quantize.");
  bind::def_kernel(m, "nf4_repack_cpu", &nf4_repack_cpu, kRepackArgs,
                   "The CPU GEMV's tile layout: out_data uint8 [ceil(N/16) * 8 * K], out_scales "
                   "[ceil(N/16) * 16 * K/blocksize] float32 (uint8 when double_quant). Needs "
                   "K % blocksize == 0.");
  bind::def_kernel(m, "nf4_dequantize_rows_cpu", &nf4_dequantize_rows_cpu, kDequantArgs,
                   "Rows [row0, row1) of the weight into out [row1 - row0, K] in out_dtype.");
  bind::def_kernel(m, "nf4_gemv_cpu", &nf4_gemv_cpu, kGemvArgs,
                   "y [m, N] = x [m, K] . W^T on CPU (m <= 16). See the module doc.");
  KERNELRL_DEF_CUDA(m, "nf4_gemv_cuda", nf4_gemv_cuda, kGemvArgs,
                    "y [m, N] = x [m, K] . W^T on CUDA (device pointers; repacked pointers 0; "
                    "stream is a cudaStream_t as int). Asynchronous.");
  m.def("nf4_cpu_isa", [] { return std::string(cpu_isa_name(cpu_isa_level())); },
        "Instruction set the nf4 CPU kernels use now: 'avx512', 'avx2' or 'generic' "
        "(KERNELRL_CPU_ISA lowers it); the GEMV's fast path needs 'avx512'.");
  m.def("nf4_cpu_has_bf16_dot", [] { return cpu_has_avx512_bf16(); },
        "Whether the nf4 CPU GEMV may use AVX512-BF16 dot products (bfloat16 x, m >= 4).");
}

}  // namespace kernelrl
