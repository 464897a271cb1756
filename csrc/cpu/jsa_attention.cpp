// Fused CPU kernels of sparserec::jsa_attention and its backward (SPEC §1): all four branches, the
// top-N selection and the gated sum in one pass. Reference: sparserec.reference.jsa.jsa_attention.
//
// Work item = (sequence, query tile of select_q_block tokens, kv head). The tile's queries of every
// query head in the kv head's group are stacked into one (G*Bq, D) matrix so each product is one GEMM:
//   cmp   S = Q Kc^T over the compressed blocks visible to the tile; its softmax gives o_cmp and, summed
//         over the tile's rows, the importance of every selection block -> top-N, right here (no
//         (T, H, C) probability tensor, no second pass);
//   keys  the union of the selected blocks, the tile's window span and the visible anchors, gathered
//         once; one S = Q Ku^T, three masked softmaxes per row (slc, jrn, win) folded with their gates
//         into one P, and one P Vu.
// The forward saves a log-sum-exp per (token, head, branch) (+inf: the branch sees no key) and the
// selection; the backward recomputes P from them (FlashAttention-2 style, 5 GEMMs per part) with
// dS = sum_b g_b P_b (dP - dg_b), where dg_b = rowsum(P_b dP) is also the gate's gradient. dK/dV rows
// are shared between tiles, so each item writes its part to a scratch buffer and the parts are added
// in item order, one kv head per thread: results do not depend on the thread count.
#include "cpu/cpu_math.h"
#include "cpu/jsa_plan.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace sparserec {
namespace {

constexpr uint8_t kSelected = 1, kAnchor = 2;

struct AttnConfig {
  int64_t block, stride, select_block, top_n, select_q_block, window;
  bool causal;
};

struct SeqPlan {
  int64_t start, length, cmp_start, num_cmp;
  int64_t anchor_begin, anchor_end;  // into BatchPlan::anchors
};

struct Item {
  int64_t seq, q_begin, q_end, kv_head;  // q_* are sequence-local positions
};

struct BatchPlan {
  std::vector<SeqPlan> seqs;
  std::vector<int32_t> anchors;  // sequence-local anchor positions, ascending within each sequence
  std::vector<Item> items;
};

template <typename T>
struct Problem {
  const T *q, *k, *v, *k_cmp, *v_cmp, *gates;
  const bool* anchor_mask;
  int64_t heads, kv_heads, group, dim;
  T scale;
  AttnConfig cfg;

  // Compressed blocks visible to query position t: i*stride + block - 1 <= t (all when bidirectional).
  int64_t visible_cmp(const SeqPlan& seq, int64_t t) const {
    if (!cfg.causal) return seq.num_cmp;
    if (t < cfg.block - 1) return 0;
    return std::min(seq.num_cmp, (t - cfg.block + 1) / cfg.stride + 1);
  }
  // Row r of an item's stacked queries: head-major, then token.
  int64_t query_row(const SeqPlan& seq, const Item& it, int64_t r) const {
    const int64_t nq = it.q_end - it.q_begin;
    return (seq.start + it.q_begin + r % nq) * heads + it.kv_head * group + r / nq;
  }
};

// Per-row masks of the token branches, from the key's position and flags.
struct RowRule {
  int32_t t, window;
  bool causal;
};

template <typename T>
struct Workspace {
  std::vector<T> q, d_out, o, s_cmp, p_cmp, s_keys, p_keys, dp, k_keys, v_keys, rows;
  std::vector<double> importance, block_score;
  std::vector<int64_t> order;
  std::vector<int32_t> keys;
  std::vector<uint8_t> flags;
  std::vector<std::pair<int64_t, int64_t>> ranges;
};

// ---- row kernels (compiled per vector ISA) -------------------------------------------------------

// In place: s[0, nvis) -> softmax probabilities, s[nvis, ncols) -> 0. Returns the log-sum-exp
// (+inf when nvis == 0, so exp(s - lse) is 0 in the backward).
template <typename T>
__attribute__((always_inline)) inline T softmax_prefix_row_impl(T* s, int64_t nvis, int64_t ncols) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < nvis; ++j) m = std::max(m, s[j]);
  T sum = 0;
  for (int64_t j = 0; j < nvis; ++j) {
    s[j] = cpu::exp_nonpositive(s[j] - m);
    sum += s[j];
  }
  for (int64_t j = nvis; j < ncols; ++j) s[j] = 0;
  if (nvis == 0) return std::numeric_limits<T>::infinity();
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < nvis; ++j) s[j] *= inv;
  return m + std::log(sum);
}

