// ppo_loss.cu: the PPO / GRPO loss on CUDA, forward and backward. Math and contract in
// ppo_loss.h; the CPU twin is ppo_loss_cpu.cpp; the per-token math is the Triton kernels'
// (kernelrl/ops/ppo_loss/triton_impl.py: _token_terms).
//
// Shape legend: B rows, T tokens per row, P = ceil(T / kTile) tiles per row.
//
// Layout: a block of kThreads threads takes a tile of kTile = kPpoCudaTile tokens of a row
// (blockIdx.x: rows, blockIdx.y: tiles, both grid-stride); thread j owns its tokens j + k kThreads,
// k < kPer, so that a warp loads 32 consecutive elements. It loads their mask, then the inputs
// of its real tokens, kGroup tokens at a time, before computing on them (upcast to fp32). The
// input loads are predicated on real: padding costs its mask, and NaN or inf there reaches
// nothing. __launch_bounds__(kThreads, 2): <= 128 registers, no spills (ptxas -v, sm_90).
//
// Forward, two launches from one call:
//   kernel 1 (B x P blocks): each real token adds its terms m x_j (ppo_loss.h; fp32, widened) to
//     the thread's 11 float64 sums in token order; the block adds those up (a butterfly in each
//     warp, then the warps in order); thread 0 writes the tile's partials to the workspace,
//     rows[(b P + p) 11 + j] (columns 3 and 5 halved there, exactly);
//   kernel 2 (one block): thread j takes the rows b = j mod kThreads in order, sums each row's
//     tiles in order into S_b (kept in its first tile's slot) and S_b into its totals, which the
//     block adds up as above; omega_b and sum_b omega_b S_b[j] (j = 1, 7, 8) the same way; thread
//     0 writes stats, loss and vf_scale: the float64 finish of ppo_loss_cpu.cpp.
// Backward (B x P blocks): the same walk, each wanted gradient written per token (+0 on padding).
// Bytes moved (b bytes per element, k inputs read, mask 1 or 4 bytes per token): the forward
// reads k B T b + B T mask bytes (of padding only its mask) and writes 4 B + 52 bytes, plus
// 88 B P bytes of partials that kernel 2 reads back on one SM; the backward reads the inputs its
// gradients need and the mask, and writes B T b bytes per gradient.
//
// Determinism: every sum has one fixed order (a thread's tokens, the butterfly, the warps, the
// tiles, the rows), no atomics: the same inputs give the same bits, run after run.
// No --use_fast_math: every exp is exp() in float64 rounded to fp32 (the Triton kernels'
// exp_fp64), g_kl is -expm1(-k) in float64; IEEE fp32 elsewhere keeps NaN and inf semantics.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "ppo_loss/ppo_loss.h"

