// One trie-constrained beam-search step on the CPU (SPEC §4): batch rows in parallel; within a
// row, every live beam's valid children are scored and the best beam_size are kept in a heap.
// Same contract and order as the CUDA kernel (csrc/cuda/trie_beam.cuh) and the PyTorch reference
// (sparserec/reference/trie.py): best first by score, ties to the lower parent beam, then the
// lower token; candidates scoring -inf or NaN are dropped.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "trie_beam.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The score's bits mapped to an unsigned integer in the same order (also orders -0.0 below
// +0.0), so all three implementations rank equal-valued scores identically.
uint32_t ordered_bits(float score) {
  uint32_t bits;
  std::memcpy(&bits, &score, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

struct Candidate {
  uint32_t order;  // ordered_bits(score)
  float score;
  int64_t parent;
  int64_t child;  // node id; within one parent, node order is token order
};

// True when a ranks before b.
bool ranks_before(const Candidate& a, const Candidate& b) {
  if (a.order != b.order) return a.order > b.order;
  if (a.parent != b.parent) return a.parent < b.parent;
  return a.child < b.child;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> trie_beam_step_cpu(
    const at::Tensor& log_probs_in, const at::Tensor& beam_scores_in, const at::Tensor& nodes_in,
    const at::Tensor& child_ptr_in, const at::Tensor& node_token_in, int64_t beam_size, bool normalize) {
  sparserec::check_trie_beam_step_inputs(log_probs_in, beam_scores_in, nodes_in, child_ptr_in, node_token_in,
                                         beam_size);
  const at::Tensor log_probs = log_probs_in.contiguous(), beam_scores = beam_scores_in.contiguous();
  const at::Tensor nodes = nodes_in.contiguous(), child_ptr = child_ptr_in.contiguous();
  const at::Tensor node_token = node_token_in.contiguous();
  const int64_t batch = log_probs.size(0), beams = log_probs.size(1), vocab = log_probs.size(2);
  const int64_t num_nodes = node_token.numel();

  at::Tensor out_scores = at::empty({batch, beam_size}, beam_scores.options());
  at::Tensor out_parents = at::empty({batch, beam_size}, nodes.options());
  at::Tensor out_tokens = at::empty({batch, beam_size}, nodes.options());
  at::Tensor out_nodes = at::empty({batch, beam_size}, nodes.options());
  const float* log_prob = log_probs.data_ptr<float>();
  const float* beam_score = beam_scores.data_ptr<float>();
  const int64_t* node = nodes.data_ptr<int64_t>();
  const int64_t* children = child_ptr.data_ptr<int64_t>();
  const int64_t* token = node_token.data_ptr<int64_t>();
  float* score_out = out_scores.data_ptr<float>();
  int64_t* parent_out = out_parents.data_ptr<int64_t>();
  int64_t* token_out = out_tokens.data_ptr<int64_t>();
  int64_t* node_out = out_nodes.data_ptr<int64_t>();

  at::parallel_for(0, batch, 1, [&](int64_t row_begin, int64_t row_end) {
    std::vector<Candidate> best;  // a heap whose front is the worst kept candidate
    best.reserve(beam_size);
    for (int64_t row = row_begin; row < row_end; ++row) {
      best.clear();
      for (int64_t beam = 0; beam < beams; ++beam) {
        const float base = beam_score[row * beams + beam];
        const int64_t parent_node = node[row * beams + beam];
        if (!(base > kNegInf) || parent_node < 0 || parent_node >= num_nodes) continue;
        // A valid node has at most V children (distinct tokens below V), and its run lies inside the
        // node array; a run that does not (arrays not from a checked Trie) is cut at V, then
        // dropped if still outside, exactly as the CUDA kernel does.
        const int64_t first = children[parent_node];
        const int64_t count = std::min(children[parent_node + 1] - first, vocab);
        if (first < 0 || count < 0 || first > num_nodes - count) continue;
        const int64_t last = first + count;
        const float* lp = log_prob + (row * beams + beam) * vocab;
        float log_normalizer = 0.f;
        if (normalize) {  // log-sum-exp over the valid children
          float max_lp = kNegInf;
          for (int64_t child = first; child < last; ++child) {
            if (token[child] >= 0 && token[child] < vocab) max_lp = std::fmax(max_lp, lp[token[child]]);
          }
          float sum = 0.f;
          for (int64_t child = first; child < last; ++child) {
            if (token[child] >= 0 && token[child] < vocab) sum += std::exp(lp[token[child]] - max_lp);
          }
          log_normalizer = max_lp > kNegInf ? max_lp + std::log(sum) : kNegInf;
        }
        for (int64_t child = first; child < last; ++child) {
          if (token[child] < 0 || token[child] >= vocab) continue;
          const float score = normalize ? base + (lp[token[child]] - log_normalizer) : base + lp[token[child]];
          if (!(score > kNegInf)) continue;
          const Candidate candidate{ordered_bits(score), score, beam, child};
          if (int64_t(best.size()) < beam_size) {
            best.push_back(candidate);
            std::push_heap(best.begin(), best.end(), ranks_before);
          } else if (ranks_before(candidate, best.front())) {
            std::pop_heap(best.begin(), best.end(), ranks_before);
            best.back() = candidate;
            std::push_heap(best.begin(), best.end(), ranks_before);
          }
        }
      }
      std::sort_heap(best.begin(), best.end(), ranks_before);
      for (int64_t slot = 0; slot < beam_size; ++slot) {
        const int64_t out = row * beam_size + slot;
        const bool filled = slot < int64_t(best.size());
        score_out[out] = filled ? best[slot].score : kNegInf;
        parent_out[out] = filled ? best[slot].parent : -1;
        token_out[out] = filled ? token[best[slot].child] : -1;
        node_out[out] = filled ? best[slot].child : -1;
      }
    }
  });
  return {out_scores, out_parents, out_tokens, out_nodes};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparserec, CPU, m) { m.impl("trie_beam_step", &trie_beam_step_cpu); }
