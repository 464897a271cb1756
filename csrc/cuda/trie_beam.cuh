// One trie-constrained beam-search step on the GPU (SPEC §4), torch-free. One fused launch, one
// block per batch row:
//   1. per input beam (a warp each): its node's CSR run of children, and with `normalize` the
//      log-sum-exp of its valid children's log-probs;
//   2. an exclusive scan of the beams' child counts numbers the row's candidates 0..total-1,
//      parent-major then token order (children runs are token-sorted);
//   3. the candidates stream through in tiles of one per thread; each is scored, turned into a
//      64-bit order key (score bits above, complemented position below: larger = better, never
//      equal) and appended to a shared-memory buffer when it beats the current beam_size-th key;
//      a full buffer is bitonic-sorted and cut back to beam_size, raising that threshold;
//   4. a last sort; the best beam_size keys decode back to (score, parent, token, child node).
// Keys make the order total and identical to the CPU kernel and the PyTorch reference: best
// score, then lower parent beam, then lower token. No host sync, no allocation: graph-capturable.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparserec {
namespace trie_beam {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBeams = 1024;  // input beams and beam_size; keeps shared memory under 48 KiB
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

__device__ __forceinline__ uint64_t order_key(float score, uint32_t position) {
  const uint32_t bits = __float_as_uint(score);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (uint64_t(ordered) << 32) | (0xffffffffu - position);
}

__device__ __forceinline__ float key_score(uint64_t key) {
  const uint32_t ordered = uint32_t(key >> 32);
  return __uint_as_float((ordered & 0x80000000u) ? (ordered ^ 0x80000000u) : ~ordered);
}

__device__ __forceinline__ uint32_t key_position(uint64_t key) { return 0xffffffffu - uint32_t(key); }

__device__ __forceinline__ float warp_max(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// Sorts keys[0, n) in descending order; n a power of two. Called by the whole block.
__device__ void bitonic_sort_descending(uint64_t* keys, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int pair = threadIdx.x; pair < n / 2; pair += kThreads) {
        const int lo = 2 * pair - (pair & (stride - 1));
        const int hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const uint64_t a = keys[lo], b = keys[hi];
        if ((a < b) == descending) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Pads keys[filled, n) with 0 (below every real key) and sorts keys[0, n) descending. Block-wide.
__device__ void sort_buffer(uint64_t* keys, int filled, int n) {
  for (int i = filled + threadIdx.x; i < n; i += kThreads) keys[i] = 0;
  __syncthreads();
  bitonic_sort_descending(keys, n);
}

__host__ __device__ inline int next_power_of_two(int value) {
  int power = 1;
  while (power < value) power <<= 1;
  return power;
}

// The candidate buffer: room for beam_size kept keys plus one tile, rounded up for the sort.
__host__ __device__ inline int buffer_capacity(int beam_size) { return next_power_of_two(beam_size + kThreads); }

__host__ inline size_t shared_bytes(int num_beams, int beam_size) {
  return size_t(buffer_capacity(beam_size)) * sizeof(uint64_t)  // candidate keys
         + size_t(num_beams) * sizeof(int64_t)                   // first child of each beam
         + size_t(num_beams + 1) * sizeof(uint32_t)              // candidate offsets (scan)
         + size_t(num_beams) * 2 * sizeof(float);                // beam score, log-normaliser
}

__global__ void __launch_bounds__(kThreads) trie_beam_step_kernel(
    const float* __restrict__ log_probs,     // (B, K, V)
    const float* __restrict__ beam_scores,   // (B, K)
    const int64_t* __restrict__ nodes,       // (B, K)
    const int64_t* __restrict__ child_ptr,   // (num_nodes + 1)
    const int64_t* __restrict__ node_token,  // (num_nodes)
    int64_t num_nodes, int num_beams, int64_t vocab, int beam_size, bool normalize,
    float* __restrict__ out_scores, int64_t* __restrict__ out_parents, int64_t* __restrict__ out_tokens,
    int64_t* __restrict__ out_nodes) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int capacity = buffer_capacity(beam_size);
  uint64_t* keys = reinterpret_cast<uint64_t*>(shared);
  int64_t* first_child = reinterpret_cast<int64_t*>(keys + capacity);
  uint32_t* offset = reinterpret_cast<uint32_t*>(first_child + num_beams);  // candidate numbering
  float* base_score = reinterpret_cast<float*>(offset + num_beams + 1);
  float* log_normalizer = base_score + num_beams;
  __shared__ int filled;           // keys in the buffer
  __shared__ uint64_t threshold;   // a candidate needs a larger key to enter the top beam_size

  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float neg_inf = negative_infinity();

  // 1. Each beam's children run (count stored in offset[beam + 1] for the scan).
  for (int beam = warp; beam < num_beams; beam += kWarps) {
    const float score = beam_scores[row * num_beams + beam];
    const int64_t node = nodes[row * num_beams + beam];
    int64_t first = 0, count = 0;
    if (score > neg_inf && node >= 0 && node < num_nodes) {
      first = child_ptr[node];
      // A valid node has at most V children (distinct tokens below V); the clamp keeps a
      // malformed trie from overflowing the 32-bit candidate numbering, and a run outside the
      // node array (arrays given to the raw op unchecked) counts as no children.
      count = child_ptr[node + 1] - first;
      count = count < vocab ? count : vocab;
      if (first < 0 || count < 0 || first > num_nodes - count) first = count = 0;
    }
    float normalizer = 0.f;
    if (normalize && count > 0) {
      const float* lp = log_probs + (row * num_beams + beam) * vocab;
      float max_lp = neg_inf;
      for (int64_t c = lane; c < count; c += 32) {
        const int64_t token = node_token[first + c];
        if (token >= 0 && token < vocab) max_lp = fmaxf(max_lp, lp[token]);
      }
      max_lp = warp_max(max_lp);
      float sum = 0.f;
      if (max_lp > neg_inf) {
        for (int64_t c = lane; c < count; c += 32) {
          const int64_t token = node_token[first + c];
          if (token >= 0 && token < vocab) sum += expf(lp[token] - max_lp);
        }
      }
      sum = warp_sum(sum);
      normalizer = max_lp > neg_inf ? max_lp + logf(sum) : neg_inf;
    }
    if (lane == 0) {
      first_child[beam] = first;
      offset[beam + 1] = uint32_t(count);
      base_score[beam] = score;
      log_normalizer[beam] = normalizer;
    }
  }
  __syncthreads();

  // 2. Inclusive scan of the counts in place (one warp, 32 beams at a time).
  if (warp == 0) {
    uint32_t carry = 0;
    for (int start = 0; start < num_beams; start += 32) {
      const int beam = start + lane;
      uint32_t value = beam < num_beams ? offset[beam + 1] : 0;
      for (int delta = 1; delta < 32; delta <<= 1) {
        const uint32_t other = __shfl_up_sync(kFullMask, value, delta);
        if (lane >= delta) value += other;
      }
      if (beam < num_beams) offset[beam + 1] = carry + value;
      carry += __shfl_sync(kFullMask, value, 31);
    }
    if (lane == 0) {
      offset[0] = 0;
      filled = 0;
      threshold = 0;
    }
  }
  __syncthreads();
  const uint32_t total = offset[num_beams];

  // The beam owning candidate `position`: the last beam whose first candidate is <= position.
  const auto beam_of = [&](uint32_t position) {
    int lo = 0, hi = num_beams;  // offset[lo] <= position < offset[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (offset[mid] <= position) lo = mid; else hi = mid;
    }
    return lo;
  };

  // 3. Stream the candidates.
  for (uint32_t tile = 0; tile < total; tile += kThreads) {
    const int count_before = filled;
    __syncthreads();  // every thread has read `filled` before the buffer is cut back
    if (count_before > capacity - kThreads) {
      sort_buffer(keys, count_before, capacity);
      if (threadIdx.x == 0) {
        filled = beam_size;
        threshold = keys[beam_size - 1];
      }
      __syncthreads();
    }
    const uint64_t bar = threshold;
    const uint32_t position = tile + threadIdx.x;
    uint64_t key = 0;
    if (position < total) {
      const int beam = beam_of(position);
      const int64_t token = node_token[first_child[beam] + (position - offset[beam])];
      if (token >= 0 && token < vocab) {
        const float lp = log_probs[(row * num_beams + beam) * vocab + token];
        const float score = normalize ? base_score[beam] + (lp - log_normalizer[beam]) : base_score[beam] + lp;
        if (score > neg_inf) key = order_key(score, position);  // drops -inf and NaN
      }
    }
    const bool keep = key > bar;
    const unsigned keepers = __ballot_sync(kFullMask, keep);
    if (keepers != 0) {
      int slot = 0;
      if (lane == 0) slot = atomicAdd(&filled, __popc(keepers));
      slot = __shfl_sync(kFullMask, slot, 0);
      if (keep) keys[slot + __popc(keepers & ((1u << lane) - 1))] = key;
    }
    __syncthreads();
  }

  // 4. Sort what is left and decode the best beam_size keys.
  const int count_final = filled;
  sort_buffer(keys, count_final, next_power_of_two(count_final < 2 ? 2 : count_final));
  for (int slot = threadIdx.x; slot < beam_size; slot += kThreads) {
    const int64_t out = row * beam_size + slot;
    if (slot < count_final) {
      const uint32_t position = key_position(keys[slot]);
      const int beam = beam_of(position);
      const int64_t child = first_child[beam] + (position - offset[beam]);
      out_scores[out] = key_score(keys[slot]);
      out_parents[out] = beam;
      out_tokens[out] = node_token[child];
      out_nodes[out] = child;
    } else {
      out_scores[out] = neg_inf;
      out_parents[out] = -1;
      out_tokens[out] = -1;
      out_nodes[out] = -1;
    }
  }
}

// Launches one block per batch row on `stream`. Requires 1 <= num_beams, beam_size <= kMaxBeams
// and num_beams * vocab < 2^31 (the binding checks).
inline cudaError_t launch_trie_beam_step(const float* log_probs, const float* beam_scores, const int64_t* nodes,
                                         const int64_t* child_ptr, const int64_t* node_token, int64_t num_nodes,
                                         int64_t batch, int num_beams, int64_t vocab, int beam_size, bool normalize,
                                         float* out_scores, int64_t* out_parents, int64_t* out_tokens,
                                         int64_t* out_nodes, cudaStream_t stream) {
  trie_beam_step_kernel<<<dim3(unsigned(batch)), kThreads, shared_bytes(num_beams, beam_size), stream>>>(
      log_probs, beam_scores, nodes, child_ptr, node_token, num_nodes, num_beams, vocab, beam_size, normalize,
      out_scores, out_parents, out_tokens, out_nodes);
  return cudaGetLastError();
}

}  // namespace trie_beam
}  // namespace sparserec