// Forward of one row over the gathered keys: s (scores) -> P = sum_b g_b softmax_b(s), in place;
// lse[b] for b in (slc, jrn, win). e: 3 * n scratch.
template <typename T>
__attribute__((always_inline)) inline void keys_row_forward_impl(T* s, const int32_t* pos, const uint8_t* flags,
                                                                 int64_t n, RowRule rule, const T* gate, T* lse,
                                                                 T* e) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T m_slc = neg_inf, m_jrn = neg_inf, m_win = neg_inf;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t p = pos[j];
    const bool vis = !rule.causal || p <= rule.t;
    const bool win = rule.causal ? (vis && p > rule.t - rule.window) : (std::abs(p - rule.t) < rule.window);
    m_slc = std::max(m_slc, (vis && (flags[j] & kSelected)) ? s[j] : neg_inf);
    m_jrn = std::max(m_jrn, (vis && (flags[j] & kAnchor)) ? s[j] : neg_inf);
    m_win = std::max(m_win, win ? s[j] : neg_inf);
  }
  T* e_slc = e;
  T* e_jrn = e + n;
  T* e_win = e + 2 * n;
  T z_slc = 0, z_jrn = 0, z_win = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t p = pos[j];
    const bool vis = !rule.causal || p <= rule.t;
    const bool win = rule.causal ? (vis && p > rule.t - rule.window) : (std::abs(p - rule.t) < rule.window);
    const bool slc = vis && (flags[j] & kSelected), jrn = vis && (flags[j] & kAnchor);
    const T a = cpu::exp_nonpositive(slc ? s[j] - m_slc : T(-100));
    const T b = cpu::exp_nonpositive(jrn ? s[j] - m_jrn : T(-100));
    const T c = cpu::exp_nonpositive(win ? s[j] - m_win : T(-100));
    e_slc[j] = slc ? a : T(0);
    e_jrn[j] = jrn ? b : T(0);
    e_win[j] = win ? c : T(0);
    z_slc += e_slc[j];
    z_jrn += e_jrn[j];
    z_win += e_win[j];
  }
  const T inf = std::numeric_limits<T>::infinity();
  const T c_slc = z_slc > 0 ? gate[1] / z_slc : T(0);
  const T c_jrn = z_jrn > 0 ? gate[2] / z_jrn : T(0);
  const T c_win = z_win > 0 ? gate[3] / z_win : T(0);
  lse[1] = z_slc > 0 ? m_slc + std::log(z_slc) : inf;
  lse[2] = z_jrn > 0 ? m_jrn + std::log(z_jrn) : inf;
  lse[3] = z_win > 0 ? m_win + std::log(z_win) : inf;
  for (int64_t j = 0; j < n; ++j) s[j] = c_slc * e_slc[j] + c_jrn * e_jrn[j] + c_win * e_win[j];
}

// Backward of one row over the gathered keys. In: s (scores), dp = dO . v_j. Out: s -> dS (unscaled),
// pt -> sum_b g_b P_b, dg[b] = rowsum(P_b dp) for b in (slc, jrn, win).
template <typename T>
__attribute__((always_inline)) inline void keys_row_backward_impl(T* s, const T* dp, const int32_t* pos,
                                                                  const uint8_t* flags, int64_t n, RowRule rule,
                                                                  const T* gate, const T* lse, T* pt, T* e,
                                                                  T* dg) {
  T* e_slc = e;
  T* e_jrn = e + n;
  T* e_win = e + 2 * n;
  T d_slc = 0, d_jrn = 0, d_win = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t p = pos[j];
    const bool vis = !rule.causal || p <= rule.t;
    const bool win = rule.causal ? (vis && p > rule.t - rule.window) : (std::abs(p - rule.t) < rule.window);
    const bool slc = vis && (flags[j] & kSelected), jrn = vis && (flags[j] & kAnchor);
    // lse is +inf for a branch without keys, where the mask is false anyway.
    const T a = cpu::exp_nonpositive(slc ? s[j] - lse[1] : T(-100));
    const T b = cpu::exp_nonpositive(jrn ? s[j] - lse[2] : T(-100));
    const T c = cpu::exp_nonpositive(win ? s[j] - lse[3] : T(-100));
    e_slc[j] = slc ? a : T(0);
    e_jrn[j] = jrn ? b : T(0);
    e_win[j] = win ? c : T(0);
    d_slc += e_slc[j] * dp[j];
    d_jrn += e_jrn[j] * dp[j];
    d_win += e_win[j] * dp[j];
  }
  dg[1] = d_slc;
  dg[2] = d_jrn;
  dg[3] = d_win;
  const T g_slc = gate[1], g_jrn = gate[2], g_win = gate[3];
  for (int64_t j = 0; j < n; ++j) {
    const T ps = g_slc * e_slc[j], pj = g_jrn * e_jrn[j], pw = g_win * e_win[j];
    pt[j] = ps + pj + pw;
    s[j] = ps * (dp[j] - d_slc) + pj * (dp[j] - d_jrn) + pw * (dp[j] - d_win);
  }
}

