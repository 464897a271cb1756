// CUDA kernels of sparserec::jsa_select (torch-free; the binding is jsa_select.cu). Same results,
// bit for bit, as the CPU kernel and the Python twin sparserec.reference.jsa.select_blocks:
// importance is accumulated in double in the same order (heads of the group per token, then
// tokens, then compressed blocks), and ties go to the lower block index.
//
// No host synchronisation: a one-block kernel turns cu_seqlens into query-tile offsets on the
// device, and the selection kernel is launched over a bound on the tile count that needs no data
// (sum over sequences of ceil(len/Bq) <= ceil(T_total/Bq) + B); blocks past the real count exit.
// Offsets are not validated on the device (that would need a sync; the Python wrapper checks them),
// so every read and write is clamped to stay in bounds whatever they hold.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparserec {
namespace jsa_select_kernels {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

struct SelectParams {
  int64_t total_tokens, num_seqs, heads, num_cols;
  int64_t block, stride, select_block, top_n, select_q_block, num_kv_heads;
  bool causal;
};

__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// fp16/bf16 through their intrinsics: torch builds define __CUDA_NO_HALF_CONVERSIONS__.
__device__ inline double to_double(float x) { return x; }
__device__ inline double to_double(double x) { return x; }
__device__ inline double to_double(__half x) { return __half2float(x); }
__device__ inline double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }

// Block (value, index) ranks before (other_value, other_index): larger importance, then lower index.
__device__ inline bool ranks_before(double value, int64_t index, double other_value, int64_t other_index) {
  return value > other_value || (value == other_value && index < other_index);
}

// Tokens [start, end) of sequence s, clamped into [0, total_tokens).
__device__ inline void sequence_span(const int64_t* cu_seqlens, int64_t s, int64_t total_tokens, int64_t& start,
                                     int64_t& end) {
  start = min64(max64(cu_seqlens[s], 0), total_tokens);
  end = min64(max64(cu_seqlens[s + 1], start), total_tokens);
}

// Inclusive prefix sum of `value` over the block's threads; `warp_totals` is kWarps shared slots.
__device__ inline int64_t block_inclusive_sum(int64_t value, int64_t* warp_totals) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t below = __shfl_up_sync(kFullMask, value, offset);
    if (lane >= offset) value += below;
  }
  if (lane == 31) warp_totals[warp] = value;
  __syncthreads();
  for (int w = 0; w < warp; ++w) value += warp_totals[w];
  __syncthreads();
  return value;
}

// cu_tiles[s] = query tiles of the sequences before s (B+1 entries). One block of kThreads.
__global__ void tile_offsets_kernel(const int64_t* cu_seqlens, SelectParams params, int64_t* cu_tiles) {
  __shared__ int64_t warp_totals[kWarps];
  __shared__ int64_t tiles_before_chunk;
  if (threadIdx.x == 0) {
    cu_tiles[0] = 0;
    tiles_before_chunk = 0;
  }
  __syncthreads();
  for (int64_t chunk = 0; chunk < params.num_seqs; chunk += kThreads) {
    const int64_t s = chunk + threadIdx.x;
    int64_t tiles = 0;
    if (s < params.num_seqs) {
      int64_t start, end;
      sequence_span(cu_seqlens, s, params.total_tokens, start, end);
      tiles = ceil_div(end - start, params.select_q_block);
    }
    const int64_t inclusive = block_inclusive_sum(tiles, warp_totals);
    if (s < params.num_seqs) cu_tiles[s + 1] = tiles_before_chunk + inclusive;
    __syncthreads();
    if (threadIdx.x == kThreads - 1) tiles_before_chunk += inclusive;
    __syncthreads();
  }
}

