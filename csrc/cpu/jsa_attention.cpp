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
#include "cpu/select_top_blocks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace sparserec {
namespace {

// Key flags. A key set is the tile's contiguous key ranges (selected blocks and the window span;
// kInRange), padded to whole vectors, followed by its visible anchors (kAnchor): an anchor inside a
// range appears twice, once per part, and each branch reads only its part (slc and win the ranges,
// jrn the anchors), so no branch sees a key twice and the row kernels treat the parts separately.
constexpr int32_t kSelected = 1, kAnchor = 2, kInRange = 4;
// Position of padding keys: outside every window, flags 0, so no branch sees them.
constexpr int32_t kNoKey = -(1 << 30);

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
  const T *anchor_k, *anchor_v;  // (Hkv, total anchors, D|Dv): each sequence's anchor rows, contiguous
  int64_t total_anchors;
  int64_t heads, kv_heads, group, dim, value_dim;  // value_dim (Dv): of v, v_cmp and the output
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

template <typename T>
struct Workspace {
  cpu::Buffer<T> q, d_out, o, s_cmp, p_cmp, s_keys, p_keys, dp, rows;
  std::vector<double> importance, block_score;
  std::vector<int64_t> order;
  std::vector<int32_t> keys, flags;  // padded to whole vectors with keys no branch sees
  std::vector<std::pair<int64_t, int64_t>> ranges;  // the key set's contiguous ranges, merged
  int64_t range_cols = 0;                             // their keys, padded to whole vectors
  int64_t num_anchors = 0;                            // visible anchors after them
};

// ---- row kernels -----------------------------------------------------------------------------------
// float: 8-lane vector code (cpu_math.h), compiled for AVX2 and baseline x86-64; rows are padded to
// whole vectors (see kNoKey). double: plain loops (the oracle-precision path, not the fast one).
// Key rows of the token branches: s (scores), pos (positions), flags; a row belongs to query t.

struct RowRule {
  int32_t t, window;
  bool causal;
};

inline void row_masks(int32_t p, int32_t flags, RowRule rule, bool& slc, bool& jrn,
                                                     bool& win) {
  const bool vis = !rule.causal || p <= rule.t;
  const bool in_range = flags & kInRange;
  win = in_range && (rule.causal ? (vis && rule.t - p < rule.window) : (rule.t - p < rule.window && p - rule.t < rule.window));
  slc = vis && (flags & kSelected);
  jrn = vis && (flags & kAnchor);
}

// In place: s[0, nvis) -> softmax probabilities, s[nvis, ncols) -> 0. Returns the log-sum-exp
// (+inf when nvis == 0, so exp(s - lse) is 0 in the backward).
double softmax_prefix_row(double* s, int64_t nvis, int64_t ncols) {
  double m = -std::numeric_limits<double>::infinity(), sum = 0;
  for (int64_t j = 0; j < nvis; ++j) m = std::max(m, s[j]);
  for (int64_t j = 0; j < nvis; ++j) sum += (s[j] = std::exp(s[j] - m));
  std::fill(s + nvis, s + ncols, 0.0);
  if (nvis == 0) return std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < nvis; ++j) s[j] /= sum;
  return m + std::log(sum);
}

SPARSEREC_VECTOR_CLONES float softmax_prefix_row(float* s, int64_t nvis, int64_t ncols) {
  using namespace cpu::vec;
  const i8 limit = splat(static_cast<int32_t>(nvis));
  f8 m = splat(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < ncols; j += kLanes) {
    const i8 in = (iota() + static_cast<int32_t>(j)) < limit;
    const f8 x = load(s + j);
    m = (in & (x > m)) ? x : m;
  }
  const float row_max = cpu::vec::max(m);
  f8 z = f8{};
  for (int64_t j = 0; j < ncols; j += kLanes) {
    const i8 in = (iota() + static_cast<int32_t>(j)) < limit;
    const f8 e = exp_nonpositive(in ? load(s + j) - row_max : splat(-100.0f));
    store(s + j, in ? e : f8{});
    z += in ? e : f8{};
  }
  if (nvis == 0) return std::numeric_limits<float>::infinity();
  const float total = cpu::vec::sum(z), inv = 1.0f / total;
  for (int64_t j = 0; j < ncols; j += kLanes) store(s + j, load(s + j) * inv);
  return row_max + std::log(total);
}