// cmp backward of one row: s (scores) -> dS, pt -> g P; returns rowsum(P dp).
template <typename T>
__attribute__((always_inline)) inline T cmp_row_backward_impl(T* s, const T* dp, int64_t nvis, int64_t ncols, T lse,
                                                              T gate, T* pt) {
  T dg = 0;
  for (int64_t j = 0; j < nvis; ++j) {
    pt[j] = cpu::exp_nonpositive(s[j] - lse);
    dg += pt[j] * dp[j];
  }
  for (int64_t j = 0; j < nvis; ++j) {
    s[j] = gate * pt[j] * (dp[j] - dg);
    pt[j] *= gate;
  }
  for (int64_t j = nvis; j < ncols; ++j) s[j] = pt[j] = 0;
  return dg;
}

#define SPARSEREC_ROW_KERNELS(T)                                                                                 \
  SPARSEREC_VECTOR_CLONES T softmax_prefix_row(T* s, int64_t nvis, int64_t ncols) {                              \
    return softmax_prefix_row_impl<T>(s, nvis, ncols);                                                           \
  }                                                                                                              \
  SPARSEREC_VECTOR_CLONES void keys_row_forward(T* s, const int32_t* pos, const uint8_t* flags, int64_t n,       \
                                                RowRule rule, const T* gate, T* lse, T* e) {                     \
    keys_row_forward_impl<T>(s, pos, flags, n, rule, gate, lse, e);                                              \
  }                                                                                                              \
  SPARSEREC_VECTOR_CLONES void keys_row_backward(T* s, const T* dp, const int32_t* pos, const uint8_t* flags,    \
                                                 int64_t n, RowRule rule, const T* gate, const T* lse, T* pt,    \
                                                 T* e, T* dg) {                                                  \
    keys_row_backward_impl<T>(s, dp, pos, flags, n, rule, gate, lse, pt, e, dg);                                 \
  }                                                                                                              \
  SPARSEREC_VECTOR_CLONES T cmp_row_backward(T* s, const T* dp, int64_t nvis, int64_t ncols, T lse, T gate,      \
                                             T* pt) {                                                            \
    return cmp_row_backward_impl<T>(s, dp, nvis, ncols, lse, gate, pt);                                          \
  }
SPARSEREC_ROW_KERNELS(float)
SPARSEREC_ROW_KERNELS(double)
#undef SPARSEREC_ROW_KERNELS

// ---- per-item pieces -------------------------------------------------------------------------------

// Top-N of the eligible selection blocks by importance (ties: lower block), ascending.
void choose_blocks(const std::vector<double>& importance, int64_t num_cmp_seen, const SeqPlan& seq,
                   const AttnConfig& cfg, int64_t last_query, std::vector<double>& block_score,
                   std::vector<int64_t>& order) {
  const int64_t num_sel = (seq.length + cfg.select_block - 1) / cfg.select_block;
  block_score.assign(num_sel, 0.0);
  for (int64_t j = 0; j < num_sel; ++j) {
    // Compressed block i overlaps selection block j when i*stride < (j+1)*l' and i*stride + block > j*l'.
    const int64_t sel_start = j * cfg.select_block;
    const int64_t first = sel_start >= cfg.block ? (sel_start - cfg.block) / cfg.stride + 1 : 0;
    const int64_t end = std::min(num_cmp_seen, (sel_start + cfg.select_block + cfg.stride - 1) / cfg.stride);
    for (int64_t i = first; i < end; ++i) block_score[j] += importance[i];
  }
  const int64_t eligible = cfg.causal ? std::min(num_sel, last_query / cfg.select_block + 1) : num_sel;
  const int64_t taken = std::min(eligible, cfg.top_n);
  order.resize(eligible);
  std::iota(order.begin(), order.end(), 0);
  if (eligible > cfg.top_n) {
    std::partial_sort(order.begin(), order.begin() + taken, order.end(), [&](int64_t a, int64_t b) {
      return block_score[a] > block_score[b] || (block_score[a] == block_score[b] && a < b);
    });
    order.resize(taken);
    std::sort(order.begin(), order.end());
  }
}

