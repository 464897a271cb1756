// The top-N step of the slc branch (SPEC §1), shared by the jsa_select kernel and the fused JSA
// kernel: from one query tile's importance per compressed block to its selected blocks.
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace sparserec {

struct SelectionShape {
  int64_t block, stride, select_block, top_n;
};

// importance[i] for compressed blocks i < num_cmp (double). Block j's score sums the compressed blocks
// overlapping [j*l', (j+1)*l'); of the first num_eligible of num_sel blocks, `chosen` gets the top_n
// of largest score (ties: lower j), ascending. block_score is scratch.
inline void select_top_blocks(const double* importance, int64_t num_cmp, int64_t num_sel, int64_t num_eligible,
                              const SelectionShape& shape, std::vector<double>& block_score,
                              std::vector<int64_t>& chosen) {
  block_score.assign(num_sel, 0.0);
  for (int64_t j = 0; j < num_sel; ++j) {
    // Compressed block i overlaps selection block j when i*stride < (j+1)*l' and i*stride + block > j*l'.
    const int64_t sel_start = j * shape.select_block;
    const int64_t first = sel_start >= shape.block ? (sel_start - shape.block) / shape.stride + 1 : 0;
    const int64_t end = std::min(num_cmp, (sel_start + shape.select_block + shape.stride - 1) / shape.stride);
    for (int64_t i = first; i < end; ++i) block_score[j] += importance[i];
  }
  const int64_t taken = std::min(num_eligible, shape.top_n);
  chosen.resize(num_eligible);
  std::iota(chosen.begin(), chosen.end(), 0);
  if (num_eligible > shape.top_n) {
    std::partial_sort(chosen.begin(), chosen.begin() + taken, chosen.end(), [&](int64_t a, int64_t b) {
      return block_score[a] > block_score[b] || (block_score[a] == block_score[b] && a < b);
    });
    chosen.resize(taken);
    std::sort(chosen.begin(), chosen.end());
  }
}

}  // namespace sparserec