// Forward of a key row: s -> P = sum_b g_b softmax_b(s) in place; lse[1..3] for (slc, jrn, win);
// e: 4 * n scratch.
void keys_row_forward(double* s, const int32_t* pos, const int32_t* flags, int64_t /*n_range: flags tell*/,
                      int64_t n, RowRule rule, const double* gate, double* lse, double* e) {
  double m[3], z[3] = {0, 0, 0};
  std::fill(m, m + 3, -std::numeric_limits<double>::infinity());
  for (int64_t j = 0; j < n; ++j) {
    bool mask[3];
    row_masks(pos[j], flags[j], rule, mask[0], mask[1], mask[2]);
    for (int b = 0; b < 3; ++b)
      if (mask[b]) m[b] = std::max(m[b], s[j]);
  }
  for (int64_t j = 0; j < n; ++j) {
    bool mask[3];
    row_masks(pos[j], flags[j], rule, mask[0], mask[1], mask[2]);
    for (int b = 0; b < 3; ++b) z[b] += (e[b * n + j] = mask[b] ? std::exp(s[j] - m[b]) : 0.0);
  }
  double c[3];
  for (int b = 0; b < 3; ++b) {
    c[b] = z[b] > 0 ? gate[b + 1] / z[b] : 0.0;
    lse[b + 1] = z[b] > 0 ? m[b] + std::log(z[b]) : std::numeric_limits<double>::infinity();
  }
  for (int64_t j = 0; j < n; ++j) s[j] = c[0] * e[j] + c[1] * e[n + j] + c[2] * e[2 * n + j];
}

// Vector masks of range keys for query t: slc, win (-1 where the branch sees the key; jrn unused).
struct KeyMasks8 {
  cpu::vec::i8 slc, win;
};
inline KeyMasks8 range_masks(const int32_t* pos, const int32_t* flags, int64_t j, RowRule rule) {
  using namespace cpu::vec;
  const i8 p = load(pos + j), f = load(flags + j), t = splat(rule.t), w = splat(rule.window);
  const i8 vis = rule.causal ? (p <= t) : ~i8{};
  const i8 win = ((f & kInRange) != 0) & (rule.causal ? (vis & (t - p < w)) : ((t - p < w) & (p - t < w)));
  return {vis & ((f & kSelected) != 0), win};
}
// Vector mask of anchor keys for query t (jrn).
inline cpu::vec::i8 anchor_mask(const int32_t* pos, const int32_t* flags, int64_t j, RowRule rule) {
  using namespace cpu::vec;
  const i8 anchor = (load(flags + j) & kAnchor) != 0;
  return rule.causal ? anchor & (load(pos + j) <= splat(rule.t)) : anchor;
}

// One exponential per key: every branch shifts by the row's largest visible score M, which gives the
// same softmax as shifting by the branch's own max while that max is within kSharedShift of M (no
// underflow that matters); a branch further below is recomputed with its own max.
constexpr float kSharedShift = 20.0f;

SPARSEREC_VECTOR_CLONES void keys_row_forward(float* s, const int32_t* pos, const int32_t* flags, int64_t n_range,
                                              int64_t n, RowRule rule, const float* gate, float* lse, float* e) {
  using namespace cpu::vec;
  const f8 neg_inf = splat(-std::numeric_limits<float>::infinity()), low = splat(-100.0f);
  // e[0, n_range): slc exponentials; e[n_range, n): jrn; e[n, n + n_range): win.
  f8 m_slc = neg_inf, m_jrn = neg_inf, m_win = neg_inf;
  for (int64_t j = 0; j < n_range; j += kLanes) {
    const KeyMasks8 mask = range_masks(pos, flags, j, rule);
    const f8 x = load(s + j);
    m_slc = (mask.slc & (x > m_slc)) ? x : m_slc;
    m_win = (mask.win & (x > m_win)) ? x : m_win;
  }
  for (int64_t j = n_range; j < n; j += kLanes) {
    const f8 x = load(s + j);
    m_jrn = (anchor_mask(pos, flags, j, rule) & (x > m_jrn)) ? x : m_jrn;
  }
  float shift[3] = {cpu::vec::max(m_slc), cpu::vec::max(m_jrn), cpu::vec::max(m_win)};
  const float row_max = std::max({shift[0], shift[1], shift[2]});
  f8 z_slc = f8{}, z_jrn = f8{}, z_win = f8{};
  for (int64_t j = 0; j < n_range; j += kLanes) {
    const KeyMasks8 mask = range_masks(pos, flags, j, rule);
    const i8 any = mask.slc | mask.win;
    const f8 p = any ? exp_nonpositive(any ? load(s + j) - row_max : low) : f8{};
    const f8 p_slc = mask.slc ? p : f8{}, p_win = mask.win ? p : f8{};
    store(e + j, p_slc);
    store(e + n + j, p_win);
    z_slc += p_slc;
    z_win += p_win;
  }
  for (int64_t j = n_range; j < n; j += kLanes) {
    const i8 in = anchor_mask(pos, flags, j, rule);
    const f8 p = in ? exp_nonpositive(in ? load(s + j) - row_max : low) : f8{};
    store(e + j, p);
    z_jrn += p;
  }
  float sum[3] = {cpu::vec::sum(z_slc), cpu::vec::sum(z_jrn), cpu::vec::sum(z_win)};
  for (int b = 0; b < 3; ++b) {
    if (!(sum[b] > 0 && shift[b] < row_max - kSharedShift)) {
      shift[b] = row_max;
      continue;
    }
    // Rare: the branch's scores sit far below the row's max; redo its exponentials with its own max.
    const int64_t begin = b == 1 ? n_range : 0, end = b == 1 ? n : n_range;
    float* dst = b == 2 ? e + n : e;
    f8 z = f8{};
    for (int64_t j = begin; j < end; j += kLanes) {
      const i8 in = b == 1 ? anchor_mask(pos, flags, j, rule)
                           : (b == 0 ? range_masks(pos, flags, j, rule).slc : range_masks(pos, flags, j, rule).win);
      const f8 p = in ? exp_nonpositive(in ? load(s + j) - shift[b] : low) : f8{};
      store(dst + j, p);
      z += p;
    }
    sum[b] = cpu::vec::sum(z);
  }
  float c[3];
  for (int b = 0; b < 3; ++b) {
    c[b] = sum[b] > 0 ? gate[b + 1] / sum[b] : 0.0f;
    lse[b + 1] = sum[b] > 0 ? shift[b] + std::log(sum[b]) : std::numeric_limits<float>::infinity();
  }
  for (int64_t j = 0; j < n_range; j += kLanes) store(s + j, c[0] * load(e + j) + c[2] * load(e + n + j));
  for (int64_t j = n_range; j < n; j += kLanes) store(s + j, c[1] * load(e + j));
}