// The tile's key set: selected blocks, window span and visible anchors, ascending and unique.
template <typename T>
void gather_keys(const Problem<T>& P, const BatchPlan& plan, const SeqPlan& seq, const Item& it,
                 const int64_t* chosen, int64_t num_chosen, Workspace<T>& w) {
  const AttnConfig& cfg = P.cfg;
  const int64_t key_end = cfg.causal ? it.q_end : seq.length;  // later keys are visible to no query here
  w.ranges.clear();
  for (int64_t c = 0; c < num_chosen; ++c) {
    const int64_t begin = chosen[c] * cfg.select_block;
    w.ranges.emplace_back(begin, std::min(begin + cfg.select_block, key_end));
  }
  const int64_t window_end = cfg.causal ? it.q_end : std::min(seq.length, it.q_end - 1 + cfg.window);
  w.ranges.emplace_back(std::max<int64_t>(0, it.q_begin - cfg.window + 1), window_end);
  std::sort(w.ranges.begin(), w.ranges.end());
  const int32_t* anchor = plan.anchors.data() + seq.anchor_begin;
  const int32_t* anchor_end = std::lower_bound(anchor, plan.anchors.data() + seq.anchor_end, key_end);
  w.keys.clear();
  int64_t next = 0;  // first position not yet emitted
  for (const auto& [begin, end] : w.ranges) {
    for (int64_t p = std::max(begin, next); p < end; ++p) {
      for (; anchor != anchor_end && *anchor < p; ++anchor) w.keys.push_back(*anchor);
      if (anchor != anchor_end && *anchor == p) ++anchor;
      w.keys.push_back(static_cast<int32_t>(p));
    }
    next = std::max(next, end);
  }
  for (; anchor != anchor_end; ++anchor) w.keys.push_back(*anchor);

  const int64_t n = static_cast<int64_t>(w.keys.size()), D = P.dim, row = P.kv_heads * D;
  w.flags.resize(n);
  w.k_keys.resize(n * D);
  w.v_keys.resize(n * D);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t p = w.keys[j];
    const int64_t block = p / cfg.select_block;
    const bool selected = std::binary_search(chosen, chosen + num_chosen, block);
    w.flags[j] = (selected ? kSelected : 0) | (P.anchor_mask[seq.start + p] ? kAnchor : 0);
    const int64_t offset = (seq.start + p) * row + it.kv_head * D;
    std::copy_n(P.k + offset, D, w.k_keys.data() + j * D);
    std::copy_n(P.v + offset, D, w.v_keys.data() + j * D);
  }
}

template <typename T>
void gather_rows(const Problem<T>& P, const SeqPlan& seq, const Item& it, const T* src, std::vector<T>& dst) {
  const int64_t rows = P.group * (it.q_end - it.q_begin), D = P.dim;
  dst.resize(rows * D);
  for (int64_t r = 0; r < rows; ++r) std::copy_n(src + P.query_row(seq, it, r) * D, D, dst.data() + r * D);
}

