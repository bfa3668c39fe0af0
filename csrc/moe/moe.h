// moe.h: the MoE token permutation: a stable counting sort of the (token, choice) slots by expert.
//
// Shape legend: N tokens, K experts per token (top-k), E experts, S = N * K slots.
//
// Input: experts [N, K], contiguous, int32 or int64 (id_bytes 4 or 8). Slot s = n * K + j holds
// the j-th expert chosen by token n. Bounds: 1 <= K <= kMoeMaxTopK (8), 1 <= E <= kMoeMaxExperts
// (1024; Qwen3-MoE has 128, DeepSeek-V3 256), S <= kMoeMaxSlots (2^31 - 1: every index is int32).
//
// Outputs, int32:
//   offsets  [E + 1]  exclusive scan of the per-expert counts: expert e's slots sit at sorted
//                     positions [offsets[e], offsets[e + 1]); offsets[E] = S when every id is valid
//   order    [S]      order[p] = the slot at sorted position p: grouped by expert ascending, within
//                     an expert by slot ascending (a stable counting sort; the permutation is
//                     unique, so every tiling and thread count gives the same bits)
//   position [S]      the inverse permutation: position[order[p]] = p
//   bad      [1]      the number of slots whose id is outside [0, E) (0: all valid)
// Invalid ids are not an error inside the kernels (the CUDA ones cannot raise without a host
// sync): such a slot sorts into an extra bucket E after every expert, in slot order, so order and
// position stay a permutation of [0, S) and nothing indexes out of range; offsets[E] = S - bad is
// then where they start. The Python side reads `bad` and raises (on CPU always, on CUDA in debug
// mode only). An int64 id is compared as int64: 2^32 + 1 is invalid, not expert 1.
//
// Algorithm (the same three phases on CPU and CUDA, over the same tiles):
//   buckets B = E + 1 (the experts, then the invalid bucket); the slots split into T tiles of
//   tile_len consecutive slots (moe_tiling below: a multiple of kMoeChunk, T * B <= kMoeTableCap),
//   and a workspace table [B, T] (int32, bucket-major) holds
//   (1) histogram: table[b, t] = number of slots of tile t in bucket b        (tiles in parallel)
//   (2) scan:      the exclusive scan of the table in bucket-major order: table[b, t] becomes the
//                  sorted position of tile t's first slot of bucket b; offsets[b] = table[b, 0]
//                  (b <= E), bad = S - offsets[E]                                     (one pass)
//   (3) ranks:     each tile walks its slots in slot order; the rank of a slot in bucket b is
//                  table[b, t] + the number of earlier slots of tile t in bucket b;
//                  order[rank] = slot, position[slot] = rank                    (tiles in parallel)
// No atomics: every count is made in a fixed order by one thread or one warp, and every output
// element is written exactly once.
//
// Arguments: pointers, then sizes. Pointers of the CUDA entry point are device pointers; `stream`
// is a cudaStream_t. Invalid arguments throw std::invalid_argument naming the argument (null
// pointers are allowed for order / position when S = 0); CUDA errors throw std::runtime_error.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kernelrl {

inline constexpr int64_t kMoeMaxExperts = 1024;
inline constexpr int64_t kMoeMaxTopK = 8;
inline constexpr int64_t kMoeMaxSlots = 2147483647;  // INT32_MAX
inline constexpr int64_t kMoeMaxBuckets = kMoeMaxExperts + 1;
// Slots per chunk: what one CUDA block of 256 threads holds at once (16 slots per thread).
inline constexpr int64_t kMoeChunk = 4096;
// Most entries of the [B, T] table (1 MiB of int32): tiles grow past one chunk when more would be
// needed, so that the scan (one CUDA block) stays short; T >= 255 even at E = 1024.
inline constexpr int64_t kMoeTableCap = int64_t{1} << 18;

struct MoeTiling {
  int64_t tiles;     // T >= 1 (one empty tile when S = 0)
  int64_t tile_len;  // slots per tile, a multiple of kMoeChunk; the last tile may be shorter
};

// The tiles of S slots with E experts; E must be in [1, kMoeMaxExperts], S in [0, kMoeMaxSlots].
inline MoeTiling moe_tiling(int64_t n_slots, int64_t num_experts) {
  const int64_t buckets = num_experts + 1;
  const int64_t chunks = n_slots > 0 ? (n_slots + kMoeChunk - 1) / kMoeChunk : 1;
  int64_t max_tiles = kMoeTableCap / buckets;
  if (max_tiles < 1) max_tiles = 1;
  const int64_t want = chunks < max_tiles ? chunks : max_tiles;
  const int64_t per_tile = (chunks + want - 1) / want;  // chunks per tile
  const int64_t tile_len = per_tile * kMoeChunk;
  const int64_t tiles = n_slots > 0 ? (n_slots + tile_len - 1) / tile_len : 1;
  return MoeTiling{tiles, tile_len};
}