// Backward of a key row. In: s (scores), dp = dO . v_key. Out: s -> dS (before the softmax scale),
// pt -> sum_b g_b P_b, dg[1..3] = rowsum(P_b dp) (the gates' gradients). lse is +inf for a branch
// without keys, where its mask is false anyway.
void keys_row_backward(double* s, const double* dp, const int32_t* pos, const int32_t* flags,
                       int64_t /*n_range: flags tell*/, int64_t n, RowRule rule, const double* gate,
                       const double* lse, double* pt, double* e, double* dg) {
  double d[3] = {0, 0, 0};
  for (int64_t j = 0; j < n; ++j) {
    bool mask[3];
    row_masks(pos[j], flags[j], rule, mask[0], mask[1], mask[2]);
    for (int b = 0; b < 3; ++b) d[b] += (e[b * n + j] = mask[b] ? std::exp(s[j] - lse[b + 1]) : 0.0) * dp[j];
  }
  for (int b = 0; b < 3; ++b) dg[b + 1] = d[b];
  for (int64_t j = 0; j < n; ++j) {
    const double ps = gate[1] * e[j], pj = gate[2] * e[n + j], pw = gate[3] * e[2 * n + j];
    pt[j] = ps + pj + pw;
    s[j] = ps * (dp[j] - d[0]) + pj * (dp[j] - d[1]) + pw * (dp[j] - d[2]);
  }
}

SPARSEREC_VECTOR_CLONES void keys_row_backward(float* s, const float* dp, const int32_t* pos, const int32_t* flags,
                                               int64_t n_range, int64_t n, RowRule rule, const float* gate,
                                               const float* lse, float* pt, float* e, float* dg) {
  using namespace cpu::vec;
  const f8 low = splat(-100.0f);
  // e[0, n_range): slc probabilities; e[n_range, n): jrn; e[n, n + n_range): win.
  f8 d_slc = f8{}, d_jrn = f8{}, d_win = f8{};
  for (int64_t j = 0; j < n_range; j += kLanes) {
    const KeyMasks8 mask = range_masks(pos, flags, j, rule);
    const f8 x = load(s + j), g = load(dp + j);
    const f8 a = mask.slc ? exp_nonpositive(mask.slc ? x - lse[1] : low) : f8{};
    const f8 c = mask.win ? exp_nonpositive(mask.win ? x - lse[3] : low) : f8{};
    store(e + j, a);
    store(e + n + j, c);
    d_slc += a * g;
    d_win += c * g;
  }
  for (int64_t j = n_range; j < n; j += kLanes) {
    const i8 in = anchor_mask(pos, flags, j, rule);
    const f8 b = in ? exp_nonpositive(in ? load(s + j) - lse[2] : low) : f8{};
    store(e + j, b);
    d_jrn += b * load(dp + j);
  }
  const float sum_slc = cpu::vec::sum(d_slc), sum_jrn = cpu::vec::sum(d_jrn), sum_win = cpu::vec::sum(d_win);
  dg[1] = sum_slc;
  dg[2] = sum_jrn;
  dg[3] = sum_win;
  for (int64_t j = 0; j < n_range; j += kLanes) {
    const f8 ps = gate[1] * load(e + j), pw = gate[3] * load(e + n + j), g = load(dp + j);
    store(pt + j, ps + pw);
    store(s + j, ps * (g - sum_slc) + pw * (g - sum_win));
  }
  for (int64_t j = n_range; j < n; j += kLanes) {
    const f8 pj = gate[2] * load(e + j);
    store(pt + j, pj);
    store(s + j, pj * (load(dp + j) - sum_jrn));
  }
}