template <typename T>
void forward_item(const Problem<T>& P, const BatchPlan& plan, const Item& it, Workspace<T>& w, T* out, T* lse,
                  int64_t* selection) {
  const SeqPlan& seq = plan.seqs[it.seq];
  const AttnConfig& cfg = P.cfg;
  const int64_t nq = it.q_end - it.q_begin, R = P.group * nq, D = P.dim;
  const int64_t kv_row = P.kv_heads * D;
  gather_rows(P, seq, it, P.q, w.q);
  w.o.resize(R * D);

  // cmp: softmax over the visible compressed blocks; importance = column sums of P.
  const int64_t ncmp = P.visible_cmp(seq, it.q_end - 1);
  w.importance.assign(ncmp, 0.0);
  const T* kc = P.k_cmp + seq.cmp_start * kv_row + it.kv_head * D;
  const T* vc = P.v_cmp + seq.cmp_start * kv_row + it.kv_head * D;
  w.s_cmp.resize(R * ncmp);
  cpu::gemm<T>(false, true, R, ncmp, D, P.scale, w.q.data(), D, kc, kv_row, T(0), w.s_cmp.data(), ncmp);
  for (int64_t r = 0; r < R; ++r) {
    T* s = w.s_cmp.data() + r * ncmp;
    const int64_t head_row = P.query_row(seq, it, r);
    const T gate = P.gates[head_row * 4];
    const int64_t nvis = P.visible_cmp(seq, it.q_begin + r % nq);
    lse[head_row * 4] = softmax_prefix_row(s, nvis, ncmp);
    for (int64_t i = 0; i < nvis; ++i) {
      w.importance[i] += s[i];
      s[i] *= gate;
    }
  }
  cpu::gemm<T>(false, false, R, D, ncmp, T(1), w.s_cmp.data(), ncmp, vc, kv_row, T(0), w.o.data(), D);

  // slc: the tile's top-N blocks, stored for every token of the tile (the backward reads them back).
  choose_blocks(w.importance, ncmp, seq, cfg, it.q_end - 1, w.block_score, w.order);
  const int64_t num_chosen = static_cast<int64_t>(w.order.size());
  for (int64_t t = it.q_begin; t < it.q_end; ++t) {
    int64_t* dst = selection + ((seq.start + t) * P.kv_heads + it.kv_head) * cfg.top_n;
    std::copy_n(w.order.data(), num_chosen, dst);
    std::fill(dst + num_chosen, dst + cfg.top_n, -1);
  }

  // slc + jrn + win over the gathered keys, gated, added to the cmp output.
  gather_keys(P, plan, seq, it, w.order.data(), num_chosen, w);
  const int64_t n = static_cast<int64_t>(w.keys.size());
  w.s_keys.resize(R * n);
  w.rows.resize(3 * n);
  cpu::gemm<T>(false, true, R, n, D, P.scale, w.q.data(), D, w.k_keys.data(), D, T(0), w.s_keys.data(), n);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t head_row = P.query_row(seq, it, r);
    const RowRule rule{static_cast<int32_t>(it.q_begin + r % nq), static_cast<int32_t>(cfg.window), cfg.causal};
    keys_row_forward(w.s_keys.data() + r * n, w.keys.data(), w.flags.data(), n, rule, P.gates + head_row * 4,
                     lse + head_row * 4, w.rows.data());
  }
  cpu::gemm<T>(false, false, R, D, n, T(1), w.s_keys.data(), n, w.v_keys.data(), D, T(1), w.o.data(), D);
  for (int64_t r = 0; r < R; ++r) std::copy_n(w.o.data() + r * D, D, out + P.query_row(seq, it, r) * D);
}

// One item's share of dK/dV: rows for its gathered keys and its visible compressed blocks.
template <typename T>
struct KeyGrads {
  std::vector<int32_t> keys;
  std::vector<T> dk, dv, dk_cmp, dv_cmp;
};

