// Argument checks and per-batch plans (sequence offsets, compressed offsets, anchors) of the fused
// CPU JSA kernels. The public Python ops validate first; these checks keep the raw ops memory-safe.
#pragma once
#include <torch/types.h>

#include <vector>

namespace sparserec {

// Full compressed blocks of a sequence: i*stride + block <= length.
inline int64_t num_compressed_blocks(int64_t length, int64_t block, int64_t stride) {
  return length >= block ? (length - block) / stride + 1 : 0;
}

inline std::vector<int64_t> read_offsets(const char* op, const char* name, const at::Tensor& cu) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2 && (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong),
              op, ": ", name, " must be a 1-D int32/int64 tensor of B+1 offsets, got ", cu.scalar_type(), " ",
              cu.sizes());
  TORCH_CHECK(cu.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", cu.device());
  const at::Tensor values = cu.to(at::kLong).contiguous();
  std::vector<int64_t> out(values.data_ptr<int64_t>(), values.data_ptr<int64_t>() + values.numel());
  TORCH_CHECK(out[0] == 0, op, ": ", name, "[0] must be 0, got ", out[0]);
  for (size_t i = 1; i < out.size(); ++i) {
    TORCH_CHECK(out[i] >= out[i - 1], op, ": ", name, " must be non-decreasing, but ", name, "[", i, "]=", out[i],
                " < ", name, "[", i - 1, "]=", out[i - 1]);
  }
  return out;
}

struct CompressSeq {
  int64_t token_start, length, block_start, num_blocks;
};

// Checks cu_seqlens / cu_cmp against the token and block counts; one entry per sequence.
inline std::vector<CompressSeq> compress_plan(const char* op, const at::Tensor& cu_seqlens, const at::Tensor& cu_cmp,
                                              int64_t total_tokens, int64_t total_blocks, int64_t block,
                                              int64_t stride) {
  const auto cu = read_offsets(op, "cu_seqlens", cu_seqlens);
  const auto cc = read_offsets(op, "cu_cmp", cu_cmp);
  TORCH_CHECK(cu.size() == cc.size(), op, ": cu_seqlens and cu_cmp must describe the same sequences, got ",
              cu.size() - 1, " and ", cc.size() - 1);
  TORCH_CHECK(cu.back() == total_tokens, op, ": cu_seqlens[-1] (", cu.back(), ") must equal the number of tokens (",
              total_tokens, ")");
  // Rows past cu_cmp[-1] are padding (a static bound on the row count, so shapes need no data) and never read.
  TORCH_CHECK(cc.back() <= total_blocks, op, ": cu_cmp[-1] (", cc.back(), ") must not exceed the rows of the "
              "compressed tensor (", total_blocks, ")");
  std::vector<CompressSeq> seqs;
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t length = cu[s + 1] - cu[s], count = cc[s + 1] - cc[s];
    TORCH_CHECK(count == num_compressed_blocks(length, block, stride), op, ": sequence ", s, " has ", length,
                " tokens, hence ", num_compressed_blocks(length, block, stride), " compressed blocks, but cu_cmp gives ",
                count);
    seqs.push_back({cu[s], length, cc[s], count});
  }
  return seqs;
}

inline void check_float_cpu(const char* op, const char* name, const at::Tensor& t, int64_t ndim,
                            at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must have ", ndim, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
}

inline void check_compress_args(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pe,
                                int64_t block, int64_t stride) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32 and float64, got ", x.scalar_type());
  check_float_cpu(op, "x", x, 3, x.scalar_type());
  check_float_cpu(op, "weight", weight, 4, x.scalar_type());
  check_float_cpu(op, "pe", pe, 3, x.scalar_type());
  TORCH_CHECK(block >= 1 && stride >= 1 && stride <= block, op, ": need 1 <= stride <= block, got block=", block,
              ", stride=", stride);
  const int64_t heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({heads, block, dim, dim}), op,
              ": weight must be (Hkv, block, D, D) = (", heads, ", ", block, ", ", dim, ", ", dim, "), got ",
              weight.sizes());
  TORCH_CHECK(pe.sizes() == at::IntArrayRef({heads, block, dim}), op, ": pe must be (Hkv, block, D) = (", heads, ", ",
              block, ", ", dim, "), got ", pe.sizes());
}

}  // namespace sparserec