// cmp backward of a row: s (scores) -> dS, pt -> g P; returns rowsum(P dp), the cmp gate's gradient.
double cmp_row_backward(double* s, const double* dp, int64_t nvis, int64_t ncols, double lse, double gate,
                        double* pt) {
  double dg = 0;
  for (int64_t j = 0; j < nvis; ++j) dg += (pt[j] = std::exp(s[j] - lse)) * dp[j];
  for (int64_t j = 0; j < nvis; ++j) {
    s[j] = gate * pt[j] * (dp[j] - dg);
    pt[j] *= gate;
  }
  std::fill(s + nvis, s + ncols, 0.0);
  std::fill(pt + nvis, pt + ncols, 0.0);
  return dg;
}

SPARSEREC_VECTOR_CLONES float cmp_row_backward(float* s, const float* dp, int64_t nvis, int64_t ncols, float lse,
                                               float gate, float* pt) {
  using namespace cpu::vec;
  const i8 limit = splat(static_cast<int32_t>(nvis));
  f8 d = f8{};
  for (int64_t j = 0; j < ncols; j += kLanes) {
    const i8 in = (iota() + static_cast<int32_t>(j)) < limit;
    const f8 p = in ? exp_nonpositive(in ? load(s + j) - lse : splat(-100.0f)) : f8{};
    store(pt + j, p);
    d += p * load(dp + j);
  }
  const float dg = cpu::vec::sum(d);
  for (int64_t j = 0; j < ncols; j += kLanes) {
    const f8 p = load(pt + j);
    store(s + j, gate * p * (load(dp + j) - dg));
    store(pt + j, gate * p);
  }
  return dg;
}

// ---- per-item pieces -------------------------------------------------------------------------------

// The tile's top-N selection blocks (ascending) from its compressed-block importance.
void choose_blocks(const std::vector<double>& importance, int64_t num_cmp_seen, const SeqPlan& seq,
                   const AttnConfig& cfg, int64_t last_query, std::vector<double>& block_score,
                   std::vector<int64_t>& order) {
  const int64_t num_sel = (seq.length + cfg.select_block - 1) / cfg.select_block;
  // Causal: eligible blocks start at or before the tile's last query.
  const int64_t eligible = cfg.causal ? std::min(num_sel, last_query / cfg.select_block + 1) : num_sel;
  select_top_blocks(importance.data(), num_cmp_seen, num_sel, eligible,
                    {cfg.block, cfg.stride, cfg.select_block, cfg.top_n}, block_score, order);
}

// The tile's key set: merged ranges (selected blocks, window span), then the visible anchors; K/V are
// read in place (ranges) or from the per-sequence anchor rows, never gathered per tile. Fills
// w.ranges, w.range_cols, w.num_anchors, w.keys (positions) and w.flags, padded to whole vectors;
// returns n = range_cols + num_anchors.
template <typename T>
int64_t plan_keys(const Problem<T>& P, const BatchPlan& plan, const SeqPlan& seq, const Item& it,
                  const int64_t* chosen, int64_t num_chosen, Workspace<T>& w) {
  const AttnConfig& cfg = P.cfg;
  const int64_t key_end = cfg.causal ? it.q_end : seq.length;  // later keys are visible to no query here
  std::vector<std::pair<int64_t, int64_t>> spans;
  for (int64_t c = 0; c < num_chosen; ++c) {
    const int64_t begin = chosen[c] * cfg.select_block;
    spans.emplace_back(begin, std::min(begin + cfg.select_block, key_end));
  }
  const int64_t window_end = cfg.causal ? it.q_end : std::min(seq.length, it.q_end - 1 + cfg.window);
  spans.emplace_back(std::max<int64_t>(0, it.q_begin - cfg.window + 1), window_end);
  std::sort(spans.begin(), spans.end());
  w.ranges.clear();
  for (const auto& [begin, end] : spans) {
    if (begin >= end) continue;
    if (!w.ranges.empty() && begin <= w.ranges.back().second) {
      w.ranges.back().second = std::max(w.ranges.back().second, end);
    } else {
      w.ranges.emplace_back(begin, end);
    }
  }
  const int32_t* anchors = plan.anchors.data() + seq.anchor_begin;
  w.num_anchors = std::lower_bound(anchors, plan.anchors.data() + seq.anchor_end, key_end) - anchors;

  w.keys.clear();
  w.flags.clear();
  for (const auto& [begin, end] : w.ranges) {
    for (int64_t p = begin; p < end; ++p) {
      w.keys.push_back(static_cast<int32_t>(p));
      const bool selected = std::binary_search(chosen, chosen + num_chosen, p / cfg.select_block);
      w.flags.push_back(kInRange | (selected ? kSelected : 0));
    }
  }
  w.range_cols = cpu::vec::padded(static_cast<int64_t>(w.keys.size()));
  w.keys.resize(w.range_cols, kNoKey);
  w.flags.resize(w.range_cols, 0);
  w.keys.insert(w.keys.end(), anchors, anchors + w.num_anchors);
  w.flags.insert(w.flags.end(), w.num_anchors, kAnchor);
  const int64_t n = static_cast<int64_t>(w.keys.size());
  w.keys.resize(cpu::vec::padded(n), kNoKey);
  w.flags.resize(cpu::vec::padded(n), 0);
  return n;
}