// The block-wide best (value, index) under ranks_before; index -1 marks "no candidate".
__device__ inline void block_best(double& value, int64_t& index, double* warp_values, int64_t* warp_indices) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const double other_value = __shfl_xor_sync(kFullMask, value, offset);
    const int64_t other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (other_index >= 0 && (index < 0 || ranks_before(other_value, other_index, value, index))) {
      value = other_value;
      index = other_index;
    }
  }
  if (threadIdx.x % 32 == 0) {
    warp_values[threadIdx.x / 32] = value;
    warp_indices[threadIdx.x / 32] = index;
  }
  __syncthreads();
  // Every thread folds the same warp results in the same order, so all agree even when NaN
  // importances make the order partial (a disagreement would split the block at a barrier).
  index = -1;
  for (int w = 0; w < kWarps; ++w) {
    if (warp_indices[w] >= 0 && (index < 0 || ranks_before(warp_values[w], warp_indices[w], value, index))) {
      value = warp_values[w];
      index = warp_indices[w];
    }
  }
  __syncthreads();
}

// Importance of selection block j: column sums of the compressed blocks i overlapping
// [j*l', (j+1)*l'), i.e. i*stride < (j+1)*l' and i*stride + block > j*l', in ascending i.
__device__ inline double block_importance(const double* column_sum, int64_t num_cmp, int64_t j,
                                          const SelectParams& params) {
  const int64_t sel_start = j * params.select_block;
  const int64_t first = sel_start >= params.block ? (sel_start - params.block) / params.stride + 1 : 0;
  const int64_t end = min64(num_cmp, ceil_div(sel_start + params.select_block, params.stride));
  double importance = 0.0;
  for (int64_t i = first; i < end; ++i) importance += column_sum[i];
  return importance;
}

// One block per (query tile slot, kv head). Dynamic shared memory: num_cols doubles.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    select_kernel(const scalar_t* p_cmp, const int64_t* cu_seqlens, const int64_t* cu_tiles, SelectParams params,
                  int64_t* out) {
  extern __shared__ double column_sum[];
  __shared__ double warp_values[kWarps];
  __shared__ int64_t warp_indices[kWarps];

  const int64_t slot = blockIdx.x, kv_head = blockIdx.y;
  if (slot >= cu_tiles[params.num_seqs]) return;
  // The tile's sequence: the last s with cu_tiles[s] <= slot (empty sequences share offsets).
  int64_t seq = 0, upper = params.num_seqs - 1;
  while (seq < upper) {
    const int64_t mid = (seq + upper + 1) / 2;
    if (cu_tiles[mid] <= slot) {
      seq = mid;
    } else {
      upper = mid - 1;
    }
  }
  int64_t seq_start, seq_end;
  sequence_span(cu_seqlens, seq, params.total_tokens, seq_start, seq_end);
  const int64_t length = seq_end - seq_start;
  const int64_t first_token = seq_start + (slot - cu_tiles[seq]) * params.select_q_block;
  const int64_t end_token = min64(first_token + params.select_q_block, seq_end);
  const int64_t last_position = end_token - 1 - seq_start;
  const int64_t full_blocks = length >= params.block ? (length - params.block) / params.stride + 1 : 0;
  const int64_t num_cmp = min64(full_blocks, params.num_cols);
  const int64_t num_sel = ceil_div(length, params.select_block);
  // Eligible blocks are a prefix: causal keeps j*l' <= the tile's last position.
  const int64_t num_eligible = params.causal ? min64(num_sel, last_position / params.select_block + 1) : num_sel;
  const int64_t group = params.heads / params.num_kv_heads;

  for (int64_t i = threadIdx.x; i < num_cmp; i += kThreads) {
    double sum = 0.0;
    for (int64_t t = first_token; t < end_token; ++t) {
      const scalar_t* row = p_cmp + (t * params.heads + kv_head * group) * params.num_cols + i;
      double per_token = to_double(row[0]);
      for (int64_t h = 1; h < group; ++h) per_token += to_double(row[h * params.num_cols]);
      sum += per_token;
    }
    column_sum[i] = sum;
  }
  __syncthreads();

  // Top-N by repeated arg-max: round r takes the best block ranking after round r-1's pick, so
  // the last pick is a threshold that separates the chosen blocks from the rest.
  double threshold_value = 0.0;
  int64_t threshold_index = -1;
  const bool take_all = num_eligible <= params.top_n;
  for (int64_t round = 0; !take_all && round < params.top_n; ++round) {
    double best_value = 0.0;
    int64_t best_index = -1;
    for (int64_t j = threadIdx.x; j < num_eligible; j += kThreads) {
      const double value = block_importance(column_sum, num_cmp, j, params);
      const bool not_taken = threshold_index < 0 || ranks_before(threshold_value, threshold_index, value, j);
      if (not_taken && (best_index < 0 || ranks_before(value, j, best_value, best_index))) {
        best_value = value;
        best_index = j;
      }
    }
    block_best(best_value, best_index, warp_values, warp_indices);
    if (best_index < 0) break;  // only NaN importances are left
    threshold_value = best_value;
    threshold_index = best_index;
  }

  // Write the chosen blocks in ascending order: a block's slot is the count of chosen blocks below it.
  int64_t* tile_out = out + (first_token * params.num_kv_heads + kv_head) * params.top_n;
  const int64_t token_stride = params.num_kv_heads * params.top_n;
  int64_t* warp_counts = warp_indices;
  int64_t num_written = 0;
  for (int64_t chunk = 0; chunk < num_eligible; chunk += kThreads) {
    const int64_t j = chunk + threadIdx.x;
    bool chosen = j < num_eligible;
    if (chosen && !take_all) {
      const double value = block_importance(column_sum, num_cmp, j, params);
      chosen = threshold_index >= 0 &&
               (j == threshold_index || ranks_before(value, j, threshold_value, threshold_index));
    }
    const unsigned ballot = __ballot_sync(kFullMask, chosen);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int64_t position = num_written + __popc(ballot & ((1u << lane) - 1));
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) position += warp_counts[w];
      num_written += warp_counts[w];
    }
    __syncthreads();
    if (chosen && position < params.top_n) {
      for (int64_t t = 0; t < end_token - first_token; ++t) tile_out[t * token_stride + position] = j;
    }
  }
  const int64_t num_chosen = min64(num_written, params.top_n);
  const int64_t padding = params.top_n - num_chosen;
  for (int64_t k = threadIdx.x; k < (end_token - first_token) * padding; k += kThreads) {
    tile_out[(k / padding) * token_stride + num_chosen + k % padding] = -1;
  }
}

