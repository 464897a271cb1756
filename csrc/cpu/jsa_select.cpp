// CPU kernel of sparserec::jsa_select, the top-N intra-journey block selection (SPEC §1, slc).
// Python twin: sparserec.reference.jsa.select_blocks. One work item per (query tile, kv head),
// spread over torch's intra-op threads; importance is accumulated in double in the twin's order (heads of
// the group per token, then tokens, then compressed blocks) so ties resolve identically.
#include "cpu/select_top_blocks.h"
#include "jsa_select_checks.h"
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

namespace sparserec {
namespace {

struct SelectConfig {
  int64_t block, stride, select_block, top_n, select_q_block, num_kv_heads;
  bool causal;
};

// Full compressed blocks of a sequence: i*stride + block <= length.
int64_t num_compressed_blocks(int64_t length, const SelectConfig& cfg) {
  return length >= cfg.block ? (length - cfg.block) / cfg.stride + 1 : 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One query tile of one sequence: tokens [first_token, end_token) of the packed batch.
struct Tile {
  int64_t first_token, end_token;
  int64_t last_position;  // sequence-local position of the tile's last token
  int64_t num_cmp, num_sel;
};

template <typename scalar_t>
void select_tiles(const scalar_t* p_cmp, int64_t heads, int64_t num_cols, const std::vector<Tile>& tiles,
                  const SelectConfig& cfg, int64_t* out, std::atomic<bool>& saw_nonfinite) {
  const int64_t group = heads / cfg.num_kv_heads;
  const int64_t num_items = static_cast<int64_t>(tiles.size()) * cfg.num_kv_heads;
  // torch's own thread pool (grain 1: tiles of different sequences differ in cost).
  at::parallel_for(0, num_items, 1, [&](int64_t item_begin, int64_t item_end) {
    std::vector<double> column_sum, per_token, importance;
    std::vector<int64_t> order;
    for (int64_t item = item_begin; item < item_end; ++item) {
      const Tile& tile = tiles[item / cfg.num_kv_heads];
      const int64_t kv_head = item % cfg.num_kv_heads;

      column_sum.assign(tile.num_cmp, 0.0);
      per_token.resize(tile.num_cmp);
      for (int64_t t = tile.first_token; t < tile.end_token; ++t) {
        const scalar_t* row = p_cmp + (t * heads + kv_head * group) * num_cols;
        for (int64_t i = 0; i < tile.num_cmp; ++i) per_token[i] = static_cast<double>(row[i]);
        for (int64_t h = 1; h < group; ++h) {
          for (int64_t i = 0; i < tile.num_cmp; ++i) per_token[i] += static_cast<double>(row[h * num_cols + i]);
        }
        for (int64_t i = 0; i < tile.num_cmp; ++i) column_sum[i] += per_token[i];
      }
      if (!std::all_of(column_sum.begin(), column_sum.end(), [](double x) { return std::isfinite(x); })) {
        saw_nonfinite = true;
        continue;
      }

      // Eligible blocks are a prefix: causal keeps j*l' <= the tile's last position.
      const int64_t num_eligible =
          cfg.causal ? std::min(tile.num_sel, tile.last_position / cfg.select_block + 1) : tile.num_sel;
      select_top_blocks(column_sum.data(), tile.num_cmp, tile.num_sel, num_eligible,
                        {cfg.block, cfg.stride, cfg.select_block, cfg.top_n}, importance, order);
      const int64_t num_taken = static_cast<int64_t>(order.size());
      for (int64_t t = tile.first_token; t < tile.end_token; ++t) {
        int64_t* chosen = out + (t * cfg.num_kv_heads + kv_head) * cfg.top_n;
        std::copy(order.begin(), order.begin() + num_taken, chosen);
        std::fill(chosen + num_taken, chosen + cfg.top_n, -1);
      }
    }
  });
}

at::Tensor jsa_select_cpu(const at::Tensor& p_cmp, const at::Tensor& cu_seqlens, int64_t block, int64_t stride,
                          int64_t select_block, int64_t top_n, int64_t select_q_block, int64_t num_kv_heads,
                          bool causal) {
  check_jsa_select_args(p_cmp, cu_seqlens, block, stride, select_block, top_n, select_q_block, num_kv_heads);
  TORCH_CHECK(p_cmp.device().is_cpu() && cu_seqlens.device().is_cpu(),
              "jsa_select (CPU kernel): p_cmp and cu_seqlens must be CPU tensors, got ", p_cmp.device(), " and ",
              cu_seqlens.device());
  const int64_t total = p_cmp.size(0), heads = p_cmp.size(1), num_cols = p_cmp.size(2);
  const SelectConfig cfg{block, stride, select_block, top_n, select_q_block, num_kv_heads, causal};

  const at::Tensor offsets = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* cu = offsets.data_ptr<int64_t>();
  const int64_t num_seqs = offsets.numel() - 1;
  TORCH_CHECK(cu[0] == 0, "jsa_select: cu_seqlens[0] must be 0, got ", cu[0]);
  TORCH_CHECK(cu[num_seqs] == total, "jsa_select: cu_seqlens[-1] (", cu[num_seqs],
              ") must equal the number of packed tokens (", total, ")");
  std::vector<Tile> tiles;
  tiles.reserve(ceil_div(total, select_q_block) + num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t start = cu[s], length = cu[s + 1] - cu[s];
    TORCH_CHECK(length >= 0, "jsa_select: cu_seqlens must be non-decreasing, but cu_seqlens[", s + 1, "]=",
                cu[s + 1], " < cu_seqlens[", s, "]=", cu[s]);
    const int64_t num_cmp = num_compressed_blocks(length, cfg);
    TORCH_CHECK(num_cmp <= num_cols, "jsa_select: sequence ", s, " has ", length, " tokens, hence ", num_cmp,
                " compressed blocks, but p_cmp has only ", num_cols, " columns");
    for (int64_t first = 0; first < length; first += select_q_block) {
      const int64_t end = std::min(first + select_q_block, length);
      tiles.push_back({start + first, start + end, end - 1, num_cmp, ceil_div(length, select_block)});
    }
  }

  at::Tensor out = at::empty({total, num_kv_heads, top_n}, p_cmp.options().dtype(at::kLong));
  const at::Tensor probs = p_cmp.contiguous();
  std::atomic<bool> saw_nonfinite{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "jsa_select_cpu", [&] {
    select_tiles<scalar_t>(probs.data_ptr<scalar_t>(), heads, num_cols, tiles, cfg, out.data_ptr<int64_t>(),
                           saw_nonfinite);
  });
  TORCH_CHECK(!saw_nonfinite, "jsa_select: p_cmp holds non-finite values (NaN or inf) in some sequence's blocks");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparserec, CPU, m) { m.impl("jsa_select", &jsa_select_cpu); }

}  // namespace sparserec