namespace kernelrl {
namespace {

constexpr int kThreads = 256;                          // threads per block (8 warps)
constexpr int kWarps = kThreads / 32;
constexpr int kTile = static_cast<int>(kPpoCudaTile);  // tokens per tile
constexpr int kPer = kTile / kThreads;                 // tokens per thread and tile
constexpr int kGroup = 2;                              // of which loaded at once
constexpr int kCols = static_cast<int>(kPpoNumCols);
static_assert(kPer * kThreads == kTile && kPer % kGroup == 0, "whole tiles and groups");

// The inputs (nullptr: absent; advantages [B] when adv_per_row) and the per-token scalars.
struct Params {
  const void *lp, *old, *adv, *mask, *val, *oldval, *ret, *ent, *ref, *roll;
  int64_t n_rows, n_cols, n_tiles;
  float lo, hi, dual_clip, value_clip, tis_cap;
  bool mask_u8, adv_per_row, dual;  // dual: dual_clip is not +-inf
};

template <class T>  // element i of p, upcast
__device__ __forceinline__ float ld(const void* p, int64_t i) {
  return to_f32(__ldg(static_cast<const T*>(p) + i));
}

// ---- per-token math (ppo_loss.h), fp32 ----------------------------------------------------------

// e^x through float64, rounded to fp32 (the Triton kernels' exp_fp64); clip(x, lo, hi) as the
// Triton kernels' nested where (a NaN x stays NaN).
__device__ __forceinline__ float exp_rn(float x) { return float(exp(double(x))); }
__device__ __forceinline__ float clip(float x, float lo, float hi) {
  const float y = lo > x ? lo : x;
  return y > hi ? hi : y;
}

// k3 = exp(-k) - 1 + k: for |k| < 2 its Taylor series to k^16 by Horner with the CPU twin's
// constants 1/j! (from float64), beyond (and for NaN) (exp(-k) - 1) + k.
__device__ __forceinline__ float k3_of(float k) {
  if (!(fabsf(k) < 2.0f)) return (exp_rn(-k) - 1.0f) + k;
  constexpr float kInvFact[17] = {
      0, 0, 0, float(1 / 6.0), float(1 / 24.0), float(1 / 120.0), float(1 / 720.0),
      float(1 / 5040.0), float(1 / 40320.0), float(1 / 362880.0), float(1 / 3628800.0),
      float(1 / 39916800.0), float(1 / 479001600.0), float(1 / 6227020800.0),
      float(1 / 87178291200.0), float(1 / 1307674368000.0), float(1 / 20922789888000.0)};
  float s = kInvFact[16];
#pragma unroll
  for (int j = 15; j >= 3; --j) s = kInvFact[j] - k * s;
  s = 0.5f - k * s;
  return k * k * s;
}

struct In { float lp, old, a, v, v_old, ret, ent, ref, roll; };  // a token's inputs, upcast

// The policy terms: d, r, l1 = -A r, pg (dual clip applied), clipped, capped.
struct Policy { float d, r, l1, pg; bool clipped, capped; };

__device__ __forceinline__ Policy policy(const Params& p, const In& x) {
  Policy o;
  o.d = x.lp - x.old;
  o.r = exp_rn(o.d);
  const float neg_a = -x.a, l2 = neg_a * clip(o.r, p.lo, p.hi);
  o.l1 = neg_a * o.r;
  o.clipped = l2 > o.l1;
  o.pg = o.clipped ? l2 : o.l1;
  const float cap = neg_a * p.dual_clip;  // -c A
  o.capped = p.dual && x.a < 0.0f && o.pg > cap;
  o.pg = o.capped ? cap : o.pg;
  return o;
}

// w = min(exp(old - rollout), tis_cap); *truncated: the exp was > tis_cap.
__device__ __forceinline__ float tis_weight(const Params& p, const In& x, bool* truncated) {
  const float w = exp_rn(x.old - x.roll);
  *truncated = w > p.tis_cap;
  return *truncated ? p.tis_cap : w;
}

// The value term: err = V - R, vf = max(e^2, e_c^2) (not halved), vclipped.
struct Value { float err, vf; bool vclipped; };

__device__ __forceinline__ Value value(const Params& p, const In& x) {
  Value o;
  o.err = x.v - x.ret;
  const float err_clip = clip(x.v, x.v_old - p.value_clip, x.v_old + p.value_clip) - x.ret;
  const float vf1 = o.err * o.err, vf2 = err_clip * err_clip;
  o.vclipped = vf2 > vf1;
  o.vf = o.vclipped ? vf2 : vf1;
  return o;
}

// ---- loads and the block sum --------------------------------------------------------------------

// Token i's inputs if it is real (else zeros: padding is not read): the policy inputs if
// POLICY (ref_logprobs if ref, rollout_logprobs if TIS), the value inputs if VALUES, entropy if
// ent.
template <class T, bool POLICY, bool TIS, bool VALUES>
__device__ __forceinline__ In load_token(const Params& p, int64_t i, bool real, float adv_row,
                                         bool ref, bool ent) {
  In y{};
  if (POLICY && real) {
    y.lp = ld<T>(p.lp, i), y.old = ld<T>(p.old, i);
    y.a = p.adv_per_row ? adv_row : ld<T>(p.adv, i);
    if (TIS) y.roll = ld<T>(p.roll, i);
    if (ref) y.ref = ld<T>(p.ref, i);
  }
  if (VALUES && real) y.v = ld<T>(p.val, i), y.v_old = ld<T>(p.oldval, i), y.ret = ld<T>(p.ret, i);
  if (ent && real) y.ent = ld<T>(p.ent, i);
  return y;
}

// Calls f(i, m, x) on the thread's tokens of a tile that lie in the row, in order: i the
// token's index in [B, T], m its mask value as fp32, x its inputs (load_token). The kPer mask
// values load first, then the inputs of kGroup tokens at a time, before f runs on them.
template <class T, bool POLICY, bool TIS, bool VALUES, class F>
__device__ __forceinline__ void for_tile_tokens(const Params& p, int64_t row, int64_t tile,
                                                float adv_row, bool ref, bool ent, F&& f) {
  const int64_t t0 = tile * kTile + threadIdx.x, i0 = row * p.n_cols + t0;
  float m[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t i = i0 + k * kThreads;
    m[k] = t0 + k * kThreads >= p.n_cols ? 0.0f
           : p.mask_u8 ? static_cast<float>(__ldg(static_cast<const uint8_t*>(p.mask) + i))
                       : __ldg(static_cast<const float*>(p.mask) + i);
  }
#pragma unroll
  for (int k0 = 0; k0 < kPer; k0 += kGroup) {
    In x[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      x[k] = load_token<T, POLICY, TIS, VALUES>(p, i0 + (k0 + k) * kThreads,
                                                m[k0 + k] != 0.0f, adv_row, ref, ent);
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      if (t0 + (k0 + k) * kThreads >= p.n_cols) return;
      f(i0 + (k0 + k) * kThreads, m[k0 + k], x[k]);
    }
  }
}

// Sums v over the block in a fixed order (a butterfly in each warp, then the warps in order);
// every thread gets the totals. Ends with a barrier, so smem can be reused.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double (*smem)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[j] += __shfl_xor_sync(0xffffffffu, v[j], off);
    if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32][j] = v[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) {
    v[j] = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v[j] += smem[w][j];
  }
  __syncthreads();
}