// Dynamic shared memory select_kernel<scalar_t> may use per block on `device`.
template <typename scalar_t>
cudaError_t max_dynamic_shared_bytes(int device, int64_t* bytes) {
  int optin = 0;
  cudaFuncAttributes attributes{};
  cudaError_t status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status == cudaSuccess) status = cudaFuncGetAttributes(&attributes, select_kernel<scalar_t>);
  *bytes = static_cast<int64_t>(optin) - static_cast<int64_t>(attributes.sharedSizeBytes);
  return status;
}

// Launches both kernels on `stream`. cu_tiles: B+1 int64 of device scratch. The caller checks
// that num_cols doubles fit max_dynamic_shared_bytes and that num_kv_heads fits a grid dimension.
template <typename scalar_t>
cudaError_t launch_select(const scalar_t* p_cmp, const int64_t* cu_seqlens, int64_t* cu_tiles,
                          const SelectParams& params, int64_t* out, cudaStream_t stream) {
  const int64_t tile_bound = ceil_div(params.total_tokens, params.select_q_block) + params.num_seqs;
  if (params.num_seqs == 0 || tile_bound == 0) return cudaSuccess;
  tile_offsets_kernel<<<1, kThreads, 0, stream>>>(cu_seqlens, params, cu_tiles);
  const size_t shared_bytes = static_cast<size_t>(params.num_cols) * sizeof(double);
  cudaError_t status =
      cudaFuncSetAttribute(select_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(tile_bound), static_cast<unsigned>(params.num_kv_heads));
  select_kernel<scalar_t><<<grid, kThreads, shared_bytes, stream>>>(p_cmp, cu_seqlens, cu_tiles, params, out);
  return cudaGetLastError();
}

}  // namespace jsa_select_kernels
}  // namespace sparserec
