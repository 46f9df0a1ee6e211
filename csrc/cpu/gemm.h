// Row-major GEMM for the per-step products of the CPU recurrence:  C[M,N] = A[M,K] @ op(B).
//
// Why not at::mm_out: at batch 1 a step's product is ~100k multiply-adds (well under a
// microsecond of arithmetic), while a trip through the dispatcher costs about as much again.
// PyTorch's x86 wheels link MKL into libtorch_cpu and export its Fortran sgemm_/dgemm_, so we
// call those directly when the loader finds them (weak symbols), after a one-time self-check of
// the calling convention. Anywhere else (aarch64 builds, other BLAS) we fall back to
// at::mm_out, which is correct everywhere, just with more overhead per call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <limits>

extern "C" {
// Declared weak: resolved to MKL's symbols exported by libtorch_cpu when present, null if not.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count; returns the previous setting (0: none was set).
int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));  // the by-value C entry
}

namespace lstm_fused::cpu {

inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const float* alpha, const float* a, const int* lda, const float* b,
                      const int* ldb, const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                      const double* alpha, const double* a, const int* lda, const double* b,
                      const int* ldb, const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
bool blas_symbol_present() {
  if constexpr (std::is_same_v<T, float>) return sgemm_ != nullptr;
  else return dgemm_ != nullptr;
}

// Products below this many multiply-adds run single-threaded (a few microseconds of work).
constexpr int64_t kSmallGemmMacs = 1 << 18;

// Column-major BLAS computing a row-major product: row-major C = A @ op(B) is column-major
// C^T = op(B)^T @ A^T, and a row-major matrix read column-major is its transpose.
template <typename T>
void blas_row_major(bool transpose_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                    const T* B, int64_t ldb, T* C, int64_t ldc) {
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int ldb_i = static_cast<int>(ldb), lda_i = static_cast<int>(lda), ldc_i = static_cast<int>(ldc);
  const T one = 1, zero = 0;
  // A batch-1 step is a ~100k multiply-add GEMV: MKL's fork/join across threads costs more than
  // the arithmetic, so small products run on the calling thread.
  const bool small = M * N * K < kSmallGemmMacs;
  const int previous = small && MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  blas_gemm(transpose_b ? "T" : "N", "N", &m, &n, &k, &one, B, &ldb_i, A, &lda_i, &zero, C, &ldc_i);
  if (small && MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
}

// One tiny product checked against a hand loop: guards against a BLAS whose integer width or
// convention differs from what we declared (an ILP64 build would read garbage sizes).
template <typename T>
bool blas_self_check() {
  if (!blas_symbol_present<T>()) return false;
  const T A[6] = {1, 2, 3, 4, 5, 6};            // 2x3
  const T B[12] = {1, 0, 2, 1, 3, 1, 0, 2, 1, 1, 1, 3};  // 4x3, used transposed
  T C[8] = {0};
  blas_row_major<T>(true, 2, 4, 3, A, 3, B, 3, C, 4);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      T expect = 0;
      for (int p = 0; p < 3; ++p) expect += A[i * 3 + p] * B[j * 3 + p];
      if (C[i * 4 + j] != expect) return false;
    }
  return true;
}

// LSTM_FUSED_CPU_GEMM=aten forces the at::mm_out path (tests use it to cover the fallback).
inline bool blas_disabled_by_env() {
  const char* v = std::getenv("LSTM_FUSED_CPU_GEMM");
  return v != nullptr && std::string(v) == "aten";
}

template <typename T>
bool use_blas() {
  static const bool ok = !blas_disabled_by_env() && blas_self_check<T>();
  return ok;
}

// C[M,N] = A[M,K] @ (transpose_b ? B[N,K]^T : B[K,N]); leading dims in elements.
template <typename T>
void gemm(bool transpose_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
          const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  const bool fits_int = M <= int_max && N <= int_max && K <= int_max && lda <= int_max &&
                        ldb <= int_max && ldc <= int_max;
  if (fits_int && use_blas<T>()) {
    blas_row_major<T>(transpose_b, M, N, K, A, lda, B, ldb, C, ldc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = transpose_b
                     ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                     : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  at::mm_out(c, a, b);
}

}  // namespace lstm_fused::cpu
