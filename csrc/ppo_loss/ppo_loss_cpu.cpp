// ppo_loss_cpu.cpp: the CPU kernels of the PPO / GRPO loss (math and contract in ppo_loss.h).
//
// Rows run in parallel (OpenMP, common/row_loop.h); one thread walks a row in chunks of kChunk
// tokens, whose inputs stay in L1 while several short passes read them:
//   mask:     the chunk's mask as fp32 (a uint8 mask converted into a buffer, a float32 one read
//             in place) and its sum (column 0), cut after its last W-group holding a real token.
//             Only that prefix is read by the passes (a chunk of padding costs its mask), and in
//             the backward the gradients past it are zero-filled;
//   forward:  tis (w into a buffer; columns 9, 10), policy (1 - 4, with pg w), values (5, 6),
//             entropy (7), ref (8), each accumulating its columns' m x terms (selected by real)
//             into 4 float64 lanes per column (simd::widen_sum), reduced at the end of the row;
//   backward: kl (g_kl into a buffer), d/dlogprobs (the policy terms and w recomputed),
//             d/dvalues, d/dentropy.
// A pass keeps only its own accumulators and constants live. Every row sums its tokens in one
// fixed order (float64 lane j of a column takes the tokens t = j mod 4, group by group), and a
// skipped run of padding would only have added +0: the sums depend neither on the thread count
// nor on how much padding was skipped. With a uint8 mask the count-like columns (m times 0 / 1)
// are integers, summed exactly in fp32 lanes over a chunk and then widened: the same sums. A
// token with |k| >= 2 makes its chunk's KL pass (forward and backward) run again with the exp
// (the series is exact enough below). The finish runs on the calling thread, float64, over the rows in order.
//
// Kernel bodies are templated on the element type, the lane count W and the mask kind, and
// compiled twice as in advantages_cpu.cpp: 4 lanes in plain functions and 8 lanes inside
// target("avx2,fma") wrappers, picked at run time by cpu_isa(). The passes are also templated on
// what they may skip (rollout_logprobs, the dual clip, the KL gradient), picked per chunk.
// Bytes moved: ppo_loss.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/row_loop.h"
#include "common/simd.h"
#include "ppo_loss/ppo_loss.h"

