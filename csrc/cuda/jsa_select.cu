// CUDA binding of sparserec::jsa_select: checks what is known on the host, launches the kernels of
// jsa_select.cuh on the current stream. Offset values are not read here (that would sync); the
// Python wrapper sparserec.ops.jsa_select validates them.
#include "jsa_select_checks.h"
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <limits>

#include "jsa_select.cuh"

namespace sparserec {
namespace {

// at::Half / at::BFloat16 share their bit layout with CUDA's own types, which the kernels use.
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

at::Tensor jsa_select_cuda(const at::Tensor& p_cmp, const at::Tensor& cu_seqlens, int64_t block, int64_t stride,
                           int64_t select_block, int64_t top_n, int64_t select_q_block, int64_t num_kv_heads,
                           bool causal) {
  check_jsa_select_args(p_cmp, cu_seqlens, block, stride, select_block, top_n, select_q_block, num_kv_heads);
  TORCH_CHECK(p_cmp.is_cuda() && cu_seqlens.device() == p_cmp.device(),
              "jsa_select (CUDA kernel): p_cmp and cu_seqlens must be on one CUDA device, got ", p_cmp.device(),
              " and ", cu_seqlens.device());
  const int64_t total = p_cmp.size(0), heads = p_cmp.size(1), num_cols = p_cmp.size(2);
  const int64_t num_seqs = cu_seqlens.numel() - 1;
  TORCH_CHECK(num_seqs >= 1 || total == 0, "jsa_select: cu_seqlens holds no sequence but p_cmp has ", total,
              " tokens");
  TORCH_CHECK(num_kv_heads <= 65535, "jsa_select (CUDA kernel): at most 65535 kv heads, got ", num_kv_heads);
  const int64_t tile_bound = (total + select_q_block - 1) / select_q_block + num_seqs;
  TORCH_CHECK(tile_bound <= std::numeric_limits<int32_t>::max(), "jsa_select (CUDA kernel): ", tile_bound,
              " query tiles exceed the grid limit; use a larger select_q_block");

  const c10::cuda::CUDAGuard device_guard(p_cmp.device());
  const at::Tensor probs = p_cmp.contiguous();
  const at::Tensor offsets = cu_seqlens.to(at::kLong).contiguous();
  at::Tensor cu_tiles = at::empty({num_seqs + 1}, offsets.options());
  at::Tensor out = at::empty({total, num_kv_heads, top_n}, offsets.options());
  const jsa_select_kernels::SelectParams params{total,        num_seqs, heads,          num_cols,
                                             block,        stride,   select_block,   top_n,
                                             select_q_block, num_kv_heads, causal};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p_cmp.scalar_type(), "jsa_select_cuda", [&] {
    using kernel_t = typename CudaType<scalar_t>::type;
    int64_t shared_limit = 0;
    C10_CUDA_CHECK(jsa_select_kernels::max_dynamic_shared_bytes<kernel_t>(p_cmp.get_device(), &shared_limit));
    // Each block keeps one double per compressed-block column in shared memory.
    TORCH_CHECK(num_cols * static_cast<int64_t>(sizeof(double)) <= shared_limit, "jsa_select (CUDA kernel): p_cmp has ",
                num_cols, " compressed-block columns; this device fits at most ", shared_limit / sizeof(double),
                " (shorter sequences or a larger stride)");
    C10_CUDA_CHECK(jsa_select_kernels::launch_select<kernel_t>(
        reinterpret_cast<const kernel_t*>(probs.data_ptr<scalar_t>()), offsets.data_ptr<int64_t>(),
        cu_tiles.data_ptr<int64_t>(), params, out.data_ptr<int64_t>(), stream));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparserec, CUDA, m) { m.impl("jsa_select", &jsa_select_cuda); }

}  // namespace sparserec
