// moe.cu: the MoE permutation on CUDA (contract and algorithm in moe.h). Its C++ twin is
// moe_cpu.cpp; both run the same three phases over the same tiles (moe_tiling):
//
//   launch 1  moe_hist_kernel   one block per tile             (1) table[b, t] = tile t's count
//   launch 2  moe_scan_kernel   one block of 1024 threads      (2) exclusive scan, offsets, bad
//   launch 3  moe_rank_kernel   one block per tile             (3) order and position
//   (launch 3 is skipped when S = 0)
//
// Blocks of kThreads = 256 threads (8 warps) walk their tile in chunks of kMoeChunk = 4096 slots:
// warp w holds chunk slots [512 w, 512 w + 512), lane L slot 512 w + 32 r + L of round r
// (r < 16, coalesced loads), as buckets in registers (the expert, E for an invalid id, -1 past
// the tile's end). A warp counts its slots per bucket in its own row of shared memory, round by
// round in slot order: __match_any_sync gives the lanes with the same bucket; each lane's rank
// among its warp's slots of that bucket is the row's count so far plus its lower peers
// (popc(peers & lanemask_lt)), and the lowest peer alone adds popc(peers) to the row. No atomics:
// one lane writes each count, and the warps' rows are disjoint.
//   Phase 1 sums the warps' rows of all chunks into the tile's column of the table.
//   Phase 2 scans the [B, T] table (<= kMoeTableCap entries) in one block, 4096 entries a round
//   (a warp-shuffle scan, then the warp totals), carrying the total between rounds.
//   Phase 3, per chunk: the warp counts as in phase 1 (with each slot's rank within its warp);
//   then per bucket, in warp order, the rows turn into the warps' first positions, starting at
//   the tile's running position (table[b, t] before the first chunk), which then advances by
//   the chunk's count; rank = the warp's first position + the slot's rank within the warp, i.e.
//   table[b, t] + the number of earlier slots of the tile in bucket b, as on the CPU.
//   position[slot] = rank is a coalesced write; order[rank] = slot a scatter, whose consecutive
//   lanes of one bucket hit consecutive addresses.
//
// Bytes: the ids read twice (S * id_bytes each, the second read mostly from L2 for small S),
// order and position written (4 S each), the table written (4 B T), read and rewritten by the
// scan, and read once more (one column per block). Shared memory: 4 * 8 * B bytes in phase 1,
// 4 * 9 * B in phase 3 (<= 36.9 KB at E = 1024: under the 48 KB default, no opt-in).
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "moe/moe.h"

namespace kernelrl {
namespace {

constexpr int kThreads = 256;            // threads per block in phases 1 and 3
constexpr int kWarps = kThreads / 32;
constexpr int kPer = 16;                 // slots per thread per chunk
constexpr int kWarpSlots = 32 * kPer;    // consecutive slots of a chunk per warp
static_assert(kThreads * kPer == kMoeChunk, "a block holds one chunk at a time");
constexpr int kScanThreads = 1024;       // phase 2: one block
constexpr int kScanWarps = kScanThreads / 32;
constexpr int kScanPer = 4;              // consecutive table entries per thread per round
constexpr unsigned kFull = 0xffffffffu;
static_assert(kMoeTableCap <= INT32_MAX, "table indices are int");

struct Tiles {
  int64_t n_slots;   // S
  int64_t tile_len;  // slots per tile, a multiple of kMoeChunk
  int n_tiles;       // T
  int num_experts;   // E: bucket E holds the invalid ids
};

// The buckets of this thread's kPer slots of the chunk starting at chunk_begin: the expert, E for
// an id outside [0, E) (compared in the id's type), -1 at or past `end`.
template <class Id>
__device__ __forceinline__ void load_chunk(const Id* __restrict__ experts, int64_t chunk_begin,
                                           int64_t end, int num_experts, int (&bk)[kPer]) {
  const int64_t base = chunk_begin + (threadIdx.x / 32) * kWarpSlots + threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int64_t s = base + 32 * r;
    if (s < end) {
      const Id id = experts[s];
      bk[r] = (id >= 0 && id < static_cast<Id>(num_experts)) ? static_cast<int>(id) : num_experts;
    } else {
      bk[r] = -1;
    }
  }
}

// Counts the warp's buckets bk (rounds in slot order) into its row cnt of shared memory; local[r]
// = the slot's rank among the warp's slots of its bucket so far (the row's count before the round
// plus its lower peers). Deterministic: per round, only the lowest lane of a bucket writes.
__device__ __forceinline__ void warp_count(const int (&bk)[kPer], int* cnt, int (&local)[kPer]) {
  const unsigned lower = (1u << (threadIdx.x % 32)) - 1u;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int b = bk[r];
    const unsigned peers = __match_any_sync(kFull, b);
    const int before = b >= 0 ? cnt[b] : 0;
    local[r] = before + __popc(peers & lower);
    __syncwarp();  // every peer has read cnt[b]
    if (b >= 0 && (peers & lower) == 0) cnt[b] = before + __popc(peers);
    __syncwarp();  // the next round reads the new counts
  }
}