template <typename T>
void backward_item(const Problem<T>& P, const BatchPlan& plan, const Item& it, Workspace<T>& w, const T* grad_out,
                   const T* lse, const int64_t* selection, T* grad_q, T* grad_gates, KeyGrads<T>& part) {
  const SeqPlan& seq = plan.seqs[it.seq];
  const AttnConfig& cfg = P.cfg;
  const int64_t nq = it.q_end - it.q_begin, R = P.group * nq, D = P.dim;
  const int64_t kv_row = P.kv_heads * D;
  gather_rows(P, seq, it, P.q, w.q);
  gather_rows(P, seq, it, grad_out, w.d_out);
  w.o.resize(R * D);  // dQ of the stacked rows
  std::vector<T> dg(R * 4, T(0));

  const int64_t ncmp = P.visible_cmp(seq, it.q_end - 1);
  const T* kc = P.k_cmp + seq.cmp_start * kv_row + it.kv_head * D;
  const T* vc = P.v_cmp + seq.cmp_start * kv_row + it.kv_head * D;
  w.s_cmp.resize(R * ncmp);
  w.p_cmp.resize(R * ncmp);
  w.dp.resize(R * std::max<int64_t>(ncmp, 1));
  cpu::gemm<T>(false, true, R, ncmp, D, P.scale, w.q.data(), D, kc, kv_row, T(0), w.s_cmp.data(), ncmp);
  cpu::gemm<T>(false, true, R, ncmp, D, T(1), w.d_out.data(), D, vc, kv_row, T(0), w.dp.data(), ncmp);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t head_row = P.query_row(seq, it, r);
    const int64_t nvis = P.visible_cmp(seq, it.q_begin + r % nq);
    dg[r * 4] = cmp_row_backward(w.s_cmp.data() + r * ncmp, w.dp.data() + r * ncmp, nvis, ncmp, lse[head_row * 4],
                                 P.gates[head_row * 4], w.p_cmp.data() + r * ncmp);
  }
  part.dk_cmp.resize(ncmp * D);
  part.dv_cmp.resize(ncmp * D);
  cpu::gemm<T>(false, false, R, D, ncmp, P.scale, w.s_cmp.data(), ncmp, kc, kv_row, T(0), w.o.data(), D);
  cpu::gemm<T>(true, false, ncmp, D, R, P.scale, w.s_cmp.data(), ncmp, w.q.data(), D, T(0), part.dk_cmp.data(), D);
  cpu::gemm<T>(true, false, ncmp, D, R, T(1), w.p_cmp.data(), ncmp, w.d_out.data(), D, T(0), part.dv_cmp.data(), D);

  const int64_t* chosen = selection + ((seq.start + it.q_begin) * P.kv_heads + it.kv_head) * cfg.top_n;
  const int64_t num_sel = (seq.length + cfg.select_block - 1) / cfg.select_block;
  int64_t num_chosen = 0;
  while (num_chosen < cfg.top_n && chosen[num_chosen] >= 0) {
    TORCH_CHECK(chosen[num_chosen] < num_sel && (num_chosen == 0 || chosen[num_chosen] > chosen[num_chosen - 1]),
                "jsa_attention_backward: selection holds block ", chosen[num_chosen], ", not an ascending index "
                "below the sequence's ", num_sel, " selection blocks");
    ++num_chosen;
  }
  gather_keys(P, plan, seq, it, chosen, num_chosen, w);
  const int64_t n = static_cast<int64_t>(w.keys.size());
  w.s_keys.resize(R * n);
  w.p_keys.resize(R * n);
  w.dp.resize(R * n);
  w.rows.resize(3 * n);
  cpu::gemm<T>(false, true, R, n, D, P.scale, w.q.data(), D, w.k_keys.data(), D, T(0), w.s_keys.data(), n);
  cpu::gemm<T>(false, true, R, n, D, T(1), w.d_out.data(), D, w.v_keys.data(), D, T(0), w.dp.data(), n);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t head_row = P.query_row(seq, it, r);
    const RowRule rule{static_cast<int32_t>(it.q_begin + r % nq), static_cast<int32_t>(cfg.window), cfg.causal};
    keys_row_backward(w.s_keys.data() + r * n, w.dp.data() + r * n, w.keys.data(), w.flags.data(), n, rule,
                      P.gates + head_row * 4, lse + head_row * 4, w.p_keys.data() + r * n, w.rows.data(),
                      dg.data() + r * 4);
  }
  part.keys = w.keys;
  part.dk.resize(n * D);
  part.dv.resize(n * D);
  cpu::gemm<T>(false, false, R, D, n, P.scale, w.s_keys.data(), n, w.k_keys.data(), D, T(1), w.o.data(), D);
  cpu::gemm<T>(true, false, n, D, R, P.scale, w.s_keys.data(), n, w.q.data(), D, T(0), part.dk.data(), D);
  cpu::gemm<T>(true, false, n, D, R, T(1), w.p_keys.data(), n, w.d_out.data(), D, T(0), part.dv.data(), D);

  for (int64_t r = 0; r < R; ++r) {
    const int64_t head_row = P.query_row(seq, it, r);
    std::copy_n(w.o.data() + r * D, D, grad_q + head_row * D);
    std::copy_n(dg.data() + r * 4, 4, grad_gates + head_row * 4);
  }
}

// ---- ops ----------------------------------------------------------------------------------------------

AttnConfig make_config(int64_t block, int64_t stride, int64_t select_block, int64_t top_n, int64_t select_q_block,
                       int64_t window, bool causal) {
  TORCH_CHECK(block >= 1 && stride >= 1 && stride <= block && select_block >= 1 && select_block % stride == 0 &&
                  top_n >= 1 && select_q_block >= 1 && window >= 1,
              "jsa_attention: invalid config block=", block, " stride=", stride, " select_block=", select_block,
              " top_n=", top_n, " select_q_block=", select_q_block, " window=", window);
  return {block, stride, select_block, top_n, select_q_block, window, causal};
}

