// Builds the CSR trie of item token paths (layout: sparserec/generate/trie.py; the pure-PyTorch
// twin is sparserec/reference/trie.py:build_trie_csr).
//
// Sort the items' paths lexicographically; then, walking the sorted rows, a row starts a new node
// at every level from the first column where it differs from the previous row. Numbering nodes
// level by level in sorted order puts each node's children in one contiguous, token-sorted run.
// Sorting is O(N log N) on 64-bit keys packing as many leading columns as fit (all of them for
// 256 codes x depth 8); rows whose packed keys tie are then ordered by their remaining columns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace {

struct PackedRow {
  uint64_t key;  // leading columns, each shifted by its minimum, packed most significant first
  int64_t item;
};

int bit_width(uint64_t value) { return value == 0 ? 0 : 64 - __builtin_clzll(value); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> trie_build_cpu(const at::Tensor& paths_in) {
  TORCH_CHECK_VALUE(paths_in.dim() == 2 && paths_in.size(0) > 0 && paths_in.size(1) > 0,
                    "paths must be a non-empty (num_items, depth) tensor, got shape ", paths_in.sizes());
  TORCH_CHECK_TYPE(paths_in.scalar_type() == at::kLong, "paths must be int64, got ", paths_in.scalar_type());
  TORCH_CHECK_VALUE(paths_in.device().is_cpu(), "paths must be on the CPU, got ", paths_in.device());
  const at::Tensor paths = paths_in.contiguous();
  const int64_t num_items = paths.size(0), depth = paths.size(1);
  const int64_t* path = paths.data_ptr<int64_t>();

  std::vector<int64_t> column_min(depth), column_max(depth);
  for (int64_t level = 0; level < depth; ++level) {
    column_min[level] = column_max[level] = path[level];
  }
  for (int64_t item = 0; item < num_items; ++item) {
    for (int64_t level = 0; level < depth; ++level) {
      const int64_t token = path[item * depth + level];
      TORCH_CHECK_VALUE(token >= 0, "paths must hold non-negative token ids, got ", token, " at item ",
                        item, ", level ", level);
      column_min[level] = std::min(column_min[level], token);
      column_max[level] = std::max(column_max[level], token);
    }
  }
  std::vector<int> column_bits(depth);
  int64_t packed_columns = 0;
  for (int total_bits = 0; packed_columns < depth; ++packed_columns) {
    const int bits = bit_width(uint64_t(column_max[packed_columns] - column_min[packed_columns]));
    if (total_bits + bits > 64) break;
    column_bits[packed_columns] = bits;
    total_bits += bits;
  }

  std::vector<PackedRow> rows(num_items);
  at::parallel_for(0, num_items, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      uint64_t key = 0;
      for (int64_t level = 0; level < packed_columns; ++level) {
        key = (key << column_bits[level]) | uint64_t(path[item * depth + level] - column_min[level]);
      }
      rows[item] = {key, item};
    }
  });
  std::sort(rows.begin(), rows.end(), [](const PackedRow& a, const PackedRow& b) {
    return a.key != b.key ? a.key < b.key : a.item < b.item;
  });
  if (packed_columns < depth) {
    const auto remaining_less = [&](const PackedRow& a, const PackedRow& b) {
      return std::lexicographical_compare(path + a.item * depth + packed_columns, path + (a.item + 1) * depth,
                                          path + b.item * depth + packed_columns, path + (b.item + 1) * depth);
    };
    for (int64_t begin = 0, end; begin < num_items; begin = end) {
      for (end = begin + 1; end < num_items && rows[end].key == rows[begin].key; ++end) {
      }
      if (end - begin > 1) std::stable_sort(rows.begin() + begin, rows.begin() + end, remaining_less);
    }
  }

  // first_diff[r]: first level where sorted row r differs from row r - 1 (0 for the first row).
  std::vector<int32_t> first_diff(num_items, 0);
  std::vector<int64_t> nodes_at_level(depth, 0);
  for (int64_t r = 0; r < num_items; ++r) {
    int64_t level = 0;
    if (r > 0) {
      const int64_t* row = path + rows[r].item * depth;
      const int64_t* previous = path + rows[r - 1].item * depth;
      while (level < depth && row[level] == previous[level]) ++level;
      TORCH_CHECK_VALUE(level < depth, "items ", rows[r - 1].item, " and ", rows[r].item,
                        " have the same path; every item needs a unique path (add a collision token)");
    }
    first_diff[r] = int32_t(level);
    for (; level < depth; ++level) ++nodes_at_level[level];
  }

  // Node 0 is the root; level l (tokens at column l) holds nodes level_start[l+1]..level_start[l+2].
  at::Tensor level_start = at::empty({depth + 2}, paths.options());
  int64_t* start = level_start.data_ptr<int64_t>();
  start[0] = 0;
  start[1] = 1;
  for (int64_t level = 0; level < depth; ++level) start[level + 2] = start[level + 1] + nodes_at_level[level];
  const int64_t num_nodes = start[depth + 1];

  at::Tensor child_ptr = at::empty({num_nodes + 1}, paths.options());
  at::Tensor node_token = at::empty({num_nodes}, paths.options());
  at::Tensor leaf_item = at::empty({num_items}, paths.options());
  int64_t* children = child_ptr.data_ptr<int64_t>();
  int64_t* token = node_token.data_ptr<int64_t>();
  int64_t* item_of_leaf = leaf_item.data_ptr<int64_t>();
  children[0] = 1;
  token[0] = -1;  // the root has no incoming token
  std::fill(children + start[depth], children + num_nodes + 1, num_nodes);  // leaves: no children
  std::vector<int64_t> current(depth);  // the newest node id at each level
  for (int64_t level = 0; level < depth; ++level) current[level] = start[level + 1] - 1;
  for (int64_t r = 0; r < num_items; ++r) {
    const int64_t* row = path + rows[r].item * depth;
    for (int64_t level = first_diff[r]; level < depth; ++level) {
      const int64_t node = ++current[level];
      token[node] = row[level];
      if (level > first_diff[r]) children[current[level - 1]] = node;
    }
    item_of_leaf[r] = rows[r].item;
  }
  return {child_ptr, node_token, leaf_item, level_start};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparserec, CPU, m) { m.impl("trie_build", &trie_build_cpu); }
