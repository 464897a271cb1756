// CPU kernels of sparserec::jsa_compress and its backward (SPEC §1, cmp): Kc_i = sum_r (x[i*d + r] + pe_r) W_r.
// Reference: sparserec.reference.jsa.jsa_compress. Block i's r-th rows of a sequence form a strided
// matrix (row stride d tokens), so the compression is `block` GEMMs per (sequence, kv head) straight
// on x, with no gathered (Tc, l, Hkv, D) copy; pe enters as one bias row per head.
#include "cpu/cpu_math.h"
#include "cpu/jsa_plan.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace sparserec {
namespace {

template <typename T>
void compress_forward(const T* x, const T* weight, const T* pe, const std::vector<CompressSeq>& seqs, int64_t heads,
                      int64_t dim, int64_t block, int64_t stride, T* out) {
  const int64_t row = heads * dim;  // elements per token in x and out
  // bias[h] = sum_r pe[h, r] @ W[h, r]: the (1 x l*D) @ (l*D x D) product per head.
  std::vector<T> bias(heads * dim);
  for (int64_t h = 0; h < heads; ++h) {
    cpu::gemm<T>(false, false, 1, dim, block * dim, T(1), pe + h * block * dim, block * dim,
                 weight + h * block * dim * dim, dim, T(0), bias.data() + h * dim, dim);
  }
  const int64_t num_items = static_cast<int64_t>(seqs.size()) * heads;
  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    for (int64_t item = begin; item < end; ++item) {
      const CompressSeq& seq = seqs[item / heads];
      const int64_t h = item % heads;
      if (seq.num_blocks == 0) continue;
      T* dst = out + seq.block_start * row + h * dim;
      for (int64_t c = 0; c < seq.num_blocks; ++c) std::copy_n(bias.data() + h * dim, dim, dst + c * row);
      for (int64_t r = 0; r < block; ++r) {
        const T* src = x + (seq.token_start + r) * row + h * dim;
        cpu::gemm<T>(false, false, seq.num_blocks, dim, dim, T(1), src, stride * row,
                     weight + (h * block + r) * dim * dim, dim, T(1), dst, row);
      }
    }
  });
}

template <typename T>
void compress_backward(const T* grad, const T* x, const T* weight, const T* pe, const std::vector<CompressSeq>& seqs,
                       int64_t heads, int64_t dim, int64_t block, int64_t stride, T* grad_x, T* grad_weight,
                       T* grad_pe) {
  const int64_t row = heads * dim;
  // dx rows of one (sequence, head): block r's rows are disjoint for fixed r, and r runs serially.
  const int64_t num_items = static_cast<int64_t>(seqs.size()) * heads;
  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    for (int64_t item = begin; item < end; ++item) {
      const CompressSeq& seq = seqs[item / heads];
      const int64_t h = item % heads;
      if (seq.num_blocks == 0) continue;
      const T* g = grad + seq.block_start * row + h * dim;
      for (int64_t r = 0; r < block; ++r) {
        cpu::gemm<T>(false, true, seq.num_blocks, dim, dim, T(1), g, row, weight + (h * block + r) * dim * dim, dim,
                     T(1), grad_x + (seq.token_start + r) * row + h * dim, stride * row);
      }
    }
  });
  // dW[h, r] = sum over sequences of X_r^T G (+ pe_r^T sum_c G_c), one owner per (h, r): deterministic.
  std::vector<T> grad_sum(heads * dim, T(0));
  for (const CompressSeq& seq : seqs) {
    for (int64_t c = 0; c < seq.num_blocks; ++c)
      for (int64_t i = 0; i < row; ++i) grad_sum[i] += grad[(seq.block_start + c) * row + i];
  }
  at::parallel_for(0, heads * block, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / block, r = item % block;
      T* dw = grad_weight + item * dim * dim;
      const T* p = pe + item * dim;
      for (int64_t i = 0; i < dim; ++i)
        for (int64_t j = 0; j < dim; ++j) dw[i * dim + j] = p[i] * grad_sum[h * dim + j];
      for (const CompressSeq& seq : seqs) {
        if (seq.num_blocks == 0) continue;
        cpu::gemm<T>(true, false, dim, dim, seq.num_blocks, T(1), x + (seq.token_start + r) * row + h * dim,
                     stride * row, grad + seq.block_start * row + h * dim, row, T(1), dw, dim);
      }
      // dpe[h, r] = W[h, r] @ sum_c G_c
      cpu::gemm<T>(false, true, 1, dim, dim, T(1), grad_sum.data() + h * dim, dim, weight + item * dim * dim, dim,
                   T(0), grad_pe + item * dim, dim);
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
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "jsa_compress_cpu", [&] {
    compress_forward<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), seqs, heads,
                               dim, block, stride, out.data_ptr<scalar_t>());
  });
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
  at::Tensor grad_x = at::zeros_like(x, at::MemoryFormat::Contiguous);
  at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor grad_pe = at::empty_like(pe, at::MemoryFormat::Contiguous);
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), wc = weight.contiguous(), pc = pe.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "jsa_compress_backward_cpu", [&] {
    compress_backward<scalar_t>(gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                                pc.data_ptr<scalar_t>(), seqs, heads, dim, block, stride, grad_x.data_ptr<scalar_t>(),
                                grad_weight.data_ptr<scalar_t>(), grad_pe.data_ptr<scalar_t>());
  });
  return {grad_x, grad_weight, grad_pe};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparserec, CPU, m) {
  m.impl("jsa_compress", &jsa_compress_cpu);
  m.impl("jsa_compress_backward", &jsa_compress_backward_cpu);
}

}  // namespace sparserec