// ---- forward ------------------------------------------------------------------------------------

// Kernel 1: the tiles' partial sums, ws [B, P, 11]. VALUES, TIS: values, rollout_logprobs given.
template <class T, bool VALUES, bool TIS>
__global__ void __launch_bounds__(kThreads, 2) ppo_fwd_kernel(const Params p,
                                                             double* __restrict__ ws) {
  __shared__ double s_sum[kWarps][kCols];
  const bool ent = p.ent != nullptr, ref = p.ref != nullptr;
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const float adv_row = p.adv_per_row ? ld<T>(p.adv, row) : 0.0f;
    for (int64_t tile = blockIdx.y; tile < p.n_tiles; tile += gridDim.y) {
      double s[kCols] = {};
      for_tile_tokens<T, true, TIS, VALUES>(p, row, tile, adv_row, ref, ent,
                                            [&](int64_t, float mm, const In& x) {
        if (!(mm != 0.0f)) return;  // padding (a -0 mask would add nothing to the count)
        const Policy po = policy(p, x);
        bool truncated = false;
        const float w = TIS ? tis_weight(p, x, &truncated) : 1.0f;
        s[0] += mm;
        s[1] += mm * (TIS ? po.pg * w : po.pg);
        if (po.clipped) s[2] += mm;
        s[3] += mm * (po.d * po.d);
        s[4] += mm * po.r;
        if (VALUES) {
          const Value v = value(p, x);
          s[5] += mm * v.vf;
          if (v.vclipped) s[6] += mm;
        }
        if (ent) s[7] += mm * x.ent;
        if (ref) s[8] += mm * k3_of(x.lp - x.ref);
        if (TIS) {
          s[9] += mm * w;
          if (truncated) s[10] += mm;
        }
      });
      block_sum<kCols>(s, s_sum);
      if (threadIdx.x == 0) {
        double* out = ws + (row * p.n_tiles + tile) * kCols;
#pragma unroll
        for (int j = 0; j < kCols; ++j) out[j] = (j == 3 || j == 5) ? 0.5 * s[j] : s[j];
      }
    }
  }
}

