// Math shared by the fused CPU JSA kernels: a row-major GEMM on the BLAS that libtorch already
// carries, and an exponential that vectorises.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <new>
#include <vector>

// x86-64 builds of torch export MKL's Fortran BLAS; declared weak so the extension still loads
// against a torch without them (then the GEMM goes through at::mm, slower but correct).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
}

// Hot row loops are written on 8-lane vectors (GCC vector extensions) and compiled for AVX2+FMA and
// for baseline x86-64, picked at load time: no -march flag, runs on any x86-64 machine. (An AVX-512
// clone hits a GCC 12 internal error on vector compares.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSEREC_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPARSEREC_VECTOR_CLONES
#endif

namespace sparserec {
namespace cpu {

// Scope in which this thread's BLAS calls stay on this thread: the kernels parallelise over work items
// themselves, and MKL's results for one call depend on how many threads it may use. On leaving, the
// thread follows torch's global setting again.
class SequentialBlas {
 public:
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(0);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;
};

// Allocator for kernel workspaces: 64-byte aligned, because MKL's results may depend on the operands'
// alignment, and results must not depend on which thread's buffer a work item used.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{64};
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlignment)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlignment); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, AlignedAllocator<T>>;

template <typename T>
at::ScalarType scalar_type_of();
template <>
inline at::ScalarType scalar_type_of<float>() { return at::kFloat; }
template <>
inline at::ScalarType scalar_type_of<double>() { return at::kDouble; }

// C (m x n, row stride ldc) = alpha * op(A) @ op(B) + beta * C, all row-major: op(A) is m x k
// (A stored k x m when trans_a), op(B) is k x n (B stored n x k when trans_b). beta == 0 ignores C.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // BLAS rejects (and leaves C unwritten for) a row stride shorter than the row.
  TORCH_INTERNAL_ASSERT(lda >= (trans_a ? m : k) && ldb >= (trans_b ? k : n) && ldc >= n, "gemm: row stride too short");
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(std::max<int64_t>(ldb, 1)), ildb = static_cast<int>(std::max<int64_t>(lda, 1));
  const int ildc = static_cast<int>(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&tb, &ta, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
  } else {
    if (dgemm_) return dgemm_(&tb, &ta, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
  }
  const auto options = at::TensorOptions().dtype(scalar_type_of<T>());
  auto view = [&](const T* p, bool trans, int64_t rows, int64_t cols, int64_t ld) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), trans ? at::IntArrayRef{cols, rows} : at::IntArrayRef{rows, cols},
                                 {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor product = at::mm(view(a, trans_a, m, k, lda), view(b, trans_b, k, n, ldb)).mul_(alpha);
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (beta == T(0)) {
    out.copy_(product);
  } else {
    out.mul_(beta).add_(product);
  }
}

// 8 floats / 8 int32 lanes; comparisons give int lanes of -1 (true) or 0.
namespace vec {
constexpr int64_t kLanes = 8;
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

inline int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }
inline f8 splat(float x) { return f8{} + x; }
inline i8 splat(int32_t x) { return i8{} + x; }
inline f8 load(const float* p) {
  f8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline i8 load(const int32_t* p) {
  i8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, f8 v) { __builtin_memcpy(p, &v, sizeof v); }
inline float sum(f8 v) {
  float out = 0;
  for (int64_t i = 0; i < kLanes; ++i) out += v[i];
  return out;
}
inline float max(f8 v) {
  float out = v[0];
  for (int64_t i = 1; i < kLanes; ++i) out = v[i] > out ? v[i] : out;
  return out;
}
inline i8 iota() { return i8{0, 1, 2, 3, 4, 5, 6, 7}; }

// exp(x) for x <= 0 on 8 lanes, to about 2 ulp (Cephes' expf polynomial; floor by truncation and a
// correction, vector floor not being portable). Inputs below -87 give ~1e-38 instead of a denormal;
// callers mask excluded keys.
inline f8 exp_nonpositive(f8 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const f8 y = x * 1.44269504088896341f + 0.5f;
  const f8 truncated = __builtin_convertvector(__builtin_convertvector(y, i8), f8);
  const f8 n = truncated > y ? truncated - 1.0f : truncated;
  const f8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i8 exponent = (__builtin_convertvector(n, i8) + 127) << 23;
  return p * (f8)exponent;
}
}  // namespace vec

}  // namespace cpu
}  // namespace sparserec
