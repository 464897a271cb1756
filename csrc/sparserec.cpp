// Every schema of the `sparserec` operator library, in one place. CPU kernels live in csrc/cpu/,
// CUDA kernels in csrc/cuda/; each registers itself with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import sparserec._C` loads this shared object, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sparserec, m) {
  // Linear block compression (SPEC §1, cmp): out[i] = sum_r (x[i*stride + r] + pe[r]) @ weight[r] per
  // kv head and sequence. x (T_total, Hkv, D), weight (Hkv, block, D, D), pe (Hkv, block, D); cu_cmp
  // the compressed offsets; num_blocks >= cu_cmp[-1] is the output's row count, so shapes need no data
  // (a static bound such as T_total // stride; rows past cu_cmp[-1] are zeros). The attention ops accept
  // such padded k_cmp / v_cmp and never read the padding.
  m.def(
      "jsa_compress(Tensor x, Tensor weight, Tensor pe, Tensor cu_seqlens, Tensor cu_cmp, int block, int stride, "
      "int num_blocks) -> Tensor");
  // Returns (grad_x, grad_weight, grad_pe).
  m.def(
      "jsa_compress_backward(Tensor grad, Tensor x, Tensor weight, Tensor pe, Tensor cu_seqlens, Tensor cu_cmp, "
      "int block, int stride) -> (Tensor, Tensor, Tensor)");
  // Fused JSA (SPEC §1): cmp, top-N selection, slc, jrn, win and the gated sum. v and v_cmp may be wider
  // than q and k (Dv != D: a second value stream rides the same softmax). Returns out (T_total, H, Dv),
  // lse (T_total, H, 4) per branch log-sum-exp (+inf: no visible key) and selection (T_total, Hkv, top_n)
  // int64, each token's selected blocks (ascending, -1 padded); the backward takes both back.
  m.def(
      "jsa_attention(Tensor q, Tensor k, Tensor v, Tensor k_cmp, Tensor v_cmp, Tensor gates, Tensor anchor_mask, "
      "Tensor cu_seqlens, Tensor cu_cmp, int block, int stride, int select_block, int top_n, int select_q_block, "
      "int window, bool causal) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v, grad_k_cmp, grad_v_cmp, grad_gates).
  m.def(
      "jsa_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor k_cmp, Tensor v_cmp, "
      "Tensor gates, Tensor anchor_mask, Tensor cu_seqlens, Tensor cu_cmp, Tensor lse, Tensor selection, int block, "
      "int stride, int select_block, int top_n, int select_q_block, int window, bool causal) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Top-N intra-journey block selection (SPEC §1, slc). p_cmp: (T_total, H, C) cmp-branch softmax
  // probabilities over each sequence's own compressed blocks (columns past a sequence's count are
  // ignored). Returns (T_total, Hkv, top_n) int64: for each token, the selection blocks chosen for
  // its query tile and kv head, sequence-local indices in ascending order, -1 padded.
  m.def(
      "jsa_select(Tensor p_cmp, Tensor cu_seqlens, int block, int stride, int select_block, "
      "int top_n, int select_q_block, int num_kv_heads, bool causal) -> Tensor");
  // CSR trie of item token paths (SPEC §4; layout in sparserec/generate/trie.py). paths:
  // (num_items, depth) int64, CPU. Returns child_ptr (num_nodes+1,), node_token (num_nodes,),
  // leaf_item (num_items,) item id of each leaf in node order, level_start (depth+2,).
  m.def("trie_build(Tensor paths) -> (Tensor, Tensor, Tensor, Tensor)");
  // One trie-constrained beam-search step (SPEC §4). Returns (B, beam_size) scores, parent beams,
  // tokens and child nodes, best first (ties: lower parent beam, then lower token); -inf/-1 where
  // no valid candidate is left.
  m.def(
      "trie_beam_step(Tensor log_probs, Tensor beam_scores, Tensor nodes, Tensor child_ptr, "
      "Tensor node_token, int beam_size, bool normalize) -> (Tensor, Tensor, Tensor, Tensor)");
}
