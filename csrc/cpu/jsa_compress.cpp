// CPU kernels of sparserec::jsa_compress and its backward (SPEC §1, cmp): Kc_i = sum_r (x[i*d + r] + pe_r) W_r.
// Reference: sparserec.reference.jsa.jsa_compress. Per kv head, the flattened (l*D) inputs of a
// piece of at most kPieceBlocks consecutive blocks (of any sequences) are gathered into a workspace
// and multiplied by W_h (l*D x D) in one GEMM: short sequences share one large product instead of
// paying l small ones each, and no (Tc, l, Hkv, D) copy of the batch exists. pe enters as one bias
// row per head. The backward's dx items own whole sequences (their blocks' rows overlap), walked in
// pieces of the same size.
#include "cpu/cpu_math.h"
#include "cpu/jsa_plan.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace sparserec {
namespace {

constexpr int64_t kPieceBlocks = 64;

// First token of every real compressed block (cu_cmp[-1] of them), in block order.
std::vector<int64_t> block_tokens(const std::vector<CompressSeq>& seqs, int64_t stride) {
  std::vector<int64_t> tokens(seqs.empty() ? 0 : seqs.back().block_start + seqs.back().num_blocks);
  for (const CompressSeq& seq : seqs)
    for (int64_t c = 0; c < seq.num_blocks; ++c) tokens[seq.block_start + c] = seq.token_start + c * stride;
  return tokens;
}

// dst row i = the flattened (l*D) input of block begin + i for head h.
template <typename T>
void gather_blocks(const T* x, const std::vector<int64_t>& tokens, int64_t begin, int64_t end, int64_t h,
                   int64_t heads, int64_t dim, int64_t block, cpu::Buffer<T>& dst) {
  dst.resize((end - begin) * block * dim);
  T* out = dst.data();
  for (int64_t c = begin; c < end; ++c)
    for (int64_t r = 0; r < block; ++r, out += dim) std::copy_n(x + ((tokens[c] + r) * heads + h) * dim, dim, out);
}

template <typename T>
void compress_forward(const T* x, const T* weight, const T* pe, const std::vector<int64_t>& tokens, int64_t heads,
                      int64_t dim, int64_t block, T* out) {
  const int64_t row = heads * dim, flat = block * dim;  // elements per token in x and out; per block input
  const int64_t num_blocks = static_cast<int64_t>(tokens.size());
  // bias[h] = sum_r pe[h, r] @ W[h, r]: the (1 x l*D) @ (l*D x D) product per head.
  std::vector<T> bias(heads * dim);
  for (int64_t h = 0; h < heads; ++h) {
    cpu::gemm<T>(false, false, 1, dim, flat, T(1), pe + h * flat, flat, weight + h * flat * dim, dim, T(0),
                 bias.data() + h * dim, dim);
  }
  const int64_t pieces = (num_blocks + kPieceBlocks - 1) / kPieceBlocks;
  at::parallel_for(0, pieces * heads, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    cpu::Buffer<T> inputs;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % heads, first = item / heads * kPieceBlocks;
      const int64_t last = std::min(num_blocks, first + kPieceBlocks);
      T* dst = out + first * row + h * dim;
      for (int64_t c = 0; c < last - first; ++c) std::copy_n(bias.data() + h * dim, dim, dst + c * row);
      gather_blocks(x, tokens, first, last, h, heads, dim, block, inputs);
      cpu::gemm<T>(false, false, last - first, dim, flat, T(1), inputs.data(), flat, weight + h * flat * dim, dim,
                   T(1), dst, row);
    }
  });
}