// ---- phase 1: per-tile histograms ----------------------------------------------------------

template <class Id>
__global__ void __launch_bounds__(kThreads)
moe_hist_kernel(const Id* __restrict__ experts, int32_t* __restrict__ table, Tiles tl) {
  extern __shared__ int s_cnt[];  // [kWarps][B]
  const int n_buckets = tl.num_experts + 1;
  const int t = blockIdx.x;
  for (int i = threadIdx.x; i < kWarps * n_buckets; i += kThreads) s_cnt[i] = 0;
  __syncthreads();
  int* cnt = s_cnt + (threadIdx.x / 32) * n_buckets;
  const int64_t begin = static_cast<int64_t>(t) * tl.tile_len;
  const int64_t end = min(tl.n_slots, begin + tl.tile_len);
  for (int64_t c = begin; c < end; c += kMoeChunk) {
    int bk[kPer], local[kPer];
    load_chunk(experts, c, end, tl.num_experts, bk);
    warp_count(bk, cnt, local);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < n_buckets; b += kThreads) {
    int sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += s_cnt[w * n_buckets + b];
    table[static_cast<int64_t>(b) * tl.n_tiles + t] = sum;
  }
}

// ---- phase 2: exclusive scan of the table, offsets, bad --------------------------------------

__device__ __forceinline__ int warp_inclusive_scan(int x) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(kFull, x, off);
    if (lane >= off) x += y;
  }
  return x;
}

