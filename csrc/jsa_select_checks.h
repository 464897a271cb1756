// Argument checks shared by the CPU and CUDA kernels of sparserec::jsa_select (the device checks
// differ and stay with each kernel).
#pragma once
#include <torch/types.h>

namespace sparserec {

inline void check_jsa_select_args(const at::Tensor& p_cmp, const at::Tensor& cu_seqlens, int64_t block,
                                  int64_t stride, int64_t select_block, int64_t top_n, int64_t select_q_block,
                                  int64_t num_kv_heads) {
  TORCH_CHECK(p_cmp.dim() == 3, "jsa_select: p_cmp must be (T_total, H, C), got shape ", p_cmp.sizes());
  const auto dtype = p_cmp.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "jsa_select: p_cmp must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
              "jsa_select: cu_seqlens must be a 1-D tensor of B+1 offsets, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
              "jsa_select: cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(block >= 1 && stride >= 1 && select_block >= 1 && top_n >= 1 && select_q_block >= 1,
              "jsa_select: block, stride, select_block, top_n and select_q_block must be >= 1, got ", block, ", ",
              stride, ", ", select_block, ", ", top_n, ", ", select_q_block);
  const int64_t heads = p_cmp.size(1);
  TORCH_CHECK(num_kv_heads >= 1 && heads % num_kv_heads == 0, "jsa_select: query heads (", heads,
              ") must be a positive multiple of num_kv_heads (", num_kv_heads, ")");
}

}  // namespace sparserec