// out[:, keys] = alpha * a (R x D) @ K_keysᵀ, K of width D (keys, or values in the backward): one GEMM
// per range (K read in place) and one for the anchors; padding columns are 0.
template <typename T>
void times_keys_t(const Problem<T>& P, const SeqPlan& seq, const Item& it, const Workspace<T>& w, const T* keys,
                  const T* anchor_keys, int64_t D, int64_t rows, T alpha, const T* a, T* out, int64_t ld) {
  const int64_t kv_row = P.kv_heads * D;
  int64_t col = 0;
  for (const auto& [begin, end] : w.ranges) {
    cpu::gemm<T>(false, true, rows, end - begin, D, alpha, a, D, keys + (seq.start + begin) * kv_row + it.kv_head * D,
                 kv_row, T(0), out + col, ld);
    col += end - begin;
  }
  const T* anchor_rows = anchor_keys + (it.kv_head * P.total_anchors + seq.anchor_begin) * D;
  cpu::gemm<T>(false, true, rows, w.num_anchors, D, alpha, a, D, anchor_rows, D, T(0), out + w.range_cols, ld);
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(out + r * ld + col, out + r * ld + w.range_cols, T(0));
    std::fill(out + r * ld + w.range_cols + w.num_anchors, out + (r + 1) * ld, T(0));
  }
}

// out (R x D) += alpha * p[:, keys] @ V_keys, V of width D read as in times_keys_t.
template <typename T>
void accumulate_keys(const Problem<T>& P, const SeqPlan& seq, const Item& it, const Workspace<T>& w, const T* values,
                     const T* anchor_values, int64_t D, int64_t rows, T alpha, const T* p, int64_t ld, T* out) {
  const int64_t kv_row = P.kv_heads * D;
  int64_t col = 0;
  for (const auto& [begin, end] : w.ranges) {
    cpu::gemm<T>(false, false, rows, D, end - begin, alpha, p + col, ld,
                 values + (seq.start + begin) * kv_row + it.kv_head * D, kv_row, T(1), out, D);
    col += end - begin;
  }
  const T* anchor_rows = anchor_values + (it.kv_head * P.total_anchors + seq.anchor_begin) * D;
  cpu::gemm<T>(false, false, rows, D, w.num_anchors, alpha, p + w.range_cols, ld, anchor_rows, D, T(1), out, D);
}

// The item's stacked query rows of src (T_total, H, D).
template <typename T>
void gather_rows(const Problem<T>& P, const SeqPlan& seq, const Item& it, const T* src, int64_t D,
                 cpu::Buffer<T>& dst) {
  const int64_t rows = P.group * (it.q_end - it.q_begin);
  dst.resize(rows * D);
  for (int64_t r = 0; r < rows; ++r) std::copy_n(src + P.query_row(seq, it, r) * D, D, dst.data() + r * D);
}

