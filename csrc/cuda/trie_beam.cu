// CUDA binding of trie_beam_step: checks, output allocation, launch on the current stream.
// The kernel is csrc/cuda/trie_beam.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/trie_beam.cuh"
#include "trie_beam.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> trie_beam_step_cuda(
    const at::Tensor& log_probs_in, const at::Tensor& beam_scores_in, const at::Tensor& nodes_in,
    const at::Tensor& child_ptr_in, const at::Tensor& node_token_in, int64_t beam_size, bool normalize) {
  sparserec::check_trie_beam_step_inputs(log_probs_in, beam_scores_in, nodes_in, child_ptr_in, node_token_in,
                                         beam_size);
  const int64_t batch = log_probs_in.size(0), beams = log_probs_in.size(1), vocab = log_probs_in.size(2);
  constexpr int64_t max_beams = sparserec::trie_beam::kMaxBeams;
  TORCH_CHECK_VALUE(beams >= 1 && beams <= max_beams && beam_size <= max_beams, "the CUDA kernel serves 1 to ",
                    max_beams, " beams, got K=", beams, " and beam_size=", beam_size);
  const c10::cuda::CUDAGuard guard(log_probs_in.device());
  const at::Tensor log_probs = log_probs_in.contiguous(), beam_scores = beam_scores_in.contiguous();
  const at::Tensor nodes = nodes_in.contiguous(), child_ptr = child_ptr_in.contiguous();
  const at::Tensor node_token = node_token_in.contiguous();

  at::Tensor out_scores = at::empty({batch, beam_size}, beam_scores.options());
  at::Tensor out_parents = at::empty({batch, beam_size}, nodes.options());
  at::Tensor out_tokens = at::empty({batch, beam_size}, nodes.options());
  at::Tensor out_nodes = at::empty({batch, beam_size}, nodes.options());
  if (batch == 0) return {out_scores, out_parents, out_tokens, out_nodes};
  C10_CUDA_CHECK(sparserec::trie_beam::launch_trie_beam_step(
      log_probs.data_ptr<float>(), beam_scores.data_ptr<float>(), nodes.data_ptr<int64_t>(),
      child_ptr.data_ptr<int64_t>(), node_token.data_ptr<int64_t>(), node_token.numel(), batch, int(beams), vocab,
      int(beam_size), normalize, out_scores.data_ptr<float>(), out_parents.data_ptr<int64_t>(),
      out_tokens.data_ptr<int64_t>(), out_nodes.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
  return {out_scores, out_parents, out_tokens, out_nodes};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparserec, CUDA, m) { m.impl("trie_beam_step", &trie_beam_step_cuda); }