__global__ void __launch_bounds__(kScanThreads)
moe_scan_kernel(int32_t* __restrict__ table, int32_t* __restrict__ offsets,
                int32_t* __restrict__ bad, int n_entries, int n_tiles, int num_experts,
                int64_t n_slots) {
  __shared__ int s_warp[kScanWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int carry = 0;  // sum of the earlier rounds (<= S)
  for (int base = 0; base < n_entries; base += kScanThreads * kScanPer) {
    const int i0 = base + threadIdx.x * kScanPer;
    int v[kScanPer];
    int sum = 0;
#pragma unroll
    for (int k = 0; k < kScanPer; ++k) {
      v[k] = i0 + k < n_entries ? table[i0 + k] : 0;
      sum += v[k];
    }
    const int x = warp_inclusive_scan(sum);
    if (lane == 31) s_warp[warp] = x;
    __syncthreads();
    if (warp == 0) s_warp[lane] = warp_inclusive_scan(s_warp[lane]);
    __syncthreads();
    int run = carry + (warp > 0 ? s_warp[warp - 1] : 0) + (x - sum);
#pragma unroll
    for (int k = 0; k < kScanPer; ++k) {
      const int i = i0 + k;
      if (i < n_entries) {
        table[i] = run;
        if (i % n_tiles == 0) {  // tile 0 of bucket b: the bucket's first sorted position
          const int b = i / n_tiles;
          offsets[b] = run;
          if (b == num_experts) bad[0] = static_cast<int32_t>(n_slots - run);
        }
      }
      run += v[k];
    }
    carry += s_warp[kScanWarps - 1];
    __syncthreads();  // s_warp is rewritten by the next round
  }
}

// ---- phase 3: ranks ----------------------------------------------------------------------------

template <class Id>
__global__ void __launch_bounds__(kThreads)
moe_rank_kernel(const Id* __restrict__ experts, const int32_t* __restrict__ table,
                int32_t* __restrict__ order, int32_t* __restrict__ position, Tiles tl) {
  extern __shared__ int smem[];
  const int n_buckets = tl.num_experts + 1;
  int* s_cnt = smem;                         // [kWarps][B]: counts, then first positions
  int* s_next = smem + kWarps * n_buckets;   // [B]: the tile's next sorted position per bucket
  const int t = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = threadIdx.x; b < n_buckets; b += kThreads) {
    s_next[b] = table[static_cast<int64_t>(b) * tl.n_tiles + t];
  }
  int* cnt = s_cnt + warp * n_buckets;
  const int64_t begin = static_cast<int64_t>(t) * tl.tile_len;
  const int64_t end = min(tl.n_slots, begin + tl.tile_len);
  for (int64_t c = begin; c < end; c += kMoeChunk) {
    for (int i = lane; i < n_buckets; i += 32) cnt[i] = 0;
    __syncwarp();
    int bk[kPer], local[kPer];
    load_chunk(experts, c, end, tl.num_experts, bk);
    warp_count(bk, cnt, local);
    __syncthreads();  // every warp's counts (and s_next) are in
    for (int b = threadIdx.x; b < n_buckets; b += kThreads) {
      int run = s_next[b];
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const int n = s_cnt[w * n_buckets + b];
        s_cnt[w * n_buckets + b] = run;
        run += n;
      }
      s_next[b] = run;
    }
    __syncthreads();  // the first positions are in
    const int64_t base = c + warp * kWarpSlots + lane;
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      if (bk[r] >= 0) {
        const int rank = cnt[bk[r]] + local[r];
        const int64_t s = base + 32 * r;
        order[rank] = static_cast<int32_t>(s);
        position[s] = rank;
      }
    }
    __syncwarp();  // the row is read before the next chunk zeroes it
  }
}

template <class Id>
void launch(const void* experts, int32_t* order, int32_t* offsets, int32_t* position,
            int32_t* bad, int32_t* table, const Tiles& tl, cudaStream_t stream, const char* fn) {
  const Id* ids = static_cast<const Id*>(experts);
  const int n_buckets = tl.num_experts + 1;
  const size_t hist_smem = sizeof(int) * kWarps * n_buckets;
  const size_t rank_smem = sizeof(int) * (kWarps + 1) * n_buckets;
  moe_hist_kernel<Id><<<tl.n_tiles, kThreads, hist_smem, stream>>>(ids, table, tl);
  cuda_check_launch(fn);
  moe_scan_kernel<<<1, kScanThreads, 0, stream>>>(table, offsets, bad, n_buckets * tl.n_tiles,
                                                  tl.n_tiles, tl.num_experts, tl.n_slots);
  cuda_check_launch(fn);
  if (tl.n_slots == 0) return;
  moe_rank_kernel<Id><<<tl.n_tiles, kThreads, rank_smem, stream>>>(ids, table, order, position,
                                                                   tl);
  cuda_check_launch(fn);
}

}  // namespace

void moe_permute_cuda(const void* experts, int32_t* order, int32_t* offsets, int32_t* position,
                      int32_t* bad, int32_t* workspace, int64_t n_tokens, int64_t top_k,
                      int64_t num_experts, int64_t id_bytes, int64_t workspace_size,
                      void* stream) {
  const char* fn = "moe_permute_cuda";
  detail::check_moe_permute_args(fn, experts, order, offsets, position, bad, workspace, n_tokens,
                                 top_k, num_experts, id_bytes, workspace_size);
  const int64_t n_slots = n_tokens * top_k;
  const MoeTiling tiling = moe_tiling(n_slots, num_experts);
  const Tiles tl{n_slots, tiling.tile_len, static_cast<int>(tiling.tiles),
                 static_cast<int>(num_experts)};
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (id_bytes == 8) {
    launch<int64_t>(experts, order, offsets, position, bad, workspace, tl, s, fn);
  } else {
    launch<int32_t>(experts, order, offsets, position, bad, workspace, tl, s, fn);
  }
}

}  // namespace kernelrl