template <typename T>
void forward_item(const Problem<T>& P, const BatchPlan& plan, const Item& it, Workspace<T>& w, T* out, T* lse,
                  int64_t* selection) {
  const SeqPlan& seq = plan.seqs[it.seq];
  const AttnConfig& cfg = P.cfg;
  const int64_t nq = it.q_end - it.q_begin, R = P.group * nq, D = P.dim, Dv = P.value_dim;
  const int64_t kv_row = P.kv_heads * D, v_row = P.kv_heads * Dv;
  gather_rows(P, seq, it, P.q, D, w.q);
  w.o.resize(R * Dv);

  // cmp: softmax over the visible compressed blocks; importance = column sums of P.
  const int64_t ncmp = P.visible_cmp(seq, it.q_end - 1), ld_cmp = cpu::vec::padded(ncmp);
  w.importance.assign(ncmp, 0.0);
  const T* kc = P.k_cmp + seq.cmp_start * kv_row + it.kv_head * D;
  const T* vc = P.v_cmp + seq.cmp_start * v_row + it.kv_head * Dv;
  w.s_cmp.resize(R * ld_cmp);
  cpu::gemm<T>(false, true, R, ncmp, D, P.scale, w.q.data(), D, kc, kv_row, T(0), w.s_cmp.data(), ld_cmp);
  for (int64_t r = 0; r < R; ++r) {
    T* s = w.s_cmp.data() + r * ld_cmp;
    const int64_t head_row = P.query_row(seq, it, r);
    const T gate = P.gates[head_row * 4];
    const int64_t nvis = P.visible_cmp(seq, it.q_begin + r % nq);
    lse[head_row * 4] = softmax_prefix_row(s, nvis, ld_cmp);
    for (int64_t i = 0; i < nvis; ++i) {
      w.importance[i] += s[i];
      s[i] *= gate;
    }
  }
  cpu::gemm<T>(false, false, R, Dv, ncmp, T(1), w.s_cmp.data(), ld_cmp, vc, v_row, T(0), w.o.data(), Dv);

  // slc: the tile's top-N blocks, stored for every token of the tile (the backward reads them back).
  choose_blocks(w.importance, ncmp, seq, cfg, it.q_end - 1, w.block_score, w.order);
  const int64_t num_chosen = static_cast<int64_t>(w.order.size());
  for (int64_t t = it.q_begin; t < it.q_end; ++t) {
    int64_t* dst = selection + ((seq.start + t) * P.kv_heads + it.kv_head) * cfg.top_n;
    std::copy_n(w.order.data(), num_chosen, dst);
    std::fill(dst + num_chosen, dst + cfg.top_n, -1);
  }

  // slc + jrn + win over the gathered keys, gated, added to the cmp output.
  const int64_t n = plan_keys(P, plan, seq, it, w.order.data(), num_chosen, w), ld = cpu::vec::padded(n);
  w.s_keys.resize(R * ld);
  w.rows.resize(4 * ld);
  times_keys_t(P, seq, it, w, P.k, P.anchor_k, D, R, P.scale, w.q.data(), w.s_keys.data(), ld);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t head_row = P.query_row(seq, it, r);
    const RowRule rule{static_cast<int32_t>(it.q_begin + r % nq), static_cast<int32_t>(cfg.window), cfg.causal};
    keys_row_forward(w.s_keys.data() + r * ld, w.keys.data(), w.flags.data(), w.range_cols, ld, rule,
                     P.gates + head_row * 4, lse + head_row * 4, w.rows.data());
  }
  accumulate_keys(P, seq, it, w, P.v, P.anchor_v, Dv, R, T(1), w.s_keys.data(), ld, w.o.data());
  for (int64_t r = 0; r < R; ++r) std::copy_n(w.o.data() + r * Dv, Dv, out + P.query_row(seq, it, r) * Dv);
}

// One item's share of dK/dV: rows for its gathered keys and its visible compressed blocks.
template <typename T>
struct KeyGrads {
  std::vector<int32_t> keys;
  cpu::Buffer<T> dk, dv, dk_cmp, dv_cmp;
};

