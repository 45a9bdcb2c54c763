// Float32 GEMM on weights packed once at load: y[M, N] = x[M, K] @ w_t[K, N] (+ bias[N]).
//
// Why our own: MKL's sgemm, packed or not, runs its generic code path on AMD CPUs, and at decode
// sizes (a few to a few tens of rows) it reads a large weight several times: on an AMD EPYC (Zen 3,
// AVX2) the [8, 576] x [576, 49152] LM head took 4-5x the time of one pass over its weight.
// benchmarks/gemm.py measures each method per shape and row count.
//
// Layout (the BLIS / llama.cpp-repack idea): the weight's N columns are cut into panels of 16;
// panel p holds w_t[:, 16p : 16p + 16] as [K][16] (k-major, 64 contiguous bytes per k), the last
// panel zero-padded: packed shape [ceil(N / 16), K, 16]. A micro-kernel keeps a tile of R rows x 16
// columns in 2R AVX2 accumulators (R <= 6: 12 accumulators, 2 weight registers, 1 broadcast) and
// walks K once, so each panel streams from memory once per 96 rows of x, and x's rows stay in
// L1/L2. Panels are split over ATen's thread pool (torch's own threads: no oversubscription).
//
// The instruction set is picked at run time from the CPU's flags (`__builtin_cpu_supports`), not
// from the build machine: the AVX2+FMA kernel is compiled with a function-level target attribute,
// and a portable scalar kernel computes the same sums (k ascending per output; the AVX2 kernel
// splits k over a few accumulators at 1-3 rows), so the two agree to float32 rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "float_tile.h"

namespace {

using loomlm::kMaxTileRows;
using loomlm::kPanel;
using loomlm::tile_scalar;
#if LOOMLM_X86
using loomlm::tile_avx2_rows;
#endif
constexpr int64_t kRowBlock = 96; // rows of x per pass over a panel group (x block stays in L2)
constexpr int64_t kUnpackColumns = 1024; // columns unpacked per BLAS call on the many-rows path
constexpr int64_t kPrefetchAhead = 48;   // k steps (64-byte panel lines) the first tile of a panel prefetches ahead

enum class Isa { kScalar, kAvx2 };

Isa best_isa() {
#if LOOMLM_X86
  static const Isa isa = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? Isa::kAvx2 : Isa::kScalar;
  return isa;
#else
  return Isa::kScalar;
#endif
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") {
    TORCH_CHECK(best_isa() == Isa::kAvx2, "gemm_f32: this CPU has no AVX2+FMA");
    return Isa::kAvx2;
  }
  TORCH_CHECK(false, "gemm_f32: unknown isa '", name, "' (auto, avx2, scalar)");
}

void check_cpu_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": float32 CPU tensor expected");
}

}  // namespace

// weight_t: [K, N] float32 -> packed [ceil(N / 16), K, 16], the last panel zero-padded.
at::Tensor pack_f32(const at::Tensor& weight_t) {
  check_cpu_f32(weight_t, "pack_f32");
  TORCH_CHECK(weight_t.dim() == 2, "pack_f32: [K, N] weight expected");
  const int64_t K = weight_t.size(0), N = weight_t.size(1);
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::Tensor padded = weight_t;
  if (panels * kPanel != N) padded = at::constant_pad_nd(weight_t, {0, panels * kPanel - N});
  // [K, P*16] -> [K, P, 16] -> [P, K, 16]
  return padded.reshape({K, panels, kPanel}).permute({1, 0, 2}).contiguous();
}