namespace kernelrl {
namespace {

using simd::D4;
constexpr int64_t kChunk = 512;  // tokens per chunk: ~10 inputs and 3 buffers of 2 KB, in L1/L2
static_assert(kChunk % 8 == 0 && kChunk / 4 * 255 < (1 << 24), "whole groups; exact counts");

// The inputs (nullptr: absent; advantages: [B] when adv_per_row) and the per-token scalars.
struct Inputs {
  const void *lp, *old, *adv, *mask, *val, *oldval, *ret, *ent, *ref, *roll;
  int64_t n_cols;
  bool mask_u8, adv_per_row;
  float lo, hi, dual_clip, value_clip, tis_cap;
  bool dual;  // dual_clip < +inf
};

// One row's inputs from token `offset` on, in the element type T.
template <class T>
struct Row {
  const T *lp, *old, *adv, *val, *oldval, *ret, *ent, *ref, *roll;  // adv null: per row
  float adv_row;
};

template <class T>
KR_INLINE const T* at(const void* p, int64_t offset) {
  return p ? static_cast<const T*>(p) + offset : nullptr;
}

template <class T>
KR_INLINE Row<T> row_at(const Inputs& in, int64_t i, int64_t start) {
  const int64_t o = i * in.n_cols + start;
  const bool per_row = in.adv_per_row;
  return Row<T>{at<T>(in.lp, o), at<T>(in.old, o), per_row ? nullptr : at<T>(in.adv, o),
                at<T>(in.val, o), at<T>(in.oldval, o), at<T>(in.ret, o), at<T>(in.ent, o),
                at<T>(in.ref, o), at<T>(in.roll, o),
                per_row ? to_float(static_cast<const T*>(in.adv)[i]) : 0.0f};
}

// ---- lanes ------------------------------------------------------------------------------------

template <int W> using F = simd::F<W>;
template <int W> using I = simd::I<W>;

// The lanes of the group at k of [0, len): W, or fewer at the end of a row.
template <int W>
KR_INLINE int lanes(int64_t len, int64_t k) {
  return static_cast<int>(std::min<int64_t>(W, len - k));
}

// n (1 <= n <= W) elements; the lanes past n read as 0 / are not written.
template <int W, class T>
KR_INLINE F<W> ld(const T* p, int n) {
  return n == W ? simd::load<W>(p) : simd::load_partial<W>(p, n);
}
template <int W, class T>
KR_INLINE void st(T* p, F<W> v, int n) {
  n == W ? simd::store<W>(p, v) : simd::store_partial<W>(p, v, n);
}

template <int W>
KR_INLINE F<W> bcast(float x) {
  F<W> v;
  for (int j = 0; j < W; ++j) v[j] = x;
  return v;
}

// x where real, +0 elsewhere (whatever x holds there: NaN and inf do not pass).
template <int W>
KR_INLINE F<W> keep(I<W> real, F<W> x) { return (F<W>)((I<W>)x & real); }

template <int W>
KR_INLINE bool any(I<W> v) {
  uint64_t words[W / 2];
  std::memcpy(words, &v, sizeof v);
  uint64_t r = 0;
  for (int j = 0; j < W / 2; ++j) r |= words[j];
  return r != 0;
}

// clip(x, lo, hi) for lo <= hi, as the Triton kernels' nested where: a NaN x stays NaN (and NaN
// bounds leave x). Written as max / min with the NaN rule of maxps / minps.
template <int W>
KR_INLINE F<W> clip(F<W> x, F<W> lo, F<W> hi) {
  const F<W> y = lo > x ? lo : x;
  return y > hi ? hi : y;
}

// 1/j! for j = 3 .. 16, from float64.
constexpr float kInvFact[17] = {
    0, 0, 0, float(1 / 6.0), float(1 / 24.0), float(1 / 120.0), float(1 / 720.0),
    float(1 / 5040.0), float(1 / 40320.0), float(1 / 362880.0), float(1 / 3628800.0),
    float(1 / 39916800.0), float(1 / 479001600.0), float(1 / 6227020800.0),
    float(1 / 87178291200.0), float(1 / 1307674368000.0), float(1 / 20922789888000.0)};

// sum_{j=2}^{16} (-k)^j / j! = exp(-k) - 1 + k for |k| < 2 (truncation < 1e-9 relative), by
// Horner as the Triton kernel's _k3.
template <int W>
KR_INLINE F<W> k3_series(F<W> k) {
  F<W> s = bcast<W>(kInvFact[16]);
#pragma GCC unroll 16
  for (int j = 15; j >= 3; --j) s = kInvFact[j] - k * s;
  s = 0.5f - k * s;
  return k * k * s;
}

// |k| >= 2, or NaN: where k3 and g_kl leave the series for the exp.
template <int W>
KR_INLINE I<W> k_large(F<W> k) { return ~((k < 0.0f ? -k : k) < 2.0f); }

// ---- sums ---------------------------------------------------------------------------------------

struct Sums { D4 col[kPpoNumCols]; };  // a row's sums, 4 float64 lanes per column (ppo_loss.h)

// A column of m [condition] terms (count, clipfrac, vf_clipfrac, tis_clipfrac). With a uint8
// mask every term is an integer below 256, so fp32 lanes sum a chunk exactly (< 2^24) and are
// widened once per chunk; a float mask's terms are widened per group. Either way a float64 lane
// holds the same exact sum as if every term had been widened.
template <int W, bool U8>
struct CountColumn {
  D4 wide;
  F<W> narrow{};
  KR_INLINE explicit CountColumn(D4 start) : wide(start) {}
  KR_INLINE void add(F<W> x) { U8 ? void(narrow += x) : void(wide += simd::widen_sum<W>(x)); }
  KR_INLINE D4 total() const { return U8 ? wide + simd::widen_sum<W>(narrow) : wide; }
};

// ---- the chunk's mask -------------------------------------------------------------------------

// Index past the last real token of p[0, n) (0: none), 8 bytes at a time over the padding.
KR_INLINE int64_t last_real(const uint8_t* p, int64_t n) {
  for (uint64_t w; n >= 8; n -= 8) {
    std::memcpy(&w, p + n - 8, 8);
    if (w != 0) break;
  }
  while (n > 0 && p[n - 1] == 0) --n;
  return n;
}
KR_INLINE int64_t last_real(const float* p, int64_t n) {  // -0.0 is padding, NaN a token
  for (uint64_t w[4]; n >= 8; n -= 8) {
    std::memcpy(w, p + n - 8, sizeof w);
    if ((w[0] | w[1] | w[2] | w[3]) & 0x7fffffff7fffffffull) break;
  }
  while (n > 0 && p[n - 1] == 0.0f) --n;
  return n;
}

// The mask of tokens [offset, offset + n) as fp32 in *m, and how many of them the passes take:
// up to the end of the last W-group holding a real token (0: the chunk is padding). Adds the
// chunk's sum of m to *count (column 0) if given.
template <int W, bool U8>
KR_INLINE int64_t chunk_mask(const Inputs& in, int64_t offset, int64_t n, float* buf,
                             const float** m, D4* count) {
  if constexpr (!U8) {
    const float* p = static_cast<const float*>(in.mask) + offset;
    const int64_t len = std::min(n, (last_real(p, n) + W - 1) / W * W);
    if (count) {
      D4 sum = *count;
      for (int64_t k = 0; k < len; k += W) {  // m on padding is +-0: adds nothing
        sum += simd::widen_sum<W>(ld<W>(p + k, lanes<W>(len, k)));
      }
      *count = sum;
    }
    *m = p;
    return len;
  } else {
    const uint8_t* p = static_cast<const uint8_t*>(in.mask) + offset;
    const int64_t len = std::min(n, (last_real(p, n) + W - 1) / W * W);
    F<W> sum{};
    for (int64_t k = 0; k < len; k += W) {
      uint8_t b[W] = {};
      const int lanes_k = lanes<W>(len, k);
      std::memcpy(b, p + k, lanes_k == W ? W : static_cast<size_t>(lanes_k));
      I<W> u;  // element by element: a uint8 vector would convert lane by lane
      for (int j = 0; j < W; ++j) u[j] = b[j];
      const F<W> v = __builtin_convertvector(u, F<W>);
      simd::store<W>(buf + k, v);
      sum += v;  // integers: exact
    }
    if (count) *count += simd::widen_sum<W>(sum);
    *m = buf;
    return len;
  }
}

// ---- forward passes over a chunk: tokens [0, len) of a Row, mask m ------------------------------

template <class T, int W, bool U8>
KR_INLINE void fwd_tis(const Inputs& in, const Row<T>& x, const float* m, int64_t len, Sums& s,
                       float* wbuf) {
  const F<W> cap = bcast<W>(in.tis_cap);
  D4 s9 = s.col[9];
  CountColumn<W, U8> s10(s.col[10]);
  for (int64_t k = 0; k < len; k += W) {
    const int n = lanes<W>(len, k);
    const F<W> mm = ld<W>(m + k, n);
    F<W> w = simd::exp<W>(ld<W>(x.old + k, n) - ld<W>(x.roll + k, n));
    const I<W> truncated = w > cap;
    w = w > cap ? cap : w;
    simd::store<W>(wbuf + k, w);
    const I<W> real = mm != 0.0f;
    s9 += simd::widen_sum<W>(keep<W>(real, mm * w));
    s10.add(keep<W>(real & truncated, mm));
  }
  s.col[9] = s9, s.col[10] = s10.total();
}

// The policy terms of n tokens at k: d, r, -A r, pg (dual clip included: DUAL, else capped is
// false, as with c = +inf), clipped / capped.
template <class T, int W, bool DUAL>
struct Policy {
  F<W> d, r, l1, pg;
  I<W> clipped, capped;
  KR_INLINE Policy(const Row<T>& x, int64_t k, int n, F<W> lo, F<W> hi, F<W> dual_clip) {
    d = ld<W>(x.lp + k, n) - ld<W>(x.old + k, n);
    const F<W> a = x.adv ? ld<W>(x.adv + k, n) : bcast<W>(x.adv_row);
    r = simd::exp<W>(d);
    const F<W> neg_a = -a;
    l1 = neg_a * r;
    const F<W> l2 = neg_a * clip<W>(r, lo, hi);
    clipped = l2 > l1;
    pg = l2 > l1 ? l2 : l1;
    if constexpr (DUAL) {
      const F<W> cap = neg_a * dual_clip;  // -c A
      capped = (a < 0.0f) & (pg > cap);
      pg = capped ? cap : pg;
    } else {
      capped = I<W>{};
    }
  }
};

template <class T, int W, bool U8, bool TIS, bool DUAL>
KR_INLINE void fwd_policy(const Inputs& in, const Row<T>& x, const float* m, int64_t len,
                          Sums& s, const float* wbuf) {
  const F<W> lo = bcast<W>(in.lo), hi = bcast<W>(in.hi), dual = bcast<W>(in.dual_clip);
  D4 s1 = s.col[1], s3 = s.col[3], s4 = s.col[4];
  CountColumn<W, U8> s2(s.col[2]);
  for (int64_t k = 0; k < len; k += W) {
    const int n = lanes<W>(len, k);
    const F<W> mm = ld<W>(m + k, n);
    const Policy<T, W, DUAL> p(x, k, n, lo, hi, dual);
    const F<W> pg = TIS ? p.pg * simd::load<W>(wbuf + k) : p.pg;
    const I<W> real = mm != 0.0f;
    s1 += simd::widen_sum<W>(keep<W>(real, mm * pg));
    s2.add(keep<W>(real & p.clipped, mm));
    s3 += simd::widen_sum<W>(keep<W>(real, mm * (p.d * p.d)));  // halved at the end of the row
    s4 += simd::widen_sum<W>(keep<W>(real, mm * p.r));
  }
  s.col[1] = s1, s.col[2] = s2.total(), s.col[3] = s3, s.col[4] = s4;
}

// The value term of n tokens at k: V - R, max(e^2, e_c^2) and vclipped.
template <class T, int W>
struct Value {
  F<W> err, vf;
  I<W> vclipped;
  KR_INLINE Value(const Row<T>& x, int64_t k, int n, F<W> value_clip) {
    const F<W> v = ld<W>(x.val + k, n), v_old = ld<W>(x.oldval + k, n);
    const F<W> ret = ld<W>(x.ret + k, n);
    err = v - ret;
    const F<W> err_clip = clip<W>(v, v_old - value_clip, v_old + value_clip) - ret;
    const F<W> vf1 = err * err, vf2 = err_clip * err_clip;
    vclipped = vf2 > vf1;
    vf = vf2 > vf1 ? vf2 : vf1;  // halved at the end of the row
  }
};

template <class T, int W, bool U8>
KR_INLINE void fwd_values(const Inputs& in, const Row<T>& x, const float* m, int64_t len,
                          Sums& s) {
  const F<W> value_clip = bcast<W>(in.value_clip);
  D4 s5 = s.col[5];
  CountColumn<W, U8> s6(s.col[6]);
  for (int64_t k = 0; k < len; k += W) {
    const int n = lanes<W>(len, k);
    const F<W> mm = ld<W>(m + k, n);
    const Value<T, W> v(x, k, n, value_clip);
    const I<W> real = mm != 0.0f;
    s5 += simd::widen_sum<W>(keep<W>(real, mm * v.vf));
    s6.add(keep<W>(real & v.vclipped, mm));
  }
  s.col[5] = s5, s.col[6] = s6.total();
}

template <class T, int W>
KR_INLINE void fwd_entropy(const Row<T>& x, const float* m, int64_t len, Sums& s) {
  D4 s7 = s.col[7];
  for (int64_t k = 0; k < len; k += W) {
    const int n = lanes<W>(len, k);
    const F<W> mm = ld<W>(m + k, n);
    s7 += simd::widen_sum<W>(keep<W>(mm != 0.0f, mm * ld<W>(x.ent + k, n)));
  }
  s.col[7] = s7;
}

// Column 8. Without LARGE, k3 is the series everywhere and the return value says whether a
// token had |k| >= 2 (or NaN); the caller then runs the chunk again WITH LARGE.
template <class T, int W, bool LARGE>
KR_INLINE bool fwd_ref(const Row<T>& x, const float* m, int64_t len, Sums& s) {
  D4 s8 = s.col[8];
  I<W> large{};
  for (int64_t k = 0; k < len; k += W) {
    const int n = lanes<W>(len, k);
    const F<W> mm = ld<W>(m + k, n);
    const F<W> kk = ld<W>(x.lp + k, n) - ld<W>(x.ref + k, n);
    F<W> k3 = k3_series<W>(kk);
    if constexpr (LARGE) {
      k3 = k_large<W>(kk) ? (simd::exp<W>(-kk) - 1.0f) + kk : k3;
    } else {
      large |= k_large<W>(kk);
    }
    s8 += simd::widen_sum<W>(keep<W>(mm != 0.0f, mm * k3));
  }
  s.col[8] = s8;
  return !LARGE && any<W>(large);
}

template <class T, int W, bool U8>
KR_INLINE void fwd_row(const Inputs& in, double* rows, int64_t i) {
  Sums s{};
  float mbuf[kChunk], wbuf[kChunk];
  for (int64_t start = 0; start < in.n_cols; start += kChunk) {
    const float* m;
    const int64_t len = chunk_mask<W, U8>(in, i * in.n_cols + start,
                                          std::min(kChunk, in.n_cols - start), mbuf, &m,
                                          &s.col[0]);
    if (len == 0) continue;
    const Row<T> x = row_at<T>(in, i, start);
    if (x.roll) {
      fwd_tis<T, W, U8>(in, x, m, len, s, wbuf);
      if (in.dual) fwd_policy<T, W, U8, true, true>(in, x, m, len, s, wbuf);
      else fwd_policy<T, W, U8, true, false>(in, x, m, len, s, wbuf);
    } else {
      if (in.dual) fwd_policy<T, W, U8, false, true>(in, x, m, len, s, wbuf);
      else fwd_policy<T, W, U8, false, false>(in, x, m, len, s, wbuf);
    }
    if (x.val) fwd_values<T, W, U8>(in, x, m, len, s);
    if (x.ent) fwd_entropy<T, W>(x, m, len, s);
    if (x.ref) {
      const D4 before = s.col[8];
      if (fwd_ref<T, W, false>(x, m, len, s)) {
        s.col[8] = before;
        fwd_ref<T, W, true>(x, m, len, s);
      }
    }
  }
  double* out = rows + i * kPpoNumCols;
  for (int64_t j = 0; j < kPpoNumCols; ++j) out[j] = simd::hsum(s.col[j]);
  out[3] *= 0.5;
  out[5] *= 0.5;
}

// ---- backward passes over a chunk ---------------------------------------------------------------

struct Grads {
  void *lp, *val, *ent;  // out, or nullptr
  float g, vf_g, entropy_coef, kl_coef;
  const float* omega;
};

// g_kl = 1 - exp(-k) of a chunk into kbuf. Without LARGE it is k - series everywhere and the
// return value says whether a token had |k| >= 2 (or NaN): the caller runs it again WITH LARGE.
template <class T, int W, bool LARGE>
KR_INLINE bool bwd_kl(const Row<T>& x, int64_t len, float* kbuf) {
  I<W> large{};
  for (int64_t k = 0; k < len; k += W) {
    const int n = lanes<W>(len, k);
    const F<W> kk = ld<W>(x.lp + k, n) - ld<W>(x.ref + k, n);
    F<W> g_kl = kk - k3_series<W>(kk);
    if constexpr (LARGE) {
      g_kl = k_large<W>(kk) ? 1.0f - simd::exp<W>(-kk) : g_kl;
    } else {
      large |= k_large<W>(kk);
    }
    simd::store<W>(kbuf + k, g_kl);
  }
  return !LARGE && any<W>(large);
}

// d/dlogprobs of a chunk; g_kl from kbuf (KL).
template <class T, int W, bool TIS, bool KL, bool DUAL>
KR_INLINE void bwd_logprobs(const Inputs& in, const Row<T>& x, const float* m, int64_t len,
                            float g_row, float kl_coef, const float* kbuf, T* out) {
  const F<W> lo = bcast<W>(in.lo), hi = bcast<W>(in.hi), dual = bcast<W>(in.dual_clip);
  const F<W> cap = bcast<W>(in.tis_cap), zero = bcast<W>(0.0f);
  for (int64_t k = 0; k < len; k += W) {
    const int n = lanes<W>(len, k);
    const F<W> mm = ld<W>(m + k, n);
    const Policy<T, W, DUAL> p(x, k, n, lo, hi, dual);
    F<W> dl = (p.clipped | p.capped) ? zero : p.l1;
    if constexpr (TIS) {
      const F<W> w = simd::exp<W>(ld<W>(x.old + k, n) - ld<W>(x.roll + k, n));
      dl = (w > cap ? cap : w) * dl;
    }
    const F<W> g_kl = KL ? simd::load<W>(kbuf + k) : zero;
    const F<W> grad = (g_row * mm) * (dl + kl_coef * g_kl);
    st<W>(out + k, keep<W>(mm != 0.0f, grad), n);
  }
}

template <class T, int W, bool TIS, bool KL>
KR_INLINE void bwd_logprobs_chunk(const Inputs& in, const Row<T>& x, const float* m, int64_t len,
                                  float g_row, float kl_coef, float* kbuf, T* out) {
  if (KL && bwd_kl<T, W, false>(x, len, kbuf)) bwd_kl<T, W, true>(x, len, kbuf);
  if (in.dual) {
    bwd_logprobs<T, W, TIS, KL, true>(in, x, m, len, g_row, kl_coef, kbuf, out);
  } else {
    bwd_logprobs<T, W, TIS, KL, false>(in, x, m, len, g_row, kl_coef, kbuf, out);
  }
}

template <class T, int W>
KR_INLINE void bwd_values(const Inputs& in, const Row<T>& x, const float* m, int64_t len,
                          float vf_g, T* out) {
  const F<W> value_clip = bcast<W>(in.value_clip), zero = bcast<W>(0.0f);
  for (int64_t k = 0; k < len; k += W) {
    const int n = lanes<W>(len, k);
    const F<W> mm = ld<W>(m + k, n);
    const Value<T, W> v(x, k, n, value_clip);
    const F<W> dv = v.vclipped ? zero : v.err;
    st<W>(out + k, keep<W>(mm != 0.0f, (vf_g * mm) * dv), n);
  }
}

template <class T, int W>
KR_INLINE void bwd_entropy(const float* m, int64_t len, float scale, T* out) {
  for (int64_t k = 0; k < len; k += W) {
    const int n = lanes<W>(len, k);
    const F<W> mm = ld<W>(m + k, n);
    st<W>(out + k, keep<W>(mm != 0.0f, scale * mm), n);
  }
}

template <class T, int W>
KR_INLINE void bwd_row(const Inputs& in, const Grads& g, int64_t i) {
  const float g_row = g.g * g.omega[i];
  const bool kl = in.ref != nullptr && g.kl_coef != 0.0f;
  float mbuf[kChunk], kbuf[kChunk];
  for (int64_t start = 0; start < in.n_cols; start += kChunk) {
    const int64_t n = std::min(kChunk, in.n_cols - start), o = i * in.n_cols + start;
    const float* m;
    const int64_t len = in.mask_u8 ? chunk_mask<W, true>(in, o, n, mbuf, &m, nullptr)
                                   : chunk_mask<W, false>(in, o, n, mbuf, &m, nullptr);
    for (void* out : {g.lp, g.val, g.ent}) {  // zeros past the last real token
      if (out) std::memset(static_cast<T*>(out) + o + len, 0, sizeof(T) * (n - len));
    }
    if (len == 0) continue;
    const Row<T> x = row_at<T>(in, i, start);
    if (g.lp) {
      T* out = static_cast<T*>(g.lp) + o;
      const float c = g.kl_coef;
      if (x.roll) {
        if (kl) bwd_logprobs_chunk<T, W, true, true>(in, x, m, len, g_row, c, kbuf, out);
        else bwd_logprobs_chunk<T, W, true, false>(in, x, m, len, g_row, c, kbuf, out);
      } else {
        if (kl) bwd_logprobs_chunk<T, W, false, true>(in, x, m, len, g_row, c, kbuf, out);
        else bwd_logprobs_chunk<T, W, false, false>(in, x, m, len, g_row, c, kbuf, out);
      }
    }
    if (g.val) bwd_values<T, W>(in, x, m, len, g.vf_g, static_cast<T*>(g.val) + o);
    if (g.ent) bwd_entropy<T, W>(m, len, -g.entropy_coef * g_row, static_cast<T*>(g.ent) + o);
  }
}

// ---- ISA variants, and the row kernel for a call ------------------------------------------------

// The forward (BWD false: writes rows) or the backward (reads g) of row i.
using RowFn = void (*)(const Inputs& in, const Grads& g, double* rows, int64_t i);

template <bool BWD, class T, bool U8>
void row_generic(const Inputs& in, const Grads& g, double* rows, int64_t i) {
  if constexpr (BWD) bwd_row<T, 4>(in, g, i); else fwd_row<T, 4, U8>(in, rows, i);
}
#if defined(__x86_64__) || defined(__i386__)
#define KERNELRL_HAS_AVX2_VARIANT 1
template <bool BWD, class T, bool U8> __attribute__((target("avx2,fma")))
void row_avx2(const Inputs& in, const Grads& g, double* rows, int64_t i) {
  if constexpr (BWD) bwd_row<T, 8>(in, g, i); else fwd_row<T, 8, U8>(in, rows, i);
}
#endif

// Every row through the forward (BWD false) or backward kernel of dtype, the mask kind and
// cpu_isa(), rows in parallel.
template <bool BWD>
void run_rows(const Inputs& in, const Grads& g, double* rows, int64_t n_rows, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    dispatch_bool(in.mask_u8, [&](auto u8) {
      using T = typename decltype(tag)::type;
      constexpr bool U8 = decltype(u8)::value;
      constexpr bool kU8 = U8 && !BWD;  // the backward reads either mask kind
      RowFn fn = &row_generic<BWD, T, kU8>;
#ifdef KERNELRL_HAS_AVX2_VARIANT
      if (cpu_isa() == CpuIsa::kAvx2) fn = &row_avx2<BWD, T, kU8>;
#endif
      for_each_row(n_rows, in.n_cols, [&](int64_t i) { fn(in, g, rows, i); });
    });
  });
}