BatchPlan make_plan(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& k_cmp, const at::Tensor& v_cmp, const at::Tensor& gates,
                    const at::Tensor& anchor_mask, const at::Tensor& cu_seqlens, const at::Tensor& cu_cmp,
                    const AttnConfig& cfg) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": the CPU kernel supports float32 and float64, got ",
              dtype);
  check_float_cpu(op, "q", q, 3, dtype);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}, {"k_cmp", k_cmp},
                                {"v_cmp", v_cmp}, {"gates", gates}}) {
    check_float_cpu(op, name, t, 3, dtype);
  }
  const int64_t total = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(kv_heads >= 1 && heads % kv_heads == 0, op, ": query heads (", heads, ") must be a multiple of kv heads (",
              kv_heads, ")");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == total && k.size(2) == dim, op,
              ": k and v must be (T_total, Hkv, D) matching q, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k_cmp.sizes() == v_cmp.sizes() && k_cmp.size(1) == kv_heads && k_cmp.size(2) == dim, op,
              ": k_cmp and v_cmp must be (Tc_total, Hkv, D), got ", k_cmp.sizes(), " and ", v_cmp.sizes());
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({total, heads, 4}), op, ": gates must be (T_total, H, 4), got ",
              gates.sizes());
  TORCH_CHECK(anchor_mask.dim() == 1 && anchor_mask.size(0) == total && anchor_mask.scalar_type() == at::kBool &&
                  anchor_mask.device().is_cpu(),
              op, ": anchor_mask must be a (T_total,) bool CPU tensor");
  const auto seqs = compress_plan(op, cu_seqlens, cu_cmp, total, k_cmp.size(0), cfg.block, cfg.stride);
  TORCH_CHECK(total < (int64_t(1) << 31), op, ": at most 2^31 tokens per call");

  BatchPlan plan;
  const at::Tensor anchors = anchor_mask.contiguous();
  const bool* is_anchor = anchors.data_ptr<bool>();
  for (size_t s = 0; s < seqs.size(); ++s) {
    const CompressSeq& c = seqs[s];
    const int64_t anchor_begin = static_cast<int64_t>(plan.anchors.size());
    for (int64_t p = 0; p < c.length; ++p)
      if (is_anchor[c.token_start + p]) plan.anchors.push_back(static_cast<int32_t>(p));
    plan.seqs.push_back({c.token_start, c.length, c.block_start, c.num_blocks, anchor_begin,
                         static_cast<int64_t>(plan.anchors.size())});
    for (int64_t q0 = 0; q0 < c.length; q0 += cfg.select_q_block) {
      for (int64_t g = 0; g < kv_heads; ++g)
        plan.items.push_back({static_cast<int64_t>(s), q0, std::min(q0 + cfg.select_q_block, c.length), g});
    }
  }
  return plan;
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cmp,
                        const at::Tensor& v_cmp, const at::Tensor& gates, const at::Tensor& anchor_mask,
                        const AttnConfig& cfg) {
  const int64_t heads = q.size(1), kv_heads = k.size(1), dim = q.size(2);
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), k_cmp.data_ptr<T>(), v_cmp.data_ptr<T>(),
          gates.data_ptr<T>(), anchor_mask.data_ptr<bool>(), heads, kv_heads, heads / kv_heads, dim,
          static_cast<T>(1.0 / std::sqrt(static_cast<double>(dim))), cfg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jsa_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cmp, const at::Tensor& v_cmp,
    const at::Tensor& gates, const at::Tensor& anchor_mask, const at::Tensor& cu_seqlens, const at::Tensor& cu_cmp,
    int64_t block, int64_t stride, int64_t select_block, int64_t top_n, int64_t select_q_block, int64_t window,
    bool causal) {
  const AttnConfig cfg = make_config(block, stride, select_block, top_n, select_q_block, window, causal);
  const BatchPlan plan = make_plan("jsa_attention", q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, cfg);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), kcc = k_cmp.contiguous(),
                   vcc = v_cmp.contiguous(), gc = gates.contiguous(), ac = anchor_mask.contiguous();
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({q.size(0), q.size(1), 4}, q.options());
  at::Tensor selection = at::empty({q.size(0), k.size(1), top_n}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "jsa_attention_cpu", [&] {
    const Problem<scalar_t> P = make_problem<scalar_t>(qc, kc, vc, kcc, vcc, gc, ac, cfg);
    const int64_t num_items = static_cast<int64_t>(plan.items.size());
    at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
      Workspace<scalar_t> w;
      for (int64_t i = begin; i < end; ++i) {
        forward_item(P, plan, plan.items[i], w, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                     selection.data_ptr<int64_t>());
      }
    });
  });
  return {out, lse, selection};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> jsa_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cmp,
    const at::Tensor& v_cmp, const at::Tensor& gates, const at::Tensor& anchor_mask, const at::Tensor& cu_seqlens,
    const at::Tensor& cu_cmp, const at::Tensor& lse, const at::Tensor& selection, int64_t block, int64_t stride,
    int64_t select_block, int64_t top_n, int64_t select_q_block, int64_t window, bool causal) {
  const char* op = "jsa_attention_backward";
  const AttnConfig cfg = make_config(block, stride, select_block, top_n, select_q_block, window, causal);
  const BatchPlan plan = make_plan(op, q, k, v, k_cmp, v_cmp, gates, anchor_mask, cu_seqlens, cu_cmp, cfg);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type(), op,
              ": grad_out must match q's shape and dtype, got ", grad_out.sizes(), " ", grad_out.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), 4}) && lse.scalar_type() == q.scalar_type(), op,
              ": lse must be (T_total, H, 4) in q's dtype, from the forward");
  TORCH_CHECK(selection.sizes() == at::IntArrayRef({q.size(0), k.size(1), top_n}) &&
                  selection.scalar_type() == at::kLong,
              op, ": selection must be (T_total, Hkv, top_n) int64, from the forward");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), kcc = k_cmp.contiguous(),
                   vcc = v_cmp.contiguous(), gc = gates.contiguous(), ac = anchor_mask.contiguous(),
                   goc = grad_out.contiguous(), lc = lse.contiguous(), sc = selection.contiguous();
  at::Tensor grad_q = at::empty_like(qc), grad_gates = at::empty_like(gc);
  at::Tensor grad_k = at::zeros_like(kc), grad_v = at::zeros_like(vc);
  at::Tensor grad_k_cmp = at::zeros_like(kcc), grad_v_cmp = at::zeros_like(vcc);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "jsa_attention_backward_cpu", [&] {
    using T = scalar_t;
    const Problem<T> P = make_problem<T>(qc, kc, vc, kcc, vcc, gc, ac, cfg);
    const int64_t num_items = static_cast<int64_t>(plan.items.size());
    const int64_t D = P.dim, kv_row = P.kv_heads * D;
    // Items run in waves whose dK/dV parts fit a fixed budget; the parts of a wave are then added in
    // item order, one kv head per thread.
    int64_t longest = 1, most_cmp = 1;
    for (const SeqPlan& s : plan.seqs) {
      longest = std::max(longest, s.length);
      most_cmp = std::max(most_cmp, s.num_cmp);
    }
    const int64_t part_bytes = 2 * (longest + most_cmp) * D * static_cast<int64_t>(sizeof(T));
    const int64_t wave = std::max<int64_t>(8 * at::get_num_threads(), (int64_t(64) << 20) / part_bytes);
    std::vector<KeyGrads<T>> parts;
    for (int64_t wave_begin = 0; wave_begin < num_items; wave_begin += wave) {
      const int64_t wave_end = std::min(num_items, wave_begin + wave);
      parts.assign(wave_end - wave_begin, KeyGrads<T>{});
      at::parallel_for(wave_begin, wave_end, 1, [&](int64_t begin, int64_t end) {
        Workspace<T> w;
        for (int64_t i = begin; i < end; ++i) {
          backward_item(P, plan, plan.items[i], w, goc.data_ptr<T>(), lc.data_ptr<T>(), sc.data_ptr<int64_t>(),
                        grad_q.data_ptr<T>(), grad_gates.data_ptr<T>(), parts[i - wave_begin]);
        }
      });
      at::parallel_for(0, P.kv_heads, 1, [&](int64_t head_begin, int64_t head_end) {
        for (int64_t i = wave_begin; i < wave_end; ++i) {
          const Item& it = plan.items[i];
          if (it.kv_head < head_begin || it.kv_head >= head_end) continue;
          const SeqPlan& seq = plan.seqs[it.seq];
          const KeyGrads<T>& part = parts[i - wave_begin];
          T* dk = grad_k.data_ptr<T>() + seq.start * kv_row + it.kv_head * D;
          T* dv = grad_v.data_ptr<T>() + seq.start * kv_row + it.kv_head * D;
          for (size_t j = 0; j < part.keys.size(); ++j) {
            const int64_t offset = part.keys[j] * kv_row;
            for (int64_t d = 0; d < D; ++d) {
              dk[offset + d] += part.dk[j * D + d];
              dv[offset + d] += part.dv[j * D + d];
            }
          }
          T* dkc = grad_k_cmp.data_ptr<T>() + seq.cmp_start * kv_row + it.kv_head * D;
          T* dvc = grad_v_cmp.data_ptr<T>() + seq.cmp_start * kv_row + it.kv_head * D;
          const int64_t ncmp = static_cast<int64_t>(part.dk_cmp.size()) / D;
          for (int64_t c = 0; c < ncmp; ++c) {
            for (int64_t d = 0; d < D; ++d) {
              dkc[c * kv_row + d] += part.dk_cmp[c * D + d];
              dvc[c * kv_row + d] += part.dv_cmp[c * D + d];
            }
          }
        }
      });
    }
  });
  return {grad_q, grad_k, grad_v, grad_k_cmp, grad_v_cmp, grad_gates};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparserec, CPU, m) {
  m.impl("jsa_attention", &jsa_attention_cpu);
  m.impl("jsa_attention_backward", &jsa_attention_backward_cpu);
}

}  // namespace sparserec
