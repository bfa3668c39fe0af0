// moe_cpu.cpp: the CPU twin of moe.cu, the MoE permutation (contract and algorithm in moe.h).
//
// The same three phases over the same tiles (moe_tiling) as the CUDA kernels:
//   (1) histogram (tiles in parallel, OpenMP via common/row_loop.h): one thread counts its tile's
//       slots per bucket, in slot order, into table[b, t];
//   (2) scan (one thread): the exclusive scan of table in bucket-major order, offsets and bad;
//   (3) ranks (tiles in parallel): one thread walks its tile in slot order with a running
//       position per bucket, starting at table[b, t]: rank = table[b, t] + the number of earlier
//       slots of the tile in bucket b, which is what the CUDA block computes with warp ballots.
// A tile writes only its own table column, and its own slots' order / position entries, so the
// results do not depend on the thread count or the schedule (nor could they: the stable
// permutation is unique).
// Bytes: the ids read twice (S * id_bytes each), order and position written (4 S each), the
// table (4 B T) written, read and written by the scan, read again by phase 3.
#include <algorithm>
#include <cstdint>

#include "common/row_loop.h"
#include "moe/moe.h"

namespace kernelrl {
namespace {

// The bucket of an id: the expert, or E for an id outside [0, E) (compared in the id's type).
template <class Id>
inline int32_t bucket_of(Id id, int64_t num_experts) {
  return (id >= 0 && static_cast<int64_t>(id) < num_experts) ? static_cast<int32_t>(id)
                                                              : static_cast<int32_t>(num_experts);
}

template <class Id>
void permute(const Id* experts, int32_t* order, int32_t* offsets, int32_t* position, int32_t* bad,
             int32_t* table, int64_t n_slots, int64_t num_experts) {
  const MoeTiling tiling = moe_tiling(n_slots, num_experts);
  const int64_t n_tiles = tiling.tiles, tile_len = tiling.tile_len;
  const int64_t n_buckets = num_experts + 1;

  // (1) histogram: table[b, t] = slots of tile t in bucket b.
  for_each_row(n_tiles, tile_len, [&](int64_t t) {
    int32_t count[kMoeMaxBuckets];
    std::fill(count, count + n_buckets, 0);
    const int64_t begin = t * tile_len, end = std::min(n_slots, begin + tile_len);
    for (int64_t s = begin; s < end; ++s) ++count[bucket_of(experts[s], num_experts)];
    for (int64_t b = 0; b < n_buckets; ++b) table[b * n_tiles + t] = count[b];
  });

  // (2) exclusive scan, bucket-major: table[b, t] = sorted position of tile t's first slot in b.
  int32_t run = 0;  // <= S <= INT32_MAX
  for (int64_t b = 0; b < n_buckets; ++b) {
    offsets[b] = run;
    int32_t* row = table + b * n_tiles;
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int32_t c = row[t];
      row[t] = run;
      run += c;
    }
  }
  bad[0] = static_cast<int32_t>(n_slots - offsets[num_experts]);

  // (3) ranks: each tile in slot order, from its bases.
  for_each_row(n_tiles, tile_len, [&](int64_t t) {
    int32_t next[kMoeMaxBuckets];
    for (int64_t b = 0; b < n_buckets; ++b) next[b] = table[b * n_tiles + t];
    const int64_t begin = t * tile_len, end = std::min(n_slots, begin + tile_len);
    for (int64_t s = begin; s < end; ++s) {
      const int32_t r = next[bucket_of(experts[s], num_experts)]++;
      order[r] = static_cast<int32_t>(s);
      position[s] = r;
    }
  });
}

}  // namespace

void moe_permute_cpu(const void* experts, int32_t* order, int32_t* offsets, int32_t* position,
                     int32_t* bad, int32_t* workspace, int64_t n_tokens, int64_t top_k,
                     int64_t num_experts, int64_t id_bytes, int64_t workspace_size) {
  const char* fn = "moe_permute_cpu";
  detail::check_moe_permute_args(fn, experts, order, offsets, position, bad, workspace, n_tokens,
                                 top_k, num_experts, id_bytes, workspace_size);
  const int64_t n_slots = n_tokens * top_k;
  if (id_bytes == 8) {
    permute(static_cast<const int64_t*>(experts), order, offsets, position, bad, workspace,
            n_slots, num_experts);
  } else {
    permute(static_cast<const int32_t*>(experts), order, offsets, position, bad, workspace,
            n_slots, num_experts);
  }
}

}  // namespace kernelrl
