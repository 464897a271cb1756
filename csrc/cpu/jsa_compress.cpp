// CPU kernels of sparserec::jsa_compress and its backward (SPEC §1, cmp): Kc_i = sum_r (x[i*d + r] + pe_r) W_r.
// Reference: sparserec.reference.jsa.jsa_compress. Per kv head, the flattened (l*D) inputs of a chunk
// of whole sequences' blocks (up to kChunkBlocks, or one longer sequence) are gathered into a
// workspace and multiplied by W_h (l*D x D) in one GEMM: short sequences share one large product
// instead of paying l small ones each, and no (Tc, l, Hkv, D) copy of the batch exists. pe enters as
// one bias row per head. Chunks hold whole sequences, so the backward's dx items never share a row.
#include "cpu/cpu_math.h"
#include "cpu/jsa_plan.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace sparserec {
namespace {

constexpr int64_t kChunkBlocks = 256;

struct Chunk {
  int64_t seq_begin, seq_end, block_begin, block_end;
};

// Consecutive sequences with blocks, grouped up to kChunkBlocks blocks (a longer sequence alone).
std::vector<Chunk> make_chunks(const std::vector<CompressSeq>& seqs) {
  std::vector<Chunk> chunks;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s) {
    const CompressSeq& seq = seqs[s];
    if (seq.num_blocks == 0) continue;
    if (chunks.empty() || chunks.back().block_end - chunks.back().block_begin + seq.num_blocks > kChunkBlocks) {
      chunks.push_back({s, s + 1, seq.block_start, seq.block_start + seq.num_blocks});
    } else {
      chunks.back().seq_end = s + 1;
      chunks.back().block_end = seq.block_start + seq.num_blocks;
    }
  }
  return chunks;
}

// dst row c = the flattened (l*D) input of the chunk's block c for head h.
template <typename T>
void gather_blocks(const T* x, const std::vector<CompressSeq>& seqs, const Chunk& chunk, int64_t h, int64_t heads,
                   int64_t dim, int64_t block, int64_t stride, cpu::Buffer<T>& dst) {
  const int64_t flat = block * dim;
  dst.resize((chunk.block_end - chunk.block_begin) * flat);
  T* out = dst.data();
  for (int64_t s = chunk.seq_begin; s < chunk.seq_end; ++s) {
    const CompressSeq& seq = seqs[s];
    for (int64_t c = 0; c < seq.num_blocks; ++c)
      for (int64_t r = 0; r < block; ++r, out += dim)
        std::copy_n(x + ((seq.token_start + c * stride + r) * heads + h) * dim, dim, out);
  }
}

template <typename T>
void compress_forward(const T* x, const T* weight, const T* pe, const std::vector<CompressSeq>& seqs, int64_t heads,
                      int64_t dim, int64_t block, int64_t stride, T* out) {
  const int64_t row = heads * dim, flat = block * dim;  // elements per token in x and out; per block input
  // bias[h] = sum_r pe[h, r] @ W[h, r]: the (1 x l*D) @ (l*D x D) product per head.
  std::vector<T> bias(heads * dim);
  for (int64_t h = 0; h < heads; ++h) {
    cpu::gemm<T>(false, false, 1, dim, flat, T(1), pe + h * flat, flat, weight + h * flat * dim, dim, T(0),
                 bias.data() + h * dim, dim);
  }
  const std::vector<Chunk> chunks = make_chunks(seqs);
  const int64_t num_items = static_cast<int64_t>(chunks.size()) * heads;
  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    cpu::Buffer<T> inputs;
    for (int64_t item = begin; item < end; ++item) {
      const Chunk& chunk = chunks[item / heads];
      const int64_t h = item % heads, count = chunk.block_end - chunk.block_begin;
      T* dst = out + chunk.block_begin * row + h * dim;
      for (int64_t c = 0; c < count; ++c) std::copy_n(bias.data() + h * dim, dim, dst + c * row);
      gather_blocks(x, seqs, chunk, h, heads, dim, block, stride, inputs);
      cpu::gemm<T>(false, false, count, dim, flat, T(1), inputs.data(), flat, weight + h * flat * dim, dim, T(1), dst,
                   row);
    }
  });
}

template <typename T>
void compress_backward(const T* grad, const T* x, const T* weight, const T* pe, const std::vector<CompressSeq>& seqs,
                       int64_t heads, int64_t dim, int64_t block, int64_t stride, T* grad_x, T* grad_weight,
                       T* grad_pe) {
  const int64_t row = heads * dim, flat = block * dim;
  const std::vector<Chunk> chunks = make_chunks(seqs);
  // dx of one (chunk, head): dBlocks = G W_h^T (blocks x l*D), added to the blocks' rows in order.
  const int64_t num_items = static_cast<int64_t>(chunks.size()) * heads;
  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    cpu::Buffer<T> d_blocks;
    for (int64_t item = begin; item < end; ++item) {
      const Chunk& chunk = chunks[item / heads];
      const int64_t h = item % heads, count = chunk.block_end - chunk.block_begin;
      d_blocks.resize(count * flat);
      cpu::gemm<T>(false, true, count, flat, dim, T(1), grad + chunk.block_begin * row + h * dim, row,
                   weight + h * flat * dim, dim, T(0), d_blocks.data(), flat);
      const T* src = d_blocks.data();
      for (int64_t s = chunk.seq_begin; s < chunk.seq_end; ++s) {
        const CompressSeq& seq = seqs[s];
        for (int64_t c = 0; c < seq.num_blocks; ++c) {
          for (int64_t r = 0; r < block; ++r, src += dim) {
            T* dst = grad_x + ((seq.token_start + c * stride + r) * heads + h) * dim;
            for (int64_t i = 0; i < dim; ++i) dst[i] += src[i];
          }
        }
      }
    }
  });
  // dW[h] = sum over chunks of Blocks^T G + pe_h^T (sum_c G_c), dpe[h] = (sum_c G_c) W_h^T; one owner
  // per head, chunks in order: deterministic.
  std::vector<T> grad_sum(heads * dim, T(0));
  for (const CompressSeq& seq : seqs) {
    for (int64_t c = 0; c < seq.num_blocks; ++c)
      for (int64_t i = 0; i < row; ++i) grad_sum[i] += grad[(seq.block_start + c) * row + i];
  }
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    const cpu::SequentialBlas sequential_blas;
    cpu::Buffer<T> inputs;
    for (int64_t h = begin; h < end; ++h) {
      T* dw = grad_weight + h * flat * dim;
      const T* g_sum = grad_sum.data() + h * dim;
      const T* p = pe + h * flat;
      for (int64_t i = 0; i < flat; ++i)
        for (int64_t j = 0; j < dim; ++j) dw[i * dim + j] = p[i] * g_sum[j];
      for (const Chunk& chunk : chunks) {
        gather_blocks(x, seqs, chunk, h, heads, dim, block, stride, inputs);
        cpu::gemm<T>(true, false, flat, dim, chunk.block_end - chunk.block_begin, T(1), inputs.data(), flat,
                     grad + chunk.block_begin * row + h * dim, row, T(1), dw, dim);
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
  at::Tensor grad_x = at::zeros_like(x, at::MemoryFormat::Contiguous);  // tokens in no block keep 0
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