template <typename T>
void backward_item(const Problem<T>& P, const BatchPlan& plan, const Item& it, Workspace<T>& w, const T* grad_out,
                   const T* lse, const int64_t* selection, T* grad_q, T* grad_gates, KeyGrads<T>& part) {
  const SeqPlan& seq = plan.seqs[it.seq];
  const AttnConfig& cfg = P.cfg;
  const int64_t nq = it.q_end - it.q_begin, R = P.group * nq, D = P.dim, Dv = P.value_dim;
  const int64_t kv_row = P.kv_heads * D, v_row = P.kv_heads * Dv;
  gather_rows(P, seq, it, P.q, D, w.q);
  gather_rows(P, seq, it, grad_out, Dv, w.d_out);
  w.o.resize(R * D);  // dQ of the stacked rows
  cpu::Buffer<T> dg(R * 4, T(0));

  const int64_t ncmp = P.visible_cmp(seq, it.q_end - 1), ld_cmp = cpu::vec::padded(ncmp);
  const T* kc = P.k_cmp + seq.cmp_start * kv_row + it.kv_head * D;
  const T* vc = P.v_cmp + seq.cmp_start * v_row + it.kv_head * Dv;
  w.s_cmp.resize(R * ld_cmp);
  w.p_cmp.resize(R * ld_cmp);
  w.dp.resize(R * ld_cmp);
  cpu::gemm<T>(false, true, R, ncmp, D, P.scale, w.q.data(), D, kc, kv_row, T(0), w.s_cmp.data(), ld_cmp);
  cpu::gemm<T>(false, true, R, ncmp, Dv, T(1), w.d_out.data(), Dv, vc, v_row, T(0), w.dp.data(), ld_cmp);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t head_row = P.query_row(seq, it, r);
    const int64_t nvis = P.visible_cmp(seq, it.q_begin + r % nq);
    dg[r * 4] = cmp_row_backward(w.s_cmp.data() + r * ld_cmp, w.dp.data() + r * ld_cmp, nvis, ld_cmp,
                                 lse[head_row * 4], P.gates[head_row * 4], w.p_cmp.data() + r * ld_cmp);
  }
  part.dk_cmp.resize(ncmp * D);
  part.dv_cmp.resize(ncmp * Dv);
  cpu::gemm<T>(false, false, R, D, ncmp, P.scale, w.s_cmp.data(), ld_cmp, kc, kv_row, T(0), w.o.data(), D);
  cpu::gemm<T>(true, false, ncmp, D, R, P.scale, w.s_cmp.data(), ld_cmp, w.q.data(), D, T(0), part.dk_cmp.data(), D);
  cpu::gemm<T>(true, false, ncmp, Dv, R, T(1), w.p_cmp.data(), ld_cmp, w.d_out.data(), Dv, T(0),
               part.dv_cmp.data(), Dv);

  const int64_t* chosen = selection + ((seq.start + it.q_begin) * P.kv_heads + it.kv_head) * cfg.top_n;
  const int64_t num_sel = (seq.length + cfg.select_block - 1) / cfg.select_block;
  int64_t num_chosen = 0;
  while (num_chosen < cfg.top_n && chosen[num_chosen] >= 0) {
    TORCH_CHECK(chosen[num_chosen] < num_sel && (num_chosen == 0 || chosen[num_chosen] > chosen[num_chosen - 1]),
                "jsa_attention_backward: selection holds block ", chosen[num_chosen], ", not an ascending index "
                "below the sequence's ", num_sel, " selection blocks");
    ++num_chosen;
  }
  const int64_t n = plan_keys(P, plan, seq, it, chosen, num_chosen, w), ld = cpu::vec::padded(n);
  w.s_keys.resize(R * ld);
  w.p_keys.resize(R * ld);
  w.dp.resize(R * ld);
  w.rows.resize(3 * ld);
  times_keys_t(P, seq, it, w, P.k, P.anchor_k, D, R, P.scale, w.q.data(), w.s_keys.data(), ld);
  times_keys_t(P, seq, it, w, P.v, P.anchor_v, Dv, R, T(1), w.d_out.data(), w.dp.data(), ld);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t head_row = P.query_row(seq, it, r);
    const RowRule rule{static_cast<int32_t>(it.q_begin + r % nq), static_cast<int32_t>(cfg.window), cfg.causal};
    keys_row_backward(w.s_keys.data() + r * ld, w.dp.data() + r * ld, w.keys.data(), w.flags.data(), w.range_cols,
                      ld, rule, P.gates + head_row * 4, lse + head_row * 4, w.p_keys.data() + r * ld, w.rows.data(),
                      dg.data() + r * 4);
  }
  part.keys.assign(w.keys.begin(), w.keys.begin() + n);
  part.dk.resize(n * D);
  part.dv.resize(n * Dv);
  accumulate_keys(P, seq, it, w, P.k, P.anchor_k, D, R, P.scale, w.s_keys.data(), ld, w.o.data());
  cpu::gemm<T>(true, false, n, D, R, P.scale, w.s_keys.data(), ld, w.q.data(), D, T(0), part.dk.data(), D);
  cpu::gemm<T>(true, false, n, Dv, R, T(1), w.p_keys.data(), ld, w.d_out.data(), Dv, T(0), part.dv.data(), Dv);

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
  TORCH_CHECK(k.size(0) == total && k.size(2) == dim && v.size(0) == total && v.size(1) == kv_heads, op,
              ": k must be (T_total, Hkv, D) and v (T_total, Hkv, Dv) matching q, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k_cmp.size(0) == v_cmp.size(0) && k_cmp.size(1) == kv_heads && k_cmp.size(2) == dim &&
                  v_cmp.size(1) == kv_heads && v_cmp.size(2) == v.size(2),
              op, ": k_cmp must be (Tc_total, Hkv, D) and v_cmp (Tc_total, Hkv, Dv), got ", k_cmp.sizes(), " and ",
              v_cmp.sizes());
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

// Each sequence's anchor K/V rows, per kv head (Hkv, total anchors, D): every tile of a sequence
// reads its visible anchors from here (a prefix when causal) instead of gathering them itself.
template <typename T>
struct AnchorRows {
  cpu::Buffer<T> k, v;
};

