// Input checks shared by the CPU and CUDA trie_beam_step kernels. sparserec.ops.trie_beam_step
// raises friendlier errors first; these keep a raw op call from reading out of bounds. The CSR
// arrays are checked once by sparserec.generate.Trie (checking them here would read the whole
// trie on every step); instead each kernel treats a node whose child run is not inside
// [0, num_nodes] as childless, so even arbitrary arrays passed to the raw op cannot make it read
// out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace sparserec {

// A batch row's candidates are numbered in 32 bits (the low half of their order key), and a
// valid trie node has at most V children, so K * V bounds the count.
constexpr int64_t kMaxTrieCandidates = int64_t(1) << 31;
// Beams beyond the trie's node count can never be filled; beam_size may exceed it (and the K input
// beams) by up to this many padded slots (sparserec.ops.trie.MAX_PADDED_BEAMS): this bounds the
// outputs' memory for any beam_size.
constexpr int64_t kMaxPaddedBeams = 1024;

inline void check_trie_beam_step_inputs(const at::Tensor& log_probs, const at::Tensor& beam_scores,
                                        const at::Tensor& nodes, const at::Tensor& child_ptr,
                                        const at::Tensor& node_token, int64_t beam_size) {
  TORCH_CHECK_VALUE(log_probs.dim() == 3, "log_probs must be (B, K, V), got shape ", log_probs.sizes());
  TORCH_CHECK_TYPE(log_probs.scalar_type() == at::kFloat, "log_probs must be float32, got ",
                   log_probs.scalar_type());
  const int64_t batch = log_probs.size(0), beams = log_probs.size(1), vocab = log_probs.size(2);
  TORCH_CHECK_VALUE(beam_scores.dim() == 2 && beam_scores.size(0) == batch && beam_scores.size(1) == beams,
                    "beam_scores must be (B, K) = (", batch, ", ", beams, "), got ", beam_scores.sizes());
  TORCH_CHECK_TYPE(beam_scores.scalar_type() == at::kFloat, "beam_scores must be float32, got ",
                   beam_scores.scalar_type());
  TORCH_CHECK_VALUE(nodes.dim() == 2 && nodes.size(0) == batch && nodes.size(1) == beams,
                    "nodes must be (B, K) = (", batch, ", ", beams, "), got ", nodes.sizes());
  TORCH_CHECK_TYPE(nodes.scalar_type() == at::kLong, "nodes must be int64, got ", nodes.scalar_type());
  TORCH_CHECK_VALUE(child_ptr.dim() == 1 && child_ptr.numel() >= 2,
                    "child_ptr must be 1-D with num_nodes + 1 >= 2 entries, got ", child_ptr.sizes());
  TORCH_CHECK_VALUE(node_token.dim() == 1 && node_token.numel() == child_ptr.numel() - 1,
                    "node_token must be (num_nodes,) = (", child_ptr.numel() - 1, ",), got ", node_token.sizes());
  TORCH_CHECK_TYPE(child_ptr.scalar_type() == at::kLong && node_token.scalar_type() == at::kLong,
                   "child_ptr and node_token must be int64");
  TORCH_CHECK_VALUE(beam_size >= 1, "beam_size must be positive, got ", beam_size);
  const int64_t max_beam_size = std::max({kMaxPaddedBeams, node_token.numel(), log_probs.size(1)});
  TORCH_CHECK_VALUE(beam_size <= max_beam_size, "beam_size=", beam_size, " is larger than the trie's ",
                    node_token.numel(), " nodes, the K=", log_probs.size(1), " input beams and ", kMaxPaddedBeams,
                    ": no step can fill more beams than there are nodes");
  TORCH_CHECK_VALUE(beams * vocab < kMaxTrieCandidates, "K * V = ", beams * vocab, " must be below 2^31");
  for (const at::Tensor* tensor : {&beam_scores, &nodes, &child_ptr, &node_token}) {
    TORCH_CHECK_VALUE(tensor->device() == log_probs.device(), "all tensors must be on one device, got ",
                      log_probs.device(), " and ", tensor->device());
  }
}

}  // namespace sparserec