template <typename T>
void compress_backward(const T* grad, const T* x, const T* weight, const T* pe, const std::vector<CompressSeq>& seqs,
                       const std::vector<int64_t>& tokens, int64_t heads, int64_t dim, int64_t block, T* grad_x,
                       T* grad_weight, T* grad_pe) {
  const int64_t row = heads * dim, flat = block * dim;
  const int64_t num_blocks = static_cast<int64_t>(tokens.size());
  // dx of one (sequence, head), piece by piece: dBlocks = G W_h^T (blocks x l*D), added to the blocks'
  // rows in block order. Blocks of one sequence overlap, so a sequence has one owner.
  const int64_t num_items = static_cast<int64_t>(seqs.size()) * heads;
  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    cpu::Buffer<T> d_blocks;
    for (int64_t item = begin; item < end; ++item) {
      const CompressSeq& seq = seqs[item / heads];
      const int64_t h = item % heads;
      for (int64_t first = seq.block_start; first < seq.block_start + seq.num_blocks; first += kPieceBlocks) {
        const int64_t count = std::min(kPieceBlocks, seq.block_start + seq.num_blocks - first);
        d_blocks.resize(count * flat);
        cpu::gemm<T>(false, true, count, flat, dim, T(1), grad + first * row + h * dim, row, weight + h * flat * dim,
                     dim, T(0), d_blocks.data(), flat);
        const T* src = d_blocks.data();
        for (int64_t c = first; c < first + count; ++c) {
          for (int64_t r = 0; r < block; ++r, src += dim) {
            T* dst = grad_x + ((tokens[c] + r) * heads + h) * dim;
            for (int64_t i = 0; i < dim; ++i) dst[i] += src[i];
          }
        }
      }
    }
  });
  // dW[h] = sum over pieces of Blocks^T G + pe_h^T (sum_c G_c), dpe[h] = (sum_c G_c) W_h^T; one owner
  // per head, pieces in order: deterministic.
  std::vector<T> grad_sum(heads * dim, T(0));
  for (int64_t c = 0; c < num_blocks; ++c)
    for (int64_t i = 0; i < row; ++i) grad_sum[i] += grad[c * row + i];
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    cpu::Buffer<T> inputs;
    for (int64_t h = begin; h < end; ++h) {
      T* dw = grad_weight + h * flat * dim;
      const T* g_sum = grad_sum.data() + h * dim;
      const T* p = pe + h * flat;
      for (int64_t i = 0; i < flat; ++i)
        for (int64_t j = 0; j < dim; ++j) dw[i * dim + j] = p[i] * g_sum[j];
      for (int64_t first = 0; first < num_blocks; first += kPieceBlocks) {
        const int64_t last = std::min(num_blocks, first + kPieceBlocks);
        gather_blocks(x, tokens, first, last, h, heads, dim, block, inputs);
        cpu::gemm<T>(true, false, flat, dim, last - first, T(1), inputs.data(), flat, grad + first * row + h * dim,
                     row, T(1), dw, dim);
      }
      cpu::gemm<T>(false, true, 1, flat, dim, T(1), g_sum, dim, weight + h * flat * dim, dim, T(0), grad_pe + h * flat,
                   flat);
    }
  });
}

at::Tensor jsa_compress_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pe,
                            const at::Tensor& cu_seqlens, const at::Tensor& cu_cmp, int64_t block, int64_t stride,
                            int64_t num_blocks) {
  check_compress_args("jsa_compress", x, weight, pe, block, stride);
  const auto seqs = compress_plan("jsa_compress", cu_seqlens, cu_cmp, x.size(0), num_blocks, block, stride);
  const int64_t heads = x.size(1), dim = x.size(2);
  at::Tensor out = at::empty({num_blocks, heads, dim}, x.options());
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), pc = pe.contiguous();
  const std::vector<int64_t> tokens = block_tokens(seqs, stride);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "jsa_compress_cpu", [&] {
    compress_forward<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), tokens,
                               heads, dim, block, out.data_ptr<scalar_t>());
  });
  const int64_t real = static_cast<int64_t>(tokens.size());
  out.narrow(0, real, num_blocks - real).zero_();  // rows past cu_cmp[-1]: padding of a static row bound
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jsa_compress_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pe,
    const at::Tensor& cu_seqlens, const at::Tensor& cu_cmp, int64_t block, int64_t stride) {
  check_compress_args("jsa_compress_backward", x, weight, pe, block, stride);
  const auto seqs = compress_plan("jsa_compress_backward", cu_seqlens, cu_cmp, x.size(0), grad.size(0), block, stride);
  TORCH_CHECK(grad.dim() == 3 && grad.size(1) == x.size(1) && grad.size(2) == x.size(2) &&
                  grad.scalar_type() == x.scalar_type(),
              "jsa_compress_backward: grad must be (Tc_total, Hkv, D) like the compressed output, got ", grad.sizes(),
              " ", grad.scalar_type());
  const int64_t heads = x.size(1), dim = x.size(2);
  at::Tensor grad_x = at::zeros_like(x, at::MemoryFormat::Contiguous);  // tokens in no block keep 0
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor grad_pe = at::empty_like(pe, at::MemoryFormat::Contiguous);
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), wc = weight.contiguous(), pc = pe.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "jsa_compress_backward_cpu", [&] {
    compress_backward<scalar_t>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                pc.data_ptr<scalar_t>(), seqs, block_tokens(seqs, stride), heads, dim,
                                block, grad_x.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(),
                                grad_pe.data_ptr<scalar_t>());
  });
  return {grad_x, grad_weight, grad_pe};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparserec, CPU, m) {
  m.impl("jsa_compress", &jsa_compress_cpu);
  m.impl("jsa_compress_backward", &jsa_compress_backward_cpu);
}

}  // namespace sparserec