template <typename T>
AnchorRows<T> gather_anchor_rows(const BatchPlan& plan, const T* k, const T* v, int64_t kv_heads, int64_t dim,
                                 int64_t value_dim) {
  const int64_t total = static_cast<int64_t>(plan.anchors.size());
  AnchorRows<T> rows{cpu::Buffer<T>(kv_heads * total * dim), cpu::Buffer<T>(kv_heads * total * value_dim)};
  at::parallel_for(0, static_cast<int64_t>(plan.seqs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const SeqPlan& seq = plan.seqs[s];
      for (int64_t g = 0; g < kv_heads; ++g) {
        for (int64_t a = seq.anchor_begin; a < seq.anchor_end; ++a) {
          const int64_t token = seq.start + plan.anchors[a];
          std::copy_n(k + (token * kv_heads + g) * dim, dim, rows.k.data() + (g * total + a) * dim);
          std::copy_n(v + (token * kv_heads + g) * value_dim, value_dim, rows.v.data() + (g * total + a) * value_dim);
        }
      }
    }
  });
  return rows;
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cmp,
                        const at::Tensor& v_cmp, const at::Tensor& gates, const BatchPlan& plan,
                        const AnchorRows<T>& anchor_rows, const AttnConfig& cfg) {
  const int64_t heads = q.size(1), kv_heads = k.size(1), dim = q.size(2);
  return {q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), k_cmp.data_ptr<T>(), v_cmp.data_ptr<T>(),
          gates.data_ptr<T>(), anchor_rows.k.data(), anchor_rows.v.data(),
          static_cast<int64_t>(plan.anchors.size()), heads, kv_heads, heads / kv_heads, dim, v.size(2),
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
                   vcc = v_cmp.contiguous(), gc = gates.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), 4}, q.options());
  at::Tensor selection = at::empty({q.size(0), k.size(1), top_n}, q.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "jsa_attention_cpu", [&] {
    const auto anchor_rows = gather_anchor_rows(plan, kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), k.size(1),
                                                q.size(2), v.size(2));
    const Problem<scalar_t> P = make_problem<scalar_t>(qc, kc, vc, kcc, vcc, gc, plan, anchor_rows, cfg);
    const int64_t num_items = static_cast<int64_t>(plan.items.size());
    at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
      const cpu::SequentialBlas sequential_blas;
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
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({q.size(0), q.size(1), v.size(2)}) &&
                  grad_out.scalar_type() == q.scalar_type(),
              op, ": grad_out must be (T_total, H, Dv) in q's dtype like the output, got ", grad_out.sizes(), " ",
              grad_out.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), 4}) && lse.scalar_type() == q.scalar_type(), op,
              ": lse must be (T_total, H, 4) in q's dtype, from the forward");
  TORCH_CHECK(selection.sizes() == at::IntArrayRef({q.size(0), k.size(1), top_n}) &&
                  selection.scalar_type() == at::kLong,
              op, ": selection must be (T_total, Hkv, top_n) int64, from the forward");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), kcc = k_cmp.contiguous(),
                   vcc = v_cmp.contiguous(), gc = gates.contiguous(),
                   goc = grad_out.contiguous(), lc = lse.contiguous(), sc = selection.contiguous();
  at::Tensor grad_q = at::empty_like(qc), grad_gates = at::empty_like(gc);
  at::Tensor grad_k = at::zeros_like(kc), grad_v = at::zeros_like(vc);
  at::Tensor grad_k_cmp = at::zeros_like(kcc), grad_v_cmp = at::zeros_like(vcc);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "jsa_attention_backward_cpu", [&] {
    using T = scalar_t;
    const auto anchor_rows = gather_anchor_rows(plan, kc.data_ptr<T>(), vc.data_ptr<T>(), k.size(1), q.size(2),
                                                v.size(2));
    const Problem<T> P = make_problem<T>(qc, kc, vc, kcc, vcc, gc, plan, anchor_rows, cfg);
    const int64_t num_items = static_cast<int64_t>(plan.items.size());
    const int64_t D = P.dim, Dv = P.value_dim, kv_row = P.kv_heads * D, v_row = P.kv_heads * Dv;
    // Items run in waves whose dK/dV parts fit a fixed budget; the parts of a wave are then added in
    // item order, one kv head per thread.
    int64_t longest = 1, most_cmp = 1;
    for (const SeqPlan& s : plan.seqs) {
      longest = std::max(longest, s.length);
      most_cmp = std::max(most_cmp, s.num_cmp);
    }
    const int64_t part_bytes = (longest + most_cmp) * (D + Dv) * static_cast<int64_t>(sizeof(T));
    const int64_t wave = std::max<int64_t>(8 * at::get_num_threads(), (int64_t(16) << 20) / part_bytes);
    std::vector<KeyGrads<T>> parts;
    for (int64_t wave_begin = 0; wave_begin < num_items; wave_begin += wave) {
      const int64_t wave_end = std::min(num_items, wave_begin + wave);
      parts.assign(wave_end - wave_begin, KeyGrads<T>{});
      at::parallel_for(wave_begin, wave_end, 1, [&](int64_t begin, int64_t end) {
        const cpu::SequentialBlas sequential_blas;
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
          T* dv = grad_v.data_ptr<T>() + seq.start * v_row + it.kv_head * Dv;
          for (size_t j = 0; j < part.keys.size(); ++j) {
            if (part.keys[j] == kNoKey) continue;
            for (int64_t d = 0; d < D; ++d) dk[part.keys[j] * kv_row + d] += part.dk[j * D + d];
            for (int64_t d = 0; d < Dv; ++d) dv[part.keys[j] * v_row + d] += part.dv[j * Dv + d];
          }
          T* dkc = grad_k_cmp.data_ptr<T>() + seq.cmp_start * kv_row + it.kv_head * D;
          T* dvc = grad_v_cmp.data_ptr<T>() + seq.cmp_start * v_row + it.kv_head * Dv;
          const int64_t ncmp = static_cast<int64_t>(part.dk_cmp.size()) / D;
          for (int64_t c = 0; c < ncmp; ++c) {
            for (int64_t d = 0; d < D; ++d) dkc[c * kv_row + d] += part.dk_cmp[c * D + d];
            for (int64_t d = 0; d < Dv; ++d) dvc[c * v_row + d] += part.dv_cmp[c * Dv + d];
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