// Elements (int32) of the workspace table moe_permute_* needs: (E + 1) * T.
inline int64_t moe_permute_workspace_size(int64_t n_slots, int64_t num_experts) {
  return (num_experts + 1) * moe_tiling(n_slots, num_experts).tiles;
}

void moe_permute_cpu(
    const void* experts,   // [N, K] int32 or int64 (id_bytes)
    int32_t* order,        // [S] out
    int32_t* offsets,      // [E + 1] out
    int32_t* position,     // [S] out
    int32_t* bad,          // [1] out: slots with an id outside [0, E)
    int32_t* workspace,    // [workspace_size] scratch: the [B, T] table
    int64_t n_tokens, int64_t top_k, int64_t num_experts, int64_t id_bytes,
    int64_t workspace_size);

// CUDA twin (compiled only with the CUDA part; see moe.cu). Same arguments plus a stream.
void moe_permute_cuda(
    const void* experts, int32_t* order, int32_t* offsets, int32_t* position, int32_t* bad,
    int32_t* workspace, int64_t n_tokens, int64_t top_k, int64_t num_experts, int64_t id_bytes,
    int64_t workspace_size, void* stream);

// ---- argument checks shared by the CPU and CUDA entry points ----------------------------------

namespace detail {

[[noreturn]] inline void moe_bad_arg(const char* fn, const char* arg, const std::string& expected,
                                     const std::string& got) {
  throw std::invalid_argument(std::string(fn) + ": " + arg + ": expected " + expected + ", got " +
                              got);
}

inline void moe_check_ptr(const char* fn, const char* arg, const void* p) {
  if (p == nullptr) moe_bad_arg(fn, arg, "a non-null pointer", "0");
}

// Validates the sizes of a permutation of n_tokens * top_k slots over num_experts experts.
inline void check_moe_sizes(const char* fn, int64_t n_tokens, int64_t top_k,
                            int64_t num_experts) {
  if (top_k < 1 || top_k > kMoeMaxTopK) {
    moe_bad_arg(fn, "top_k", "1 <= top_k <= " + std::to_string(kMoeMaxTopK),
                std::to_string(top_k));
  }
  if (n_tokens < 0) moe_bad_arg(fn, "n_tokens", ">= 0", std::to_string(n_tokens));
  if (n_tokens > kMoeMaxSlots / top_k) {
    moe_bad_arg(fn, "n_tokens", "n_tokens * top_k <= 2^31 - 1 (int32 slot indices), so <= " +
                std::to_string(kMoeMaxSlots / top_k), std::to_string(n_tokens));
  }
  if (num_experts < 1 || num_experts > kMoeMaxExperts) {
    moe_bad_arg(fn, "num_experts", "1 <= num_experts <= " + std::to_string(kMoeMaxExperts),
                std::to_string(num_experts));
  }
}

inline void check_moe_permute_args(const char* fn, const void* experts, const int32_t* order,
                                   const int32_t* offsets, const int32_t* position,
                                   const int32_t* bad, const int32_t* workspace, int64_t n_tokens,
                                   int64_t top_k, int64_t num_experts, int64_t id_bytes,
                                   int64_t workspace_size) {
  check_moe_sizes(fn, n_tokens, top_k, num_experts);
  if (id_bytes != 4 && id_bytes != 8) {
    moe_bad_arg(fn, "id_bytes", "4 (int32 ids) or 8 (int64 ids)", std::to_string(id_bytes));
  }
  const int64_t need = moe_permute_workspace_size(n_tokens * top_k, num_experts);
  if (workspace_size < need) {
    moe_bad_arg(fn, "workspace_size",
                ">= " + std::to_string(need) + " (moe_permute_workspace_size)",
                std::to_string(workspace_size));
  }
  moe_check_ptr(fn, "offsets", offsets);
  moe_check_ptr(fn, "bad", bad);
  moe_check_ptr(fn, "workspace", workspace);
  if (n_tokens == 0) return;
  moe_check_ptr(fn, "experts", experts);
  moe_check_ptr(fn, "order", order);
  moe_check_ptr(fn, "position", position);
}

}  // namespace detail

}  // namespace kernelrl
