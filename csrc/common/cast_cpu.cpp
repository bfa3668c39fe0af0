// cast_cpu.cpp: dtype conversion over a buffer (see dtype.h). Used by tests to check the
// vector and scalar conversion paths bit for bit against torch.
#include <cstdint>

#include "common/dtype.h"
#include "common/simd.h"

namespace kernelrl {
namespace {

template <class S, class D>
void cast_typed(const S* src, D* dst, int64_t n) {
  int64_t i = 0;
  constexpr int W = 4;
  for (; i + W <= n; i += W) simd::store<W>(dst + i, simd::load<W>(src + i));
  for (; i < n; ++i) dst[i] = from_float<D>(to_float(src[i]));
}

template <class S>
void cast_from(const S* src, void* dst, int64_t n, DType dst_dtype) {
  switch (dst_dtype) {
    case DType::kFloat32: return cast_typed(src, static_cast<float*>(dst), n);
    case DType::kFloat16: return cast_typed(src, static_cast<half_t*>(dst), n);
    case DType::kBFloat16: return cast_typed(src, static_cast<bfloat16_t*>(dst), n);
  }
}

}  // namespace

void cast_cpu(const void* src, void* dst, int64_t n, DType src_dtype, DType dst_dtype) {
  if (n < 0) throw std::invalid_argument("cast_cpu: n: expected >= 0, got " + std::to_string(n));
  if (n == 0) return;
  if (src == nullptr) throw std::invalid_argument("cast_cpu: src: expected non-null, got 0");
  if (dst == nullptr) throw std::invalid_argument("cast_cpu: dst: expected non-null, got 0");
  switch (src_dtype) {
    case DType::kFloat32: return cast_from(static_cast<const float*>(src), dst, n, dst_dtype);
    case DType::kFloat16: return cast_from(static_cast<const half_t*>(src), dst, n, dst_dtype);
    case DType::kBFloat16: return cast_from(static_cast<const bfloat16_t*>(src), dst, n, dst_dtype);
  }
}

}  // namespace kernelrl
