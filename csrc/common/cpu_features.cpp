// cpu_features.cpp: see cpu_features.h.
#include "common/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kernelrl {

CpuIsa cpu_isa_supported() {
#if defined(__x86_64__) || defined(__i386__)
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) {
      return CpuIsa::kGeneric;
    }
    // libgcc's checks include the OS's support for the zmm state (XCR0).
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
      return CpuIsa::kAvx512;
    }
    return CpuIsa::kAvx2;
  }();
  return isa;
#else
  return CpuIsa::kGeneric;
#endif
}

CpuIsa cpu_isa_level() {
  const CpuIsa best = cpu_isa_supported();
  const char* env = std::getenv("KERNELRL_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "generic") == 0) return CpuIsa::kGeneric;
  if (env != nullptr && std::strcmp(env, "avx2") == 0 && best > CpuIsa::kAvx2) {
    return CpuIsa::kAvx2;
  }
  return best;
}

CpuIsa cpu_isa() {
  const CpuIsa level = cpu_isa_level();
  return level > CpuIsa::kAvx2 ? CpuIsa::kAvx2 : level;
}

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool bf16 = [] {
    __builtin_cpu_init();
    return cpu_isa_supported() == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  }();
  return bf16 && cpu_isa_level() == CpuIsa::kAvx512;
#else
  return false;
#endif
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kGeneric: break;
  }
  return "generic";
}

// 0 = not set: the OpenMP default (OMP_NUM_THREADS, else one per core) as seen at first use.
static std::atomic<int> g_num_threads{0};

int cpu_num_threads() {
#ifdef _OPENMP
  const int n = g_num_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
  static const int default_threads = omp_get_max_threads();
  return default_threads;
#else
  return 1;
#endif
}

void cpu_set_num_threads(int n) {
  if (n < 1) {
    throw std::invalid_argument("set_num_threads: n: expected >= 1, got " + std::to_string(n));
  }
  g_num_threads.store(n, std::memory_order_relaxed);  // process-wide, unlike omp_set_num_threads
}

}  // namespace kernelrl