// The finish's scalars; a term's coefficient (*_term) is 0 where its input is absent.
struct Finish { double vf_coef, vf_term, entropy_term, kl_term, norm_length; int64_t agg; };

// Kernel 2 (one block): S_b from the partials, then omega, stats, loss and vf_scale.
__global__ void __launch_bounds__(kThreads) ppo_finish_kernel(
    double* __restrict__ ws, float* __restrict__ loss, float* __restrict__ stats,
    float* __restrict__ omega, float* __restrict__ vf_scale, int64_t n_rows, int64_t n_tiles,
    const Finish f) {
  __shared__ double s_tot[kWarps][kCols];
  __shared__ double s_agg[kWarps][3];
  double tot[kCols] = {};
  for (int64_t b = threadIdx.x; b < n_rows; b += kThreads) {
    double* r = ws + b * n_tiles * kCols;
    double s[kCols] = {};
    for (int64_t t = 0; t < n_tiles; ++t) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) s[j] += r[t * kCols + j];
    }
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      if (n_tiles > 1) r[j] = s[j];  // S_b, read back by this thread below
      tot[j] += s[j];
    }
  }
  block_sum<kCols>(tot, s_tot);
  const double inv_n = 1.0 / (tot[0] == 0.0 ? 1.0 : tot[0]);
  const double batch = static_cast<double>(n_rows > 1 ? n_rows : 1);
  const double row_scale = 1.0 / (batch * (f.agg == 3 ? f.norm_length : 1.0));
  double agg[3] = {};  // sum_b omega_b S_b[j], j = 1, 7, 8
  for (int64_t b = threadIdx.x; b < n_rows; b += kThreads) {
    const double* s = ws + b * n_tiles * kCols;
    const double n_b = n_tiles > 0 ? s[0] : 0.0;
    const double w = f.agg == 0   ? inv_n
                     : f.agg == 1 ? 1.0 / ((n_b == 0.0 ? 1.0 : n_b) * batch)
                                  : row_scale;
    omega[b] = static_cast<float>(w);
    if (n_tiles > 0) {
      agg[0] += w * s[1];
      agg[1] += w * s[7];
      agg[2] += w * s[8];
    }
  }
  block_sum<3>(agg, s_agg);
  if (threadIdx.x != 0) return;
#pragma unroll
  for (int j = 0; j < kCols; ++j) tot[j] *= inv_n;  // the token means
  tot[1] = agg[0], tot[7] = agg[1], tot[8] = agg[2];  // the aggregated columns
#pragma unroll
  for (int j = 0; j < kCols; ++j) stats[j] = static_cast<float>(tot[j]);
  double l = tot[1];
  if (f.vf_term != 0.0) l += f.vf_term * tot[5];
  if (f.entropy_term != 0.0) l += f.entropy_term * tot[7];
  if (f.kl_term != 0.0) l += f.kl_term * tot[8];
  *loss = static_cast<float>(l);
  *vf_scale = static_cast<float>(inv_n * f.vf_coef);
}

// ---- backward -----------------------------------------------------------------------------------

// The wanted gradients (null: not wanted) and their scalars; kl: ref_logprobs given and
// kl_loss_coef != 0 (else g_kl is 0).
template <class T>
struct Grads {
  T *lp, *val, *ent;
  const float *grad_loss, *omega, *vf_scale;
  float entropy_coef, kl_coef;
  bool kl;
};