// ---- the finish (ppo_loss.h), float64 on the calling thread ------------------------------------

void finish(const double* rows, float* loss, float* stats, float* omega, float* vf_scale,
            int64_t n_rows, const bool present[3], double vf_coef, double entropy_coef,
            double kl_loss_coef, int64_t agg, double norm_length) {
  double totals[kPpoNumCols] = {};
  for (int64_t b = 0; b < n_rows; ++b) {
    for (int64_t j = 0; j < kPpoNumCols; ++j) totals[j] += rows[b * kPpoNumCols + j];
  }
  const double inv_n = 1.0 / (totals[0] == 0.0 ? 1.0 : totals[0]);
  const double batch = static_cast<double>(std::max<int64_t>(n_rows, 1));
  const double row_scale = 1.0 / (batch * (agg == 3 ? norm_length : 1.0));
  double aggregated[kPpoNumCols] = {};
  for (int64_t b = 0; b < n_rows; ++b) {
    const double* s = rows + b * kPpoNumCols;
    const double w = agg == 0 ? inv_n : agg == 1 ? 1.0 / ((s[0] == 0.0 ? 1.0 : s[0]) * batch)
                                                 : row_scale;
    omega[b] = static_cast<float>(w);
    for (int64_t j = 0; j < kPpoNumCols; ++j) aggregated[j] += w * s[j];
  }
  double out[kPpoNumCols];
  for (int64_t j = 0; j < kPpoNumCols; ++j) {
    out[j] = (j == 1 || j == 7 || j == 8) ? aggregated[j] : totals[j] * inv_n;
    stats[j] = static_cast<float>(out[j]);
  }
  double l = out[1];
  const int64_t cols[3] = {5, 7, 8};
  const double coefs[3] = {vf_coef, -entropy_coef, kl_loss_coef};
  for (int t = 0; t < 3; ++t) {
    if (present[t] && coefs[t] != 0.0) l += coefs[t] * out[cols[t]];
  }
  *loss = static_cast<float>(l);
  *vf_scale = static_cast<float>(inv_n * vf_coef);
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void ppo_loss_fwd_cpu(const void* logprobs, const void* old_logprobs, const void* advantages,
                      const void* mask, const void* values, const void* old_values,
                      const void* returns, const void* entropy, const void* ref_logprobs,
                      const void* rollout_logprobs, double* rows, float* loss, float* stats,
                      float* omega, float* vf_scale, int64_t n_rows, int64_t n_cols,
                      DType dtype, int64_t mask_kind, bool adv_per_row, float lo, float hi,
                      float dual_clip, float value_clip, float tis_cap, double vf_coef,
                      double entropy_coef, double kl_loss_coef, int64_t agg,
                      double norm_length) {
  detail::check_ppo_fwd_args("ppo_loss_fwd_cpu", logprobs, old_logprobs, advantages, mask, values,
                             old_values, returns, loss, stats, omega, vf_scale, n_rows,
                             n_cols, mask_kind, adv_per_row, agg, norm_length);
  const Inputs in{logprobs, old_logprobs, advantages, mask, values, old_values, returns, entropy,
                  ref_logprobs, rollout_logprobs, n_cols, mask_kind == kPpoMaskU8, adv_per_row,
                  lo, hi, dual_clip, value_clip, tis_cap, !std::isinf(dual_clip)};
  std::vector<double> own;
  if (rows == nullptr) {
    own.resize(static_cast<size_t>(n_rows * kPpoNumCols));
    rows = own.data();
  }
  if (n_cols == 0) {
    std::fill(rows, rows + n_rows * kPpoNumCols, 0.0);
  } else {
    run_rows<false>(in, Grads{}, rows, n_rows, dtype);
  }
  const bool present[3] = {values != nullptr, entropy != nullptr, ref_logprobs != nullptr};
  finish(rows, loss, stats, omega, vf_scale, n_rows, present, vf_coef, entropy_coef,
         kl_loss_coef, agg, norm_length);
}

void ppo_loss_bwd_cpu(const void* logprobs, const void* old_logprobs, const void* advantages,
                      const void* mask, const void* values, const void* old_values,
                      const void* returns, const void* entropy, const void* ref_logprobs,
                      const void* rollout_logprobs, const float* grad_loss, const float* omega,
                      const float* vf_scale, void* grad_logprobs, void* grad_values,
                      void* grad_entropy, int64_t n_rows, int64_t n_cols, DType dtype,
                      int64_t mask_kind, bool adv_per_row, float lo, float hi, float dual_clip,
                      float value_clip, float tis_cap, float entropy_coef, float kl_loss_coef) {
  detail::check_ppo_bwd_args("ppo_loss_bwd_cpu", logprobs, old_logprobs, advantages, mask,
                             values, old_values, returns, entropy, grad_loss, omega, vf_scale,
                             grad_values, grad_entropy, n_rows, n_cols, mask_kind, adv_per_row);
  if (n_rows == 0 || n_cols == 0) return;
  if (!grad_logprobs && !grad_values && !grad_entropy) return;
  const Inputs in{logprobs, old_logprobs, advantages, mask, values, old_values, returns, entropy,
                  ref_logprobs, rollout_logprobs, n_cols, mask_kind == kPpoMaskU8, adv_per_row,
                  lo, hi, dual_clip, value_clip, tis_cap, !std::isinf(dual_clip)};
  const float g = *grad_loss;
  const Grads grads{grad_logprobs, grad_values, grad_entropy, g, g * *vf_scale, entropy_coef,
                    kl_loss_coef, omega};
  run_rows<true>(in, grads, nullptr, n_rows, dtype);
}

}  // namespace kernelrl