// x: [M, K] (rows contiguous), packed: [P, K, 16] from pack_f32, n: N <= 16P, bias: [N] or None.
// Returns y [M, N] float32. isa: "auto" (the CPU's best), "avx2" or "scalar" (tests compare them).
at::Tensor gemm_f32(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias,
                    const std::string& isa_name, int64_t large_m) {
  check_cpu_f32(x, "gemm_f32 x");
  check_cpu_f32(packed, "gemm_f32 packed");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "gemm_f32: x must be [M, K] with contiguous rows");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              "gemm_f32: packed weight [P, K, 16] expected (pack_f32)");
  const int64_t M = x.size(0), K = x.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "gemm_f32: x has K=", K, " but the packed weight ", packed.size(1));
  TORCH_CHECK(n > (panels - 1) * kPanel && n <= panels * kPanel, "gemm_f32: n=", n, " does not match ", panels,
              " panels");
  const float* bias_ptr = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    check_cpu_f32(*bias, "gemm_f32 bias");
    TORCH_CHECK(bias->numel() == n, "gemm_f32: bias has ", bias->numel(), " elements, expected ", n);
    bias_c = bias->contiguous();
    bias_ptr = bias_c.data_ptr<float>();
  }
  const Isa isa = parse_isa(isa_name);
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  if (M >= large_m && large_m > 0) {
    // Many rows (prefill): compute-bound, where a full BLAS GEMM with its own blocking wins. Each
    // chunk of panels is unpacked to a plain [K, width] matrix (K * width floats copied, against
    // M * K * width multiply-adds) and multiplied into its columns of y.
    const int64_t chunk_panels = std::max<int64_t>(1, kUnpackColumns / kPanel);
    for (int64_t p0 = 0; p0 < panels; p0 += chunk_panels) {
      const int64_t p1 = std::min(panels, p0 + chunk_panels);
      const int64_t col0 = p0 * kPanel, width = std::min(n, p1 * kPanel) - col0;
      // [p1-p0, K, 16] -> [K, (p1-p0)*16] -> first `width` columns
      at::Tensor plain = packed.narrow(0, p0, p1 - p0).permute({1, 0, 2}).reshape({K, (p1 - p0) * kPanel});
      at::Tensor out = y.narrow(1, col0, width);
      at::mm_out(out, x, plain.narrow(1, 0, width));
    }
    if (bias_ptr) y.add_(bias_c);
    return y;
  }
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Enough panels per task that a task does real work (>= ~64K multiply-adds at one row).
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, K));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t m1 = std::min(M, m0 + kRowBlock);
      for (int64_t p = p0; p < p1; ++p) {
        const float* w = wp + p * K * kPanel;
        const int64_t col0 = p * kPanel;
        const int64_t cols = std::min<int64_t>(kPanel, n - col0);
        const float* b = bias_ptr ? bias_ptr + col0 : nullptr;
        for (int64_t m = m0; m < m1; m += kMaxTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kMaxTileRows, m1 - m));
#if LOOMLM_X86
          if (isa == Isa::kAvx2) {
            // The first tile reads the panel from memory, faster than the hardware prefetcher
            // fetches it at a few rows: it prefetches kPrefetchAhead lines ahead (into the next
            // panel near its end). With three or more tiles the later ones read the panel from
            // cache, and the second fetches the thread's next panel meanwhile. One row streams
            // the weight, where explicit prefetches only cost issue slots. (benchmarks/gemm.py:
            // at 8-32 rows 1.15-1.3x on an AMD EPYC.)
            const float* prefetch = nullptr;
            if (m == m0 && m1 - m0 > 1) {
              prefetch = w + kPrefetchAhead * kPanel;
            } else if (m == m0 + kMaxTileRows && m1 - m0 > 2 * kMaxTileRows && p + 1 < p1) {
              prefetch = w + K * kPanel;
            }
            tile_avx2_rows(xp + m * ldx, ldx, rows, w, K, yp + m * n + col0, n, cols, b, prefetch);
            continue;
          }
#endif
          tile_scalar(xp + m * ldx, ldx, rows, w, K, yp + m * n + col0, n, cols, b);
        }
      }
    }
  });
  return y;
}

std::string gemm_isa() { return best_isa() == Isa::kAvx2 ? "avx2" : "scalar"; }
