// cpu_features.h: run-time choice of the CPU kernels' instruction set.
//
// The module is compiled for baseline x86-64 (no -march flags). Kernels that gain from wider
// vectors are instantiated twice, once plain and once inside __attribute__((target("avx2,fma")))
// wrappers, and pick one per call with cpu_isa(). Kernels with an AVX-512 variant (nf4) are
// instantiated inside target("avx512f,avx512bw,avx512vl,...") wrappers as well and pick with
// cpu_isa_level(); cpu_has_avx512_bf16() says whether their AVX512-BF16 instructions may run.
//
// Levels: generic (baseline), avx2 (AVX2 + FMA), avx512 (AVX2 + FMA + AVX512F/BW/VL, with OS
// support for the zmm state). KERNELRL_CPU_ISA lowers the level: =generic forces the baseline
// path (tests use it to cover both paths); =avx2 asks for at most AVX2+FMA; =avx512 (or unset)
// uses the best the CPU has. A level the CPU lacks falls back to the best it has.
#pragma once

namespace kernelrl {

enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The best level this CPU supports, ignoring the environment. Cached.
CpuIsa cpu_isa_supported();
// What the AVX2-tier kernels use now: generic or avx2 (cpu_isa_level(), capped at kAvx2), so
// that `cpu_isa() == CpuIsa::kAvx2` keeps selecting their AVX2 variant on AVX-512 CPUs.
CpuIsa cpu_isa();
// The full level the kernels with an AVX-512 variant use now: cpu_isa_supported(), lowered by
// $KERNELRL_CPU_ISA.
CpuIsa cpu_isa_level();
// AVX512-BF16 (vdpbf16ps, vcvtne2ps2bf16) is supported and cpu_isa_level() is kAvx512.
bool cpu_has_avx512_bf16();
const char* cpu_isa_name(CpuIsa isa);

// OpenMP threads the CPU kernels use: the value given to cpu_set_num_threads (process-wide, for
// every calling thread), else the OpenMP default; 1 when built without OpenMP.
int cpu_num_threads();
void cpu_set_num_threads(int n);

}  // namespace kernelrl