// VALUES: grad_values wanted; TIS: rollout_logprobs given (read for grad_logprobs only).
template <class T, bool VALUES, bool TIS>
__global__ void __launch_bounds__(kThreads, 2) ppo_bwd_kernel(const Params p, const Grads<T> g) {
  const float grad = __ldg(g.grad_loss);
  const float vf_g = VALUES ? grad * __ldg(g.vf_scale) : 0.0f;
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const float g_row = grad * __ldg(g.omega + row);
    const float ent_scale = -g.entropy_coef * g_row;
    const float adv_row = g.lp && p.adv_per_row ? ld<T>(p.adv, row) : 0.0f;
    for (int64_t tile = blockIdx.y; tile < p.n_tiles; tile += gridDim.y) {
      auto token = [&](int64_t i, float mm, const In& x) {
        const bool real = mm != 0.0f;
        if (g.lp) {
          float d_lp = 0.0f;
          if (real) {
            const Policy po = policy(p, x);
            float dl = (po.clipped || po.capped) ? 0.0f : po.l1;
            bool truncated;
            if (TIS) dl = tis_weight(p, x, &truncated) * dl;
            // g_kl = 1 - exp(-k) in float64 (no cancellation for tiny k), rounded
            const double k = static_cast<double>(x.lp - x.ref);
            const float g_kl = g.kl ? static_cast<float>(-expm1(-k)) : 0.0f;
            d_lp = (g_row * mm) * (dl + g.kl_coef * g_kl);
          }
          g.lp[i] = from_f32<T>(d_lp);
        }
        if (VALUES) {
          float d_v = 0.0f;
          if (real) {
            const Value v = value(p, x);
            d_v = (vf_g * mm) * (v.vclipped ? 0.0f : v.err);
          }
          g.val[i] = from_f32<T>(d_v);
        }
        if (g.ent) g.ent[i] = from_f32<T>(real ? ent_scale * mm : 0.0f);
      };
      if (g.lp) {
        for_tile_tokens<T, true, TIS, VALUES>(p, row, tile, adv_row, g.kl, false, token);
      } else {
        for_tile_tokens<T, false, false, VALUES>(p, row, tile, 0.0f, false, false, token);
      }
    }
  }
}

// ---- host ---------------------------------------------------------------------------------------

Params make_params(const void* const (&in)[10], int64_t n_rows, int64_t n_cols,
                   int64_t mask_kind, bool adv_per_row, float lo, float hi, float dual_clip,
                   float value_clip, float tis_cap) {
  return Params{in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8], in[9],
                n_rows, n_cols, (n_cols + kTile - 1) / kTile, lo, hi, dual_clip, value_clip,
                tis_cap, mask_kind == kPpoMaskU8, adv_per_row, !std::isinf(dual_clip)};
}

dim3 grid_for(const Params& p) {  // rows x tiles (gridDim.y <= 65535)
  return dim3(grid_for_rows(p.n_rows), static_cast<unsigned>(std::min<int64_t>(p.n_tiles, 65535)));
}

// f(TypeTag<T>{}, A, B) for the CUDA element type of dtype and two flags as bool constants.
template <class F>
void dispatch(DType dtype, bool a, bool b, F&& f) {
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    dispatch_bool(a, [&](auto ca) { dispatch_bool(b, [&](auto cb) { f(tag, ca, cb); }); });
  });
}

}  // namespace

