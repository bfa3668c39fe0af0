// cpu_features.h: run-time choice of the CPU kernels' instruction set.
//
// The module is compiled for baseline x86-64 (no -march flags). Kernels that gain from wider
// vectors are instantiated twice, once plain and once inside __attribute__((target("avx2,fma")))
// wrappers, and pick one per call with cpu_isa().
//
// KERNELRL_CPU_ISA=generic forces the baseline path (tests use it to cover both paths);
// KERNELRL_CPU_ISA=avx2 asks for AVX2+FMA and falls back to generic where the CPU lacks it.
#pragma once

namespace kernelrl {

enum class CpuIsa { kGeneric = 0, kAvx2 = 1 };

// What this CPU supports, ignoring the environment. Cached.
CpuIsa cpu_isa_supported();
// What the kernels use now: cpu_isa_supported(), lowered by $KERNELRL_CPU_ISA.
CpuIsa cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

// OpenMP threads the CPU kernels use: the value given to cpu_set_num_threads (process-wide, for
// every calling thread), else the OpenMP default; 1 when built without OpenMP.
int cpu_num_threads();
void cpu_set_num_threads(int n);

}  // namespace kernelrl
