// The float32 micro-kernel on 16-column weight panels, shared by gemm_cpu.cpp (weights packed once
// at load) and quant_cpu.cpp (GGUF blocks dequantized into one panel at a time for many rows).
//
// A panel holds 16 output columns of w_t as [K][16] (k-major, 64 contiguous bytes per k). A tile of
// R <= 6 activation rows x 16 columns keeps 2R AVX2 accumulators in registers and walks K once
// (the BLIS / llama.cpp-repack outer-product form: 2 weight loads and R broadcasts per 2R FMAs).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#ifndef LOOMLM_X86
#define LOOMLM_X86 1
#endif
#endif

namespace loomlm {

constexpr int64_t kPanel = 16;  // output columns per panel
constexpr int kMaxTileRows = 6;

// Writes the first `cols` columns of a 16-wide tile row, adding bias if given.
inline void store_row(const float* tile, float* y, const float* bias, int64_t cols) {
  for (int64_t j = 0; j < cols; ++j) y[j] = tile[j] + (bias ? bias[j] : 0.f);
}

// Portable tile: rows x 16 outputs of one panel. acc per output, k ascending.
inline void tile_scalar(const float* x, int64_t ldx, int rows, const float* w, int64_t K, float* y, int64_t ldy,
                 int64_t cols, const float* bias) {
  float acc[kMaxTileRows][kPanel];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * kPanel;
    for (int r = 0; r < rows; ++r) {
      const float xv = x[r * ldx + k];
      for (int64_t j = 0; j < kPanel; ++j) acc[r][j] += xv * wk[j];
    }
  }
  for (int r = 0; r < rows; ++r) store_row(acc[r], y + r * ldy, bias, cols);
}

#if LOOMLM_X86
// R rows x 16 columns. With few rows the FMA chains are too short to hide FMA latency (4 cycles,
// 2 per cycle: 8 independent chains needed), so U groups of accumulators take interleaved k's and
// are summed at the end: R * 2 * U <= 12 registers. `prefetch` (or nullptr): a line prefetched per k,
// prefetch + k * 16 (see gemm_f32 for which lines). The loops over r and u are unrolled before
// GCC's scalar replacement runs (the pragmas), so the accumulator arrays live in registers; left
// to itself GCC kept a copy of every accumulator on the stack, stored each iteration (3x slower).
template <int R, int U>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const float* x, int64_t ldx, const float* w, int64_t K, float* y,
                                                   int64_t ldy, int64_t cols, const float* bias, const float* prefetch) {
  __m256 acc0[U][R], acc1[U][R];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc0[u][r] = _mm256_setzero_ps();
      acc1[u][r] = _mm256_setzero_ps();
    }
  }
  const int64_t k_main = K - K % U;
  for (int64_t k = 0; k < k_main; k += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(prefetch + (k + u) * kPanel), _MM_HINT_T0);
      const __m256 w0 = _mm256_loadu_ps(w + (k + u) * kPanel);
      const __m256 w1 = _mm256_loadu_ps(w + (k + u) * kPanel + 8);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k + u);
        acc0[u][r] = _mm256_fmadd_ps(xv, w0, acc0[u][r]);
        acc1[u][r] = _mm256_fmadd_ps(xv, w1, acc1[u][r]);
      }
    }
  }
  for (int64_t k = k_main; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(w + k * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
      acc0[0][r] = _mm256_fmadd_ps(xv, w0, acc0[0][r]);
      acc1[0][r] = _mm256_fmadd_ps(xv, w1, acc1[0][r]);
    }
  }
#pragma GCC unroll 8
  for (int u = 1; u < U; ++u) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      acc0[0][r] = _mm256_add_ps(acc0[0][r], acc0[u][r]);
      acc1[0][r] = _mm256_add_ps(acc1[0][r], acc1[u][r]);
    }
  }
  if (cols == kPanel) {
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    if (bias) {
      b0 = _mm256_loadu_ps(bias);
      b1 = _mm256_loadu_ps(bias + 8);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(y + r * ldy, _mm256_add_ps(acc0[0][r], b0));
      _mm256_storeu_ps(y + r * ldy + 8, _mm256_add_ps(acc1[0][r], b1));
    }
    return;
  }
  alignas(32) float tile[kPanel];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(tile, acc0[0][r]);
    _mm256_store_ps(tile + 8, acc1[0][r]);
    store_row(tile, y + r * ldy, bias, cols);
  }
}

inline void tile_avx2_rows(const float* x, int64_t ldx, int rows, const float* w, int64_t K, float* y, int64_t ldy,
                    int64_t cols, const float* bias, const float* prefetch) {
  switch (rows) {
    case 1: return tile_avx2<1, 4>(x, ldx, w, K, y, ldy, cols, bias, prefetch);
    case 2: return tile_avx2<2, 2>(x, ldx, w, K, y, ldy, cols, bias, prefetch);
    case 3: return tile_avx2<3, 2>(x, ldx, w, K, y, ldy, cols, bias, prefetch);
    case 4: return tile_avx2<4, 1>(x, ldx, w, K, y, ldy, cols, bias, prefetch);
    case 5: return tile_avx2<5, 1>(x, ldx, w, K, y, ldy, cols, bias, prefetch);
    default: return tile_avx2<6, 1>(x, ldx, w, K, y, ldy, cols, bias, prefetch);
  }
}
#endif

}  // namespace loomlm