void ppo_loss_fwd_cuda(const void* logprobs, const void* old_logprobs, const void* advantages,
                       const void* mask, const void* values, const void* old_values,
                       const void* returns, const void* entropy, const void* ref_logprobs,
                       const void* rollout_logprobs, double* rows, float* loss, float* stats,
                       float* omega, float* vf_scale, int64_t n_rows, int64_t n_cols,
                       DType dtype, int64_t mask_kind, bool adv_per_row, float lo, float hi,
                       float dual_clip, float value_clip, float tis_cap, double vf_coef,
                       double entropy_coef, double kl_loss_coef, int64_t agg,
                       double norm_length, void* stream) {
  const char* fn = "ppo_loss_fwd_cuda";
  detail::check_ppo_fwd_args(fn, logprobs, old_logprobs, advantages, mask, values, old_values,
                             returns, loss, stats, omega, vf_scale, n_rows, n_cols, mask_kind,
                             adv_per_row, agg, norm_length);
  if (ppo_loss_cuda_workspace(n_rows, n_cols) > 0) detail::ppo_check_ptr(fn, "rows", rows);
  const Params p = make_params({logprobs, old_logprobs, advantages, mask, values, old_values,
                                returns, entropy, ref_logprobs, rollout_logprobs},
                               n_rows, n_cols, mask_kind, adv_per_row, lo, hi, dual_clip,
                               value_clip, tis_cap);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (n_rows > 0 && p.n_tiles > 0) {
    dispatch(dtype, values != nullptr, rollout_logprobs != nullptr, [&](auto tag, auto v, auto r) {
      ppo_fwd_kernel<typename decltype(tag)::type, decltype(v)::value, decltype(r)::value>
          <<<grid_for(p), kThreads, 0, s>>>(p, rows);
    });
    cuda_check_launch(fn);
  }
  const Finish f{vf_coef, values ? vf_coef : 0.0, entropy ? -entropy_coef : 0.0,
                 ref_logprobs ? kl_loss_coef : 0.0, norm_length, agg};
  ppo_finish_kernel<<<1, kThreads, 0, s>>>(rows, loss, stats, omega, vf_scale, n_rows,
                                           p.n_tiles, f);
  cuda_check_launch(fn);
}

void ppo_loss_bwd_cuda(const void* logprobs, const void* old_logprobs, const void* advantages,
                       const void* mask, const void* values, const void* old_values,
                       const void* returns, const void* entropy, const void* ref_logprobs,
                       const void* rollout_logprobs, const float* grad_loss, const float* omega,
                       const float* vf_scale, void* grad_logprobs, void* grad_values,
                       void* grad_entropy, int64_t n_rows, int64_t n_cols, DType dtype,
                       int64_t mask_kind, bool adv_per_row, float lo, float hi, float dual_clip,
                       float value_clip, float tis_cap, float entropy_coef, float kl_loss_coef,
                       void* stream) {
  const char* fn = "ppo_loss_bwd_cuda";
  detail::check_ppo_bwd_args(fn, logprobs, old_logprobs, advantages, mask, values, old_values,
                             returns, entropy, grad_loss, omega, vf_scale, grad_values,
                             grad_entropy, n_rows, n_cols, mask_kind, adv_per_row);
  if (n_rows == 0 || n_cols == 0 || (!grad_logprobs && !grad_values && !grad_entropy)) return;
  const Params p = make_params({logprobs, old_logprobs, advantages, mask, values, old_values,
                                returns, entropy, ref_logprobs, rollout_logprobs},
                               n_rows, n_cols, mask_kind, adv_per_row, lo, hi, dual_clip,
                               value_clip, tis_cap);
  dispatch(dtype, grad_values != nullptr, rollout_logprobs != nullptr,
           [&](auto tag, auto v, auto r) {
    using T = typename decltype(tag)::type;
    const Grads<T> g{static_cast<T*>(grad_logprobs), static_cast<T*>(grad_values),
                     static_cast<T*>(grad_entropy), grad_loss, omega, vf_scale, entropy_coef,
                     kl_loss_coef, ref_logprobs != nullptr && kl_loss_coef != 0.0f};
    ppo_bwd_kernel<T, decltype(v)::value, decltype(r)::value>
        <<<grid_for(p), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p, g);
  });
  cuda_check_launch(fn);
}

}  // namespace kernelrl
