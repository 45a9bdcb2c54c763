// GEMM / GEMV on GGUF-quantized weights, kept in their block layout:
// y[M, N] = x[M, K] @ dequant(w)[N, K].T (+ bias[N]), w the tensor's raw bytes [N, row_bytes].
//
// As llama.cpp's ggml-cpu does (ggml_vec_dot_q4_0_q8_0 and friends): each activation row is
// quantized once to integer blocks, then every weight block meets it in an integer dot product,
// scaled into an fp32 accumulator per block. Activations (quant_gemm's activation_planes):
// - 1, llama.cpp's scheme: Q8_0-style blocks of 32 with a float scale and the block's sum of quants
//   for Q4_0/Q4_1/Q5_0/Q8_0 weights (AVX2: vpmaddubsw u8 x s8 -> int16 pairs, vpmaddwd with ones ->
//   int32); Q8_K-style super-blocks of 256 with 16 bsums for Q4_K/Q5_K/Q6_K (vpmaddwd with the
//   sub-block scales). Error |x - d_x q| <= d_x / 2 per element, d_x = max|x_block| / 127.
// - 2 (the default): 32-element blocks get 16-bit activations (XBlock16, d_x = max / 32767; the
//   weights' quants widened to int16 and met by vpmaddwd: one 8-bit plane's work); the K-quants
//   get a second 8-bit plane for the residual (twice the work). Either way the error is at most
//   d_x / 254 of the 8-bit scheme's d_x.
// Weights' zero points (-8, -16, -32) are folded in exactly as integers via the activation sums;
// Q4_1's and the K-quants' float mins use them in fp32.
//
// Bit layouts and dequantization formulas follow gguf-py's quants.py (`dequantize_blocks`), which
// mirrors ggml-quants.c; quant_dequantize reproduces them bit for bit (every product there is exact
// in fp32: an fp16 scale has 11 significant bits, the 6-bit sub-scales and quants at most 13 more).
//
// Work split: x is quantized once (all rows) into a scratch buffer; output features are split over
// ATen's thread pool (torch's own threads, no oversubscription) in tasks of >= 16 rows; a task walks
// panels of 16 weight rows, and for each group of up to 4 activation rows reads every weight block
// once for the group, in tiles of 4 (1-2 activation rows) or 2 (3-4) weight rows that share each
// activation block load. For decode (a few rows) that is a GEMV streaming the weights once.
//
// From `float_rows` activation rows on (quant_gemm's argument; the integer work grows with the
// rows, the float path's dequantization does not), panel_gemm runs instead: each panel of 16 weight
// rows is dequantized and transposed into float_tile.h's layout once, and the float GEMM's
// micro-kernel meets every activation row with it: the float32 product of the dequantized weights
// up to summation order, at the float method's speed, without a float copy of the weights.
//
// The instruction set is picked at run time from the CPU's flags (`__builtin_cpu_supports`), never
// from the build machine: AVX-512BW (the Intel hosts, no VNNI), AVX2 (the AMD hosts) or portable
// scalar code. The vector kernels carry function-level target attributes; all three compute the
// same integer sums per block (only the fp32 accumulation order differs). The AVX-512BW kernels
// run the AVX2 kernels' arithmetic on 512-bit vectors (a 16-bit activation block in one zmm, two
// 8-bit blocks or two K-quant sub-blocks per vpmaddubsw); the float path's dequantizer and panel
// tiles stay AVX2 there.
//
// LOOMLM_SIMDE (quant_simde.cpp, a test-only build): every x86 intrinsic here is emulated by SIMDe
// (simde_x86.h) in portable code, so the AVX-512BW kernels run, and are checked against the scalar
// ones, on a CPU without AVX-512 (tests/test_quant_kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "float_tile.h"

#if defined(LOOMLM_SIMDE)
#include "simde_x86.h"
#define LOOMLM_X86 1
#define LOOMLM_AVX2
#define LOOMLM_AVX512
#elif defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOOMLM_X86 1
#define LOOMLM_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LOOMLM_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#endif

namespace {

// GGML type ids (gguf.GGMLQuantizationType).
enum class QType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

struct QFormat {
  QType type;
  const char* name;
  int64_t block;  // weights per block
  int64_t bytes;  // bytes per block
};

constexpr QFormat kFormats[] = {
    {QType::kQ4_0, "Q4_0", 32, 18},   {QType::kQ4_1, "Q4_1", 32, 20},   {QType::kQ5_0, "Q5_0", 32, 22},
    {QType::kQ8_0, "Q8_0", 32, 34},   {QType::kQ4_K, "Q4_K", 256, 144}, {QType::kQ5_K, "Q5_K", 256, 176},
    {QType::kQ6_K, "Q6_K", 256, 210},
};

const QFormat& find_format(int64_t qtype, const char* fn) {
  for (const QFormat& f : kFormats) {
    if (static_cast<int64_t>(f.type) == qtype) return f;
  }
  TORCH_CHECK(false, fn, ": unsupported GGML type ", qtype,
              " (supported: Q4_0=2, Q4_1=3, Q5_0=6, Q8_0=8, Q4_K=12, Q5_K=13, Q6_K=14)");
}

constexpr bool is_k_quant(QType t) { return t == QType::kQ4_K || t == QType::kQ5_K || t == QType::kQ6_K; }

// Quantized activations. XBlock32: Q8_0-style (llama.cpp's block_q8_1 with a float scale);
// XBlock256: Q8_K-style, bsums[i] = sum of q[16i : 16i + 16].
struct XBlock32 {
  float d;
  int32_t sum;
  int8_t q[32];
};
struct XBlock256 {
  float d;
  int16_t bsums[16];
  int8_t q[256];
};
// XBlock16: one 16-bit plane for 32-element blocks (activation_planes = 2 there): d = max|x| / 32767,
// so |x - d q| <= d / 2 = max|x| / 65534, within the two-8-bit-plane bound (max|x| / 64516), for
// the integer work of one 8-bit plane (vpmaddwd on 16-bit pairs instead of two vpmaddubsw passes).
struct XBlock16 {
  float d;
  int32_t sum;
  int16_t q[32];
};

// q = round-half-even(x * Q / max|x|), d = max|x| / Q, Q the quant type's largest value (127 for
// int8, 32767 for int16): one code for both ISAs, so the paths see identical activations.
template <typename Q>
float quantize_chunk(const float* x, int64_t n, Q* q) {
  constexpr float kMax = static_cast<float>(std::numeric_limits<Q>::max());
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float id = amax != 0.f ? kMax / amax : 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::nearbyint(x[i] * id);
    q[i] = static_cast<Q>(std::min(kMax, std::max(-kMax, v)));
  }
  return amax / kMax;
}

// Blocks of 32 (XBlock32, or XBlock16 at 16 bits) with each block's sum of quants.
template <typename XB>
void quantize_row_32(const float* x, int64_t num_blocks, XB* out) {
  for (int64_t b = 0; b < num_blocks; ++b) {
    out[b].d = quantize_chunk(x + 32 * b, 32, out[b].q);
    int32_t sum = 0;
    for (int i = 0; i < 32; ++i) sum += out[b].q[i];
    out[b].sum = sum;
  }
}

void quantize_row_256(const float* x, int64_t num_blocks, XBlock256* out) {
  for (int64_t b = 0; b < num_blocks; ++b) {
    out[b].d = quantize_chunk(x + 256 * b, 256, out[b].q);
    for (int s = 0; s < 16; ++s) {
      int32_t sum = 0;
      for (int i = 0; i < 16; ++i) sum += out[b].q[16 * s + i];
      out[b].bsums[s] = static_cast<int16_t>(sum);
    }
  }
}

// Exact IEEE half -> float (normals, subnormals, inf, nan); p may be unaligned, little-endian.
inline float fp16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The 6-bit sub-block scales and mins of Q4_K / Q5_K (ggml's get_scale_min_k4).
inline void k4_scale_min(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// ---- Weight-block decoding to small integers (shared by the scalar kernels and dequantize) ----

// 32-element blocks: q[i] such that w[i] = d * (q[i] - zero) + m.
struct Block32 {
  float d, m;
  int zero;
  int16_t q[32];
};

template <QType T>
inline void decode32(const uint8_t* blk, Block32& o) {
  o.d = fp16_at(blk);
  o.m = 0.f;
  o.zero = 0;
  if constexpr (T == QType::kQ8_0) {
    for (int i = 0; i < 32; ++i) o.q[i] = static_cast<int8_t>(blk[2 + i]);
    return;
  }
  const uint8_t* qs = blk + (T == QType::kQ4_0 ? 2 : T == QType::kQ4_1 ? 4 : 6);
  for (int i = 0; i < 16; ++i) {
    o.q[i] = qs[i] & 0x0F;
    o.q[i + 16] = qs[i] >> 4;
  }
  if constexpr (T == QType::kQ4_0) o.zero = 8;
  if constexpr (T == QType::kQ4_1) o.m = fp16_at(blk + 2);
  if constexpr (T == QType::kQ5_0) {
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    for (int i = 0; i < 32; ++i) o.q[i] |= ((qh >> i) & 1) << 4;
    o.zero = 16;
  }
}

// 256-element super-blocks: groups of `group` elements, w = d * sc[g] * (q - zero) - dmin * mn[g].
struct Block256 {
  float d, dmin;
  int group, zero;
  int sc[16], mn[16];
  uint8_t q[256];
};

template <QType T>
inline void decode256(const uint8_t* blk, Block256& o) {
  if constexpr (T == QType::kQ6_K) {
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    o.d = fp16_at(blk + 208);
    o.dmin = 0.f;
    o.group = 16;
    o.zero = 32;
    for (int s = 0; s < 16; ++s) {
      o.sc[s] = static_cast<int8_t>(blk[192 + s]);
      o.mn[s] = 0;
    }
    // Element 128h + 32g + i: low nibble of ql[64h + 32(g%2) + i] (high nibble for g >= 2), top
    // two bits from qh[32h + i] >> 2g.
    for (int h = 0; h < 2; ++h) {
      for (int g = 0; g < 4; ++g) {
        for (int i = 0; i < 32; ++i) {
          const int lo = (ql[64 * h + 32 * (g % 2) + i] >> (4 * (g / 2))) & 0x0F;
          const int hi = (qh[32 * h + i] >> (2 * g)) & 3;
          o.q[128 * h + 32 * g + i] = static_cast<uint8_t>(lo | (hi << 4));
        }
      }
    }
    return;
  }
  o.d = fp16_at(blk);
  o.dmin = fp16_at(blk + 2);
  o.group = 32;
  o.zero = 0;
  uint8_t sc[8], mn[8];
  k4_scale_min(blk + 4, sc, mn);
  for (int j = 0; j < 8; ++j) {
    o.sc[j] = sc[j];
    o.mn[j] = mn[j];
  }
  const uint8_t* qs = blk + (T == QType::kQ4_K ? 16 : 48);
  // Sub-block j, element i: nibble j%2 of qs[32(j/2) + i]; Q5_K's fifth bit is bit j of qh[i].
  for (int j = 0; j < 8; ++j) {
    for (int i = 0; i < 32; ++i) {
      int v = (qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 0x0F;
      if constexpr (T == QType::kQ5_K) v |= ((blk[16 + i] >> j) & 1) << 4;
      o.q[32 * j + i] = static_cast<uint8_t>(v);
    }
  }
}

// ---- Dequantization (gguf quants.py formulas, bit for bit) ----

template <QType T>
void dequantize_row(const uint8_t* w, int64_t num_blocks, float* y) {
  if constexpr (!is_k_quant(T)) {
    constexpr int64_t bytes = T == QType::kQ4_0 ? 18 : T == QType::kQ4_1 ? 20 : T == QType::kQ5_0 ? 22 : 34;
    Block32 blk;
    for (int64_t b = 0; b < num_blocks; ++b) {
      decode32<T>(w + b * bytes, blk);
      // d * (q - zero) (+ m): the product is exact, so an FMA rounds as numpy's mul-then-add does.
      for (int i = 0; i < 32; ++i) {
        const float v = blk.d * static_cast<float>(blk.q[i] - blk.zero);
        y[32 * b + i] = T == QType::kQ4_1 ? v + blk.m : v;  // no "+ 0.f": it would turn -0.0 into +0.0
      }
    }
  } else {
    constexpr int64_t bytes = T == QType::kQ4_K ? 144 : T == QType::kQ5_K ? 176 : 210;
    Block256 blk;
    for (int64_t b = 0; b < num_blocks; ++b) {
      decode256<T>(w + b * bytes, blk);
      for (int e = 0; e < 256; ++e) {
        const int g = e / blk.group;
        const float scale = blk.d * static_cast<float>(blk.sc[g]);
        const float value = scale * static_cast<float>(static_cast<int>(blk.q[e]) - blk.zero);
        y[256 * b + e] = T == QType::kQ6_K ? value : value - blk.dmin * static_cast<float>(blk.mn[g]);
      }
    }
  }
}

// ---- Row-group dot products: out[r] = dot(weight row w, quantized activation row xs[r]), r < R ----

using VecDot = void (*)(const uint8_t* w, const uint8_t* const* xs, int64_t num_blocks, float* out);

// XB: the activation blocks of 32-element weight blocks (XBlock32, or XBlock16 at 16 bits); the
// K-quants always meet XBlock256.
template <QType T, int R, typename XB = XBlock32>
void vec_scalar(const uint8_t* w, const uint8_t* const* xs, int64_t num_blocks, float* out) {
  float acc[R] = {}, offset[R] = {};  // offset: Q4_1's + m, the K-quants' - dmin * mn terms
  if constexpr (!is_k_quant(T)) {
    constexpr int64_t bytes = T == QType::kQ4_0 ? 18 : T == QType::kQ4_1 ? 20 : T == QType::kQ5_0 ? 22 : 34;
    Block32 blk;
    for (int64_t b = 0; b < num_blocks; ++b) {
      decode32<T>(w + b * bytes, blk);
      for (int r = 0; r < R; ++r) {
        const XB& x = reinterpret_cast<const XB*>(xs[r])[b];
        int32_t isum = -blk.zero * x.sum;  // |isum| < 2^31: 32 * 127 * 32767 at most
        for (int i = 0; i < 32; ++i) isum += blk.q[i] * x.q[i];
        acc[r] += (blk.d * x.d) * static_cast<float>(isum);
        offset[r] += blk.m * (x.d * static_cast<float>(x.sum));
      }
    }
  } else {
    constexpr int64_t bytes = T == QType::kQ4_K ? 144 : T == QType::kQ5_K ? 176 : 210;
    Block256 blk;
    for (int64_t b = 0; b < num_blocks; ++b) {
      decode256<T>(w + b * bytes, blk);
      const int num_groups = 256 / blk.group;
      for (int r = 0; r < R; ++r) {
        const XBlock256& x = reinterpret_cast<const XBlock256*>(xs[r])[b];
        int32_t isum = 0, imin = 0;
        for (int g = 0; g < num_groups; ++g) {
          int32_t gsum = 0;
          for (int i = g * blk.group; i < (g + 1) * blk.group; ++i) gsum += blk.q[i] * x.q[i];
          // The group's activation sum from the 16-element bsums (1 or 2 of them).
          const int32_t xsum = blk.group == 16 ? x.bsums[g] : x.bsums[2 * g] + x.bsums[2 * g + 1];
          isum += blk.sc[g] * (gsum - blk.zero * xsum);
          imin += blk.mn[g] * xsum;
        }
        acc[r] += (blk.d * x.d) * static_cast<float>(isum);
        offset[r] -= (blk.dmin * x.d) * static_cast<float>(imin);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r] + offset[r];
}

#if LOOMLM_X86
LOOMLM_AVX2 inline float fp16_at_f16c(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));  // _cvtsh_ss, which SIMDe lacks
}

LOOMLM_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LOOMLM_AVX2 inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// Unsigned bytes u times signed bytes s, summed in fours -> 8 int32. No int16 saturation here:
// |u| <= 128 and |s| <= 127 give pair sums <= 32512.
LOOMLM_AVX2 inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// 16 bytes of nibbles -> 32 bytes: the low nibbles, then the high ones (the Q4_0/Q4_1/Q5_0 order).
LOOMLM_AVX2 inline __m256i nibbles32(const uint8_t* qs) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

// Byte i = 0x10 where bit i of the 32-bit word at p is set, else 0 (ggml's bytes_from_bits_32).
LOOMLM_AVX2 inline __m256i bits32_to_0x10(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(bits)), shuffle);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

// An int32 vector holding v in lane 0: folds a per-block integer correction into the lane sums.
LOOMLM_AVX2 inline __m256i lane0(int32_t v) { return _mm256_setr_epi32(v, 0, 0, 0, 0, 0, 0, 0); }

// A 32-element block's quants as 32 bytes, in element order: Q4_0 / Q4_1 / Q5_0 unsigned (0..15,
// 0..31; the zero point not subtracted), Q8_0 signed.
template <QType T>
LOOMLM_AVX2 inline __m256i quants32(const uint8_t* blk) {
  if constexpr (T == QType::kQ4_0) return nibbles32(blk + 2);
  if constexpr (T == QType::kQ4_1) return nibbles32(blk + 4);
  if constexpr (T == QType::kQ5_0) return _mm256_or_si256(nibbles32(blk + 6), bits32_to_0x10(blk + 2));
  return load32(blk + 2);
}

// A 32-element block's quants as two vectors of 16 int16 (elements 0-15, 16-31), for the 16-bit
// activations: Q4_0 / Q4_1 zero-extend the 16 nibble bytes once, and the low / high nibbles are the
// two halves (no byte shuffle); Q8_0 sign-extends; Q5_0 widens its 32 unsigned bytes.
template <QType T>
LOOMLM_AVX2 inline void quants16(const uint8_t* blk, __m256i& lo, __m256i& hi) {
  if constexpr (T == QType::kQ4_0 || T == QType::kQ4_1) {
    const __m256i z = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (T == QType::kQ4_0 ? 2 : 4))));
    lo = _mm256_and_si256(z, _mm256_set1_epi16(0x0F));
    hi = _mm256_srli_epi16(z, 4);
  } else if constexpr (T == QType::kQ8_0) {
    lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
  } else {
    const __m256i q = quants32<T>(blk);
    lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
    hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1));
  }
}

// The float terms of a block that do not depend on the element, for WR weight rows at once: Q4_1's
// m, Q4_0's -8 d, Q5_0's -16 d (times d_x * sum(q_x) by the caller); lanes past WR are 0.
template <QType T, int WR>
LOOMLM_AVX2 inline __m128 row_offsets(const uint8_t* blk0, int64_t row_bytes) {
  constexpr float kZero = T == QType::kQ4_0 ? -8.f : T == QType::kQ5_0 ? -16.f : 0.f;
  uint16_t h[4] = {0, 0, 0, 0};
  for (int i = 0; i < WR; ++i) std::memcpy(&h[i], blk0 + i * row_bytes + (T == QType::kQ4_1 ? 2 : 0), 2);
  const __m128 m = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(h)));
  return kZero != 0.f ? _mm_mul_ps(m, _mm_set1_ps(kZero)) : m;
}

// Q6_K's -32 zero point against activation block x: -32 * sum_s sc[s] * bsums[s].
inline int32_t q6k_zero_correction(const int8_t* sc, const XBlock256& x) {
  int32_t corr = 0;
  for (int s = 0; s < 16; ++s) corr += sc[s] * x.bsums[s];
  return -32 * corr;
}

// Q4_K / Q5_K: the sub-blocks' mins against activation block x, sum_j mn[j] * (x's sum over sub-block j).
inline int32_t k45_min_sum(const uint8_t* mn, const XBlock256& x) {
  int32_t imin = 0;
  for (int j = 0; j < 8; ++j) imin += mn[j] * (x.bsums[2 * j] + x.bsums[2 * j + 1]);
  return imin;
}

// WR weight rows (row_bytes apart) against R activation rows: out[wr * R + r]. One block step loads
// each activation block once for all WR rows and decodes each weight block once for all R rows, so
// the WR * R accumulators are independent FMA chains. The float terms that do not depend on the
// element (Q4_1's m, the zero points -8 d / -16 d of Q4_0 / Q5_0, times d_x * sum(q_x)) run on
// WR lanes at once. W16: the activations are XBlock16 (16-bit), met by vpmaddwd on the weights'
// int16 quants; else XBlock32 (8-bit), met by vpmaddubsw.
template <QType T, int WR, int R, bool W16>
LOOMLM_AVX2 void tile_avx2_32(const uint8_t* w, int64_t row_bytes, const uint8_t* const* xs, int64_t num_blocks,
                              float* out) {
  static_assert(WR >= 1 && WR <= 4, "WR weight rows fill one __m128 of offsets");
  using XB = std::conditional_t<W16, XBlock16, XBlock32>;
  constexpr int64_t bytes = T == QType::kQ4_0 ? 18 : T == QType::kQ4_1 ? 20 : T == QType::kQ5_0 ? 22 : 34;
  constexpr bool kOffset = T != QType::kQ8_0;
  __m256 acc[WR][R];
  __m128 offset[R];
  for (int r = 0; r < R; ++r) {
    offset[r] = _mm_setzero_ps();
    for (int i = 0; i < WR; ++i) acc[i][r] = _mm256_setzero_ps();
  }
  // The tile's rows are read side by side, which the hardware prefetchers follow worse than one
  // row at a time (decode at one stream is bound by reading the weights from memory): prefetch
  // the tile two ahead at the rate this one is consumed, WR blocks per step.
  const uint8_t* ahead = w + 2 * WR * row_bytes;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* blk0 = w + b * bytes;
    if constexpr (WR > 1) {
      for (int64_t line = 0; line < WR * bytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + b * WR * bytes + line), _MM_HINT_T0);
    }
    __m256i xq[R], xq_hi[R];  // 8-bit: the 32 quants in xq; 16-bit: elements 0-15 in xq, 16-31 in xq_hi
    __m256 xd[R];
    for (int r = 0; r < R; ++r) {
      const XB& x = reinterpret_cast<const XB*>(xs[r])[b];
      xq[r] = load32(x.q);
      if constexpr (W16) xq_hi[r] = load32(x.q + 16);
      xd[r] = _mm256_set1_ps(x.d);
    }
    if constexpr (kOffset) {
      const __m128 m = row_offsets<T, WR>(blk0, row_bytes);
      for (int r = 0; r < R; ++r) {
        const XB& x = reinterpret_cast<const XB*>(xs[r])[b];
        offset[r] = _mm_fmadd_ps(m, _mm_set1_ps(x.d * static_cast<float>(x.sum)), offset[r]);
      }
    }
    for (int i = 0; i < WR; ++i) {
      const uint8_t* blk = blk0 + i * row_bytes;
      const __m256 d = _mm256_set1_ps(fp16_at_f16c(blk));
      if constexpr (W16) {
        __m256i lo, hi;
        quants16<T>(blk, lo, hi);
        for (int r = 0; r < R; ++r) {
          // |pair sum| <= 2 * 128 * 32767: no int32 overflow; a lane's 4 products stay below 2^24.
          const __m256i isum = _mm256_add_epi32(_mm256_madd_epi16(lo, xq[r]), _mm256_madd_epi16(hi, xq_hi[r]));
          acc[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(d, xd[r]), _mm256_cvtepi32_ps(isum), acc[i][r]);
        }
      } else {
        const __m256i signs = quants32<T>(blk);  // Q8_0's signed quants; the others' are unsigned
        // unsigned quants (Q8_0: |q|, the sign moved onto x)
        const __m256i qw = T == QType::kQ8_0 ? _mm256_sign_epi8(signs, signs) : signs;
        for (int r = 0; r < R; ++r) {
          __m256i xr = xq[r];
          if constexpr (T == QType::kQ8_0) xr = _mm256_sign_epi8(xr, signs);
          const __m256 isum = _mm256_cvtepi32_ps(dot_u8s8(qw, xr));
          acc[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(d, xd[r]), isum, acc[i][r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float off[4];
    _mm_storeu_ps(off, offset[r]);
    for (int i = 0; i < WR; ++i) out[i * R + r] = hsum(acc[i][r]) + (kOffset ? off[i] : 0.f);
  }
}

// Q6_K: half h of a super-block (elements 128h ...) as 4 x 32 six-bit quants, q[g] = elements
// 128h + 32g ...: 4 low bits from ql, 2 high bits from qh >> 2g.
LOOMLM_AVX2 inline void q6k_quants(const uint8_t* blk, int h, __m256i q[4]) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  const __m256i bits1 = load32(blk + 64 * h), bits2 = load32(blk + 64 * h + 32);
  const __m256i hb = load32(blk + 128 + 32 * h);
  q[0] = _mm256_or_si256(_mm256_and_si256(bits1, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
  q[1] = _mm256_or_si256(_mm256_and_si256(bits2, m4), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
  q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m4), _mm256_and_si256(hb, m30));
  q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m4),
                         _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
}

// Q4_K / Q5_K super-block blk: sub-blocks 2c (lo) and 2c + 1 (hi) as 32 quants each; Q5_K's fifth
// bit of sub-block j is bit j of qh[i] (the 32 bytes at blk + 16).
template <QType T>
LOOMLM_AVX2 inline void k45_quants(const uint8_t* blk, int c, __m256i& lo, __m256i& hi) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i bits = load32(blk + (T == QType::kQ4_K ? 16 : 48) + 32 * c);
  lo = _mm256_and_si256(bits, m4);
  hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
  if constexpr (T == QType::kQ5_K) {
    const __m256i mlo = _mm256_set1_epi8(static_cast<char>(1 << (2 * c)));
    const __m256i mhi = _mm256_set1_epi8(static_cast<char>(1 << (2 * c + 1)));
    const __m256i m16 = _mm256_set1_epi8(0x10), hbits = load32(blk + 16);
    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, mlo), mlo), m16));
    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hbits, mhi), mhi), m16));
  }
}

template <QType T, int R>
LOOMLM_AVX2 void vec_avx2_k(const uint8_t* w, const uint8_t* const* xs, int64_t num_blocks, float* out) {
  constexpr int64_t bytes = T == QType::kQ4_K ? 144 : T == QType::kQ5_K ? 176 : 210;
  __m256 acc[R];
  float mins[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* blk = w + b * bytes;
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    float d, dmin = 0.f;
    if constexpr (T == QType::kQ6_K) {
      d = fp16_at_f16c(blk + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      for (int h = 0; h < 2; ++h) {
        __m256i q[4];
        q6k_quants(blk, h, q);
        // 16 elements per scale: the low 128-bit lane takes sc[8h + 2g], the high lane sc[8h + 2g + 1].
        __m256i scale[4];
        for (int g = 0; g < 4; ++g) {
          scale[g] = _mm256_set_m128i(_mm_set1_epi16(sc[8 * h + 2 * g + 1]), _mm_set1_epi16(sc[8 * h + 2 * g]));
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* xq = reinterpret_cast<const XBlock256*>(xs[r])[b].q + 128 * h;
          for (int g = 0; g < 4; ++g) {
            const __m256i p = _mm256_maddubs_epi16(q[g], load32(xq + 32 * g));
            isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, scale[g]));
          }
        }
      }
      for (int r = 0; r < R; ++r)
        isum[r] = _mm256_add_epi32(isum[r], lane0(q6k_zero_correction(sc, reinterpret_cast<const XBlock256*>(xs[r])[b])));
    } else {
      d = fp16_at_f16c(blk);
      dmin = fp16_at_f16c(blk + 2);
      uint8_t sc[8], mn[8];
      k4_scale_min(blk + 4, sc, mn);
      for (int c = 0; c < 4; ++c) {
        __m256i lo, hi;
        k45_quants<T>(blk, c, lo, hi);
        const __m256i slo = _mm256_set1_epi16(sc[2 * c]), shi = _mm256_set1_epi16(sc[2 * c + 1]);
        for (int r = 0; r < R; ++r) {
          const int8_t* xq = reinterpret_cast<const XBlock256*>(xs[r])[b].q + 64 * c;
          const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load32(xq)), slo);
          const __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load32(xq + 32)), shi);
          isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(plo, phi));
        }
      }
      for (int r = 0; r < R; ++r) {
        const XBlock256& x = reinterpret_cast<const XBlock256*>(xs[r])[b];
        mins[r] += (dmin * x.d) * static_cast<float>(k45_min_sum(mn, x));
      }
    }
    for (int r = 0; r < R; ++r) {
      const float dx = reinterpret_cast<const XBlock256*>(xs[r])[b].d;
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(isum[r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) - mins[r];
}

// ---- AVX-512BW: the kernels above on 512-bit vectors (32 registers, so a 4 x 4 tile fits) ----

LOOMLM_AVX512 inline __m512i join256(__m256i lo, __m256i hi) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

LOOMLM_AVX512 inline float hsum512(__m512 v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}

// tile_avx2_32 with W16: one zmm holds a 16-bit activation block (32 int16) and the weight block's
// quants widened to int16, met by one vpmaddwd. Without W16 (8-bit activations): two consecutive
// blocks per step in one zmm (64 bytes, one vpmaddubsw), each half with its own d * d_x; past an
// odd row's last block the second half is zero.
template <QType T, int WR, int R, bool W16>
LOOMLM_AVX512 void tile_avx512_32(const uint8_t* w, int64_t row_bytes, const uint8_t* const* xs, int64_t num_blocks,
                                  float* out) {
  static_assert(WR >= 1 && WR <= 4, "WR weight rows fill one __m128 of offsets");
  using XB = std::conditional_t<W16, XBlock16, XBlock32>;
  constexpr int64_t bytes = T == QType::kQ4_0 ? 18 : T == QType::kQ4_1 ? 20 : T == QType::kQ5_0 ? 22 : 34;
  constexpr bool kOffset = T != QType::kQ8_0;
  constexpr int64_t kStep = W16 ? 1 : 2;  // blocks per zmm
  constexpr __mmask16 kHigh = 0xFF00;    // the float lanes of the second block of a pair
  __m512 acc[WR][R];
  __m128 offset[R];
  for (int r = 0; r < R; ++r) {
    offset[r] = _mm_setzero_ps();
    for (int i = 0; i < WR; ++i) acc[i][r] = _mm512_setzero_ps();
  }
  const uint8_t* ahead = w + 2 * WR * row_bytes;  // as tile_avx2_32: the tile two ahead
  for (int64_t b = 0; b < num_blocks; b += kStep) {
    const int64_t nb = std::min<int64_t>(kStep, num_blocks - b);  // blocks in this step: 1 or 2
    if constexpr (WR > 1) {
      for (int64_t line = 0; line < WR * nb * bytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + b * WR * bytes + line), _MM_HINT_T0);
    }
    __m512i xq[R];
    __m512 xd[R];
    for (int r = 0; r < R; ++r) {
      const XB* x = reinterpret_cast<const XB*>(xs[r]) + b;
      if constexpr (W16) {
        xq[r] = _mm512_loadu_si512(x->q);
        xd[r] = _mm512_set1_ps(x->d);
      } else {
        xq[r] = join256(load32(x[0].q), nb == 2 ? load32(x[1].q) : _mm256_setzero_si256());
        xd[r] = _mm512_mask_blend_ps(kHigh, _mm512_set1_ps(x[0].d), _mm512_set1_ps(nb == 2 ? x[1].d : 0.f));
      }
    }
    if constexpr (kOffset) {
      for (int64_t e = 0; e < nb; ++e) {
        const __m128 m = row_offsets<T, WR>(w + (b + e) * bytes, row_bytes);
        for (int r = 0; r < R; ++r) {
          const XB& x = reinterpret_cast<const XB*>(xs[r])[b + e];
          offset[r] = _mm_fmadd_ps(m, _mm_set1_ps(x.d * static_cast<float>(x.sum)), offset[r]);
        }
      }
    }
    for (int i = 0; i < WR; ++i) {
      const uint8_t* blk = w + i * row_bytes + b * bytes;
      if constexpr (W16) {
        __m256i lo, hi;
        quants16<T>(blk, lo, hi);
        const __m512i q = join256(lo, hi);
        const __m512 d = _mm512_set1_ps(fp16_at_f16c(blk));
        for (int r = 0; r < R; ++r) {
          const __m512i isum = _mm512_madd_epi16(q, xq[r]);  // bounds as in tile_avx2_32
          acc[i][r] = _mm512_fmadd_ps(_mm512_mul_ps(d, xd[r]), _mm512_cvtepi32_ps(isum), acc[i][r]);
        }
      } else {
        const __m512i q = join256(quants32<T>(blk), nb == 2 ? quants32<T>(blk + bytes) : _mm256_setzero_si256());
        const __m512 d = _mm512_mask_blend_ps(kHigh, _mm512_set1_ps(fp16_at_f16c(blk)),
                                              _mm512_set1_ps(nb == 2 ? fp16_at_f16c(blk + bytes) : 0.f));
        // Q8_0: |q| unsigned and x negated where q < 0 (AVX-512 has no vpsignb); |-128| reads as 128.
        const __mmask64 negative = T == QType::kQ8_0 ? _mm512_movepi8_mask(q) : 0;
        const __m512i qw = T == QType::kQ8_0 ? _mm512_abs_epi8(q) : q;
        for (int r = 0; r < R; ++r) {
          __m512i xr = xq[r];
          if constexpr (T == QType::kQ8_0) xr = _mm512_mask_sub_epi8(xr, negative, _mm512_setzero_si512(), xr);
          const __m512i isum = _mm512_madd_epi16(_mm512_maddubs_epi16(qw, xr), _mm512_set1_epi16(1));
          acc[i][r] = _mm512_fmadd_ps(_mm512_mul_ps(d, xd[r]), _mm512_cvtepi32_ps(isum), acc[i][r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    float off[4];
    _mm_storeu_ps(off, offset[r]);
    for (int i = 0; i < WR; ++i) out[i * R + r] = hsum512(acc[i][r]) + (kOffset ? off[i] : 0.f);
  }
}

// vec_avx2_k with 64 quants per vpmaddubsw: Q4_K / Q5_K sub-blocks 2c and 2c + 1 (elements 64c ...),
// Q6_K elements 128h + 64p ... (four 16-element scale groups, one per 128-bit lane).
template <QType T, int R>
LOOMLM_AVX512 void vec_avx512_k(const uint8_t* w, const uint8_t* const* xs, int64_t num_blocks, float* out) {
  constexpr int64_t bytes = T == QType::kQ4_K ? 144 : T == QType::kQ5_K ? 176 : 210;
  // int16 lane j of a Q6_K scale vector takes scale j / 8 (the 8 int16 pair sums of 16 elements).
  alignas(64) static const int16_t kLaneScale[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                     2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
  __m512 acc[R];
  float mins[R] = {};
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* blk = w + b * bytes;
    __m512i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm512_setzero_si512();
    float d, dmin = 0.f;
    if constexpr (T == QType::kQ6_K) {
      d = fp16_at_f16c(blk + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      const __m512i lane_scale = _mm512_load_si512(kLaneScale);
      for (int h = 0; h < 2; ++h) {
        __m256i q[4];
        q6k_quants(blk, h, q);
        for (int p = 0; p < 2; ++p) {
          const __m512i qq = join256(q[2 * p], q[2 * p + 1]);
          int32_t four;  // sc[8h + 4p ...]: 4 bytes, never past the block's end
          std::memcpy(&four, sc + 8 * h + 4 * p, 4);
          const __m512i scale =
              _mm512_permutexvar_epi16(lane_scale, _mm512_castsi128_si512(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(four))));
          for (int r = 0; r < R; ++r) {
            const int8_t* xq = reinterpret_cast<const XBlock256*>(xs[r])[b].q + 128 * h + 64 * p;
            const __m512i prod = _mm512_maddubs_epi16(qq, _mm512_loadu_si512(xq));
            isum[r] = _mm512_add_epi32(isum[r], _mm512_madd_epi16(prod, scale));
          }
        }
      }
      for (int r = 0; r < R; ++r) {  // into lane 0
        const int32_t corr = q6k_zero_correction(sc, reinterpret_cast<const XBlock256*>(xs[r])[b]);
        isum[r] = _mm512_mask_add_epi32(isum[r], 1, isum[r], _mm512_set1_epi32(corr));
      }
    } else {
      d = fp16_at_f16c(blk);
      dmin = fp16_at_f16c(blk + 2);
      uint8_t sc[8], mn[8];
      k4_scale_min(blk + 4, sc, mn);
      for (int c = 0; c < 4; ++c) {
        __m256i lo, hi;
        k45_quants<T>(blk, c, lo, hi);
        const __m512i qq = join256(lo, hi);
        // int16 lanes 0-15 hold sub-block 2c's pair sums, 16-31 sub-block 2c + 1's.
        const __m512i scale = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16(sc[2 * c]),
                                                      _mm512_set1_epi16(sc[2 * c + 1]));
        for (int r = 0; r < R; ++r) {
          const int8_t* xq = reinterpret_cast<const XBlock256*>(xs[r])[b].q + 64 * c;
          const __m512i prod = _mm512_maddubs_epi16(qq, _mm512_loadu_si512(xq));
          isum[r] = _mm512_add_epi32(isum[r], _mm512_madd_epi16(prod, scale));
        }
      }
      for (int r = 0; r < R; ++r) {
        const XBlock256& x = reinterpret_cast<const XBlock256*>(xs[r])[b];
        mins[r] += (dmin * x.d) * static_cast<float>(k45_min_sum(mn, x));
      }
    }
    for (int r = 0; r < R; ++r) {
      const float dx = reinterpret_cast<const XBlock256*>(xs[r])[b].d;
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(d * dx), _mm512_cvtepi32_ps(isum[r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum512(acc[r]) - mins[r];
}
#endif

#if LOOMLM_X86
// ---- Float path: dequantize a tile of weight rows into L1, then float32 dot products ----

// 32-element blocks -> floats, 8 at a time: d * (q - zero) (+ m) as one FMA per element. The
// products are exact (an fp16 scale times a small integer), so this equals dequantize_row's
// mul-then-add except where Q4_1's + m rounds (one rounding here, two there: <= 1 ulp).
template <QType T>
LOOMLM_AVX2 void dequantize_row_avx2(const uint8_t* w, int64_t num_blocks, float* y) {
  constexpr int64_t bytes = T == QType::kQ4_0 ? 18 : T == QType::kQ4_1 ? 20 : T == QType::kQ5_0 ? 22 : 34;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* blk = w + b * bytes;
    const float d = fp16_at_f16c(blk);
    const __m256i q = quants32<T>(blk);
    const float bias = T == QType::kQ4_1 ? fp16_at_f16c(blk + 2) : T == QType::kQ4_0 ? -8.f * d
                       : T == QType::kQ5_0 ? -16.f * d : 0.f;
    const __m256 vd = _mm256_set1_ps(d), vb = _mm256_set1_ps(bias);
    const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int h = 0; h < 2; ++h) {
      for (int e = 0; e < 2; ++e) {
        const __m128i part = e ? _mm_srli_si128(halves[h], 8) : halves[h];
        const __m256i ints = T == QType::kQ8_0 ? _mm256_cvtepi8_epi32(part) : _mm256_cvtepu8_epi32(part);
        _mm256_storeu_ps(y + 32 * b + 16 * h + 8 * e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), vd, vb));
      }
    }
  }
}

#endif

#if LOOMLM_X86
// 32 quant bytes (unsigned) -> 32 floats scale * q - offset, 8 at a time. scale * q is exact (an fp16
// scale times a 6-bit sub-scale times a 6-bit quant: < 24 significant bits) and fmsub rounds once,
// as dequantize_row's product-then-subtract: bit for bit.
LOOMLM_AVX2 inline void store_scaled32(__m256i q, float scale, float offset, float* y) {
  const __m256 vs = _mm256_set1_ps(scale), vo = _mm256_set1_ps(offset);
  const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
  for (int h = 0; h < 2; ++h) {
    for (int e = 0; e < 2; ++e) {
      const __m128i part = e ? _mm_srli_si128(halves[h], 8) : halves[h];
      const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
      _mm256_storeu_ps(y + 16 * h + 8 * e, _mm256_fmsub_ps(vs, qf, vo));
    }
  }
}

// K-quant super-blocks -> floats (the float path's dequantizer): the quants decoded as vec_avx2_k
// does, the formulas of dequantize_row. Q6_K: d * sc[g] * (q - 32) per 16 elements, written as
// (d * sc) * q - (d * sc) * 32, both products exact, one rounding.
template <QType T>
LOOMLM_AVX2 void dequantize_row_avx2_k(const uint8_t* w, int64_t num_blocks, float* y) {
  constexpr int64_t bytes = T == QType::kQ4_K ? 144 : T == QType::kQ5_K ? 176 : 210;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const uint8_t* blk = w + b * bytes;
    float* out = y + 256 * b;
    if constexpr (T == QType::kQ6_K) {
      const float d = fp16_at_f16c(blk + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      for (int h = 0; h < 2; ++h) {
        __m256i q[4];
        q6k_quants(blk, h, q);
        for (int g = 0; g < 4; ++g) {
          // Elements 128h + 32g ...: the first 16 take sc[8h + 2g], the next 16 sc[8h + 2g + 1].
          alignas(32) float tmp[32];
          const float s0 = d * static_cast<float>(sc[8 * h + 2 * g]), s1 = d * static_cast<float>(sc[8 * h + 2 * g + 1]);
          store_scaled32(q[g], 1.f, 0.f, tmp);  // the quants as floats (exact)
          for (int e = 0; e < 32; e += 8) {
            const float s = e < 16 ? s0 : s1;
            const __m256 v = _mm256_sub_ps(_mm256_load_ps(tmp + e), _mm256_set1_ps(32.f));  // q - 32, exact
            _mm256_storeu_ps(out + 128 * h + 32 * g + e, _mm256_mul_ps(_mm256_set1_ps(s), v));
          }
        }
      }
    } else {
      const float d = fp16_at_f16c(blk), dmin = fp16_at_f16c(blk + 2);
      uint8_t sc[8], mn[8];
      k4_scale_min(blk + 4, sc, mn);
      for (int c = 0; c < 4; ++c) {
        __m256i lo, hi;
        k45_quants<T>(blk, c, lo, hi);
        const int j = 2 * c;
        store_scaled32(lo, d * static_cast<float>(sc[j]), dmin * static_cast<float>(mn[j]), out + 32 * j);
        store_scaled32(hi, d * static_cast<float>(sc[j + 1]), dmin * static_cast<float>(mn[j + 1]),
                       out + 32 * (j + 1));
      }
    }
  }
}
#endif

constexpr int kMaxGroupRows = 4;  // activation rows sharing one read of a weight block
constexpr int64_t kPanelRows = 16;  // weight rows a task keeps hot while it walks all row groups

// Ordered: each ISA's CPUs run the kernels of the ones before it.
enum class Isa { kScalar, kAvx2, kAvx512 };

Isa best_isa() {
#if defined(LOOMLM_SIMDE)
  return Isa::kAvx512;  // emulated: runs on any CPU
#elif LOOMLM_X86
  static const Isa isa = !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c"))
                             ? Isa::kScalar
                         : __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? Isa::kAvx512
                                                                                                   : Isa::kAvx2;
  return isa;
#else
  return Isa::kScalar;
#endif
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") {
    TORCH_CHECK(best_isa() >= Isa::kAvx2, "quant_gemm: this CPU has no AVX2+FMA+F16C");
    return Isa::kAvx2;
  }
  if (name == "avx512bw") {
    TORCH_CHECK(best_isa() == Isa::kAvx512, "quant_gemm: this CPU has no AVX-512F+AVX-512BW");
    return Isa::kAvx512;
  }
  TORCH_CHECK(false, "quant_gemm: unknown isa '", name, "' (auto, avx512bw, avx2, scalar)");
}

// A row-group kernel over `wrows` weight rows at a time: out[wr * rows + r].
using TileDot = void (*)(const uint8_t* w, int64_t row_bytes, const uint8_t* const* xs, int64_t num_blocks,
                         float* out);
struct Kernel {
  TileDot fn;
  int wrows;
};

// One weight row (WR = 1) through a VecDot.
template <VecDot F>
void one_row(const uint8_t* w, int64_t, const uint8_t* const* xs, int64_t num_blocks, float* out) {
  F(w, xs, num_blocks, out);
}

// W16: 16-bit activations (32-element blocks only).
template <QType T, bool W16>
Kernel pick_for(Isa isa, int rows, bool full_tile) {
#if LOOMLM_X86
  if (isa == Isa::kAvx512) {
    if constexpr (is_k_quant(T)) {
      constexpr TileDot k[] = {one_row<vec_avx512_k<T, 1>>, one_row<vec_avx512_k<T, 2>>,
                               one_row<vec_avx512_k<T, 3>>, one_row<vec_avx512_k<T, 4>>};
      return {k[rows - 1], 1};
    } else {
      // 4 weight rows for every group size: at most 16 accumulators of 32 registers.
      constexpr TileDot wide[] = {tile_avx512_32<T, 4, 1, W16>, tile_avx512_32<T, 4, 2, W16>,
                                  tile_avx512_32<T, 4, 3, W16>, tile_avx512_32<T, 4, 4, W16>};
      constexpr TileDot narrow[] = {tile_avx512_32<T, 1, 1, W16>, tile_avx512_32<T, 1, 2, W16>,
                                    tile_avx512_32<T, 1, 3, W16>, tile_avx512_32<T, 1, 4, W16>};
      if (!full_tile) return {narrow[rows - 1], 1};
      return {wide[rows - 1], 4};
    }
  }
  if (isa == Isa::kAvx2) {
    if constexpr (is_k_quant(T)) {
      constexpr TileDot k[] = {one_row<vec_avx2_k<T, 1>>, one_row<vec_avx2_k<T, 2>>, one_row<vec_avx2_k<T, 3>>,
                               one_row<vec_avx2_k<T, 4>>};
      return {k[rows - 1], 1};
    } else {
      // 4 weight rows for 1-2 activation rows, 2 for 3-4: at most 8 accumulators of 16 registers.
      constexpr TileDot wide[] = {tile_avx2_32<T, 4, 1, W16>, tile_avx2_32<T, 4, 2, W16>,
                                  tile_avx2_32<T, 2, 3, W16>, tile_avx2_32<T, 2, 4, W16>};
      constexpr TileDot narrow[] = {tile_avx2_32<T, 1, 1, W16>, tile_avx2_32<T, 1, 2, W16>,
                                    tile_avx2_32<T, 1, 3, W16>, tile_avx2_32<T, 1, 4, W16>};
      if (!full_tile) return {narrow[rows - 1], 1};
      return {wide[rows - 1], rows <= 2 ? 4 : 2};
    }
  }
#endif
  using XB = std::conditional_t<W16, XBlock16, XBlock32>;
  constexpr TileDot k[] = {one_row<vec_scalar<T, 1, XB>>, one_row<vec_scalar<T, 2, XB>>,
                           one_row<vec_scalar<T, 3, XB>>, one_row<vec_scalar<T, 4, XB>>};
  return {k[rows - 1], 1};
}

template <bool W16>
Kernel pick_width(QType t, Isa isa, int rows, bool full_tile) {
  switch (t) {
    case QType::kQ4_0: return pick_for<QType::kQ4_0, W16>(isa, rows, full_tile);
    case QType::kQ4_1: return pick_for<QType::kQ4_1, W16>(isa, rows, full_tile);
    case QType::kQ5_0: return pick_for<QType::kQ5_0, W16>(isa, rows, full_tile);
    case QType::kQ8_0: return pick_for<QType::kQ8_0, W16>(isa, rows, full_tile);
    case QType::kQ4_K: return pick_for<QType::kQ4_K, false>(isa, rows, full_tile);
    case QType::kQ5_K: return pick_for<QType::kQ5_K, false>(isa, rows, full_tile);
    case QType::kQ6_K: return pick_for<QType::kQ6_K, false>(isa, rows, full_tile);
  }
  TORCH_CHECK(false, "quant_gemm: unreachable qtype");
}

Kernel pick(QType t, Isa isa, int rows, bool full_tile, bool w16) {
  return w16 ? pick_width<true>(t, isa, rows, full_tile) : pick_width<false>(t, isa, rows, full_tile);
}

using DequantRow = void (*)(const uint8_t* w, int64_t num_blocks, float* y);

DequantRow pick_dequant(QType t) {
  switch (t) {
    case QType::kQ4_0: return dequantize_row<QType::kQ4_0>;
    case QType::kQ4_1: return dequantize_row<QType::kQ4_1>;
    case QType::kQ5_0: return dequantize_row<QType::kQ5_0>;
    case QType::kQ8_0: return dequantize_row<QType::kQ8_0>;
    case QType::kQ4_K: return dequantize_row<QType::kQ4_K>;
    case QType::kQ5_K: return dequantize_row<QType::kQ5_K>;
    case QType::kQ6_K: return dequantize_row<QType::kQ6_K>;
  }
  TORCH_CHECK(false, "quant_dequantize: unreachable qtype");
}

// The dequantizer of the float path: AVX2 where the CPU has it (bit for bit the scalar one, but for
// Q4_1's + m: <= 1 ulp), else the scalar one.
DequantRow pick_dequant_fast(QType t, Isa isa) {
#if LOOMLM_X86
  if (isa >= Isa::kAvx2) {
    switch (t) {
      case QType::kQ4_0: return dequantize_row_avx2<QType::kQ4_0>;
      case QType::kQ4_1: return dequantize_row_avx2<QType::kQ4_1>;
      case QType::kQ5_0: return dequantize_row_avx2<QType::kQ5_0>;
      case QType::kQ8_0: return dequantize_row_avx2<QType::kQ8_0>;
      case QType::kQ4_K: return dequantize_row_avx2_k<QType::kQ4_K>;
      case QType::kQ5_K: return dequantize_row_avx2_k<QType::kQ5_K>;
      case QType::kQ6_K: return dequantize_row_avx2_k<QType::kQ6_K>;
    }
  }
#endif
  return pick_dequant(t);
}

// rows: kPanel dequantized weight rows [16][K] -> panel [K][16] (float_tile.h's layout), K % 8 == 0.
void rows_to_panel_scalar(const float* rows, int64_t K, float* panel) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < loomlm::kPanel; ++j) panel[k * loomlm::kPanel + j] = rows[j * K + k];
}

#if LOOMLM_X86
// The same in 8 x 8 blocks: 8 row loads, the standard unpack / shuffle / permute transpose, 8 stores.
LOOMLM_AVX2 void rows_to_panel_avx2(const float* rows, int64_t K, float* panel) {
  for (int64_t jb = 0; jb < loomlm::kPanel; jb += 8) {
    for (int64_t k = 0; k < K; k += 8) {
      __m256 r[8], t[8], u[8];
      for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(rows + (jb + j) * K + k);
      for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
      }
      for (int j = 0; j < 8; j += 4) {
        u[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
        u[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
        u[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
        u[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
      }
      float* out = panel + k * loomlm::kPanel + jb;
      for (int e = 0; e < 4; ++e) {
        _mm256_storeu_ps(out + e * loomlm::kPanel, _mm256_permute2f128_ps(u[e], u[e + 4], 0x20));
        _mm256_storeu_ps(out + (e + 4) * loomlm::kPanel, _mm256_permute2f128_ps(u[e], u[e + 4], 0x31));
      }
    }
  }
}
#endif

// The float path (many rows: prefill, large batches): each task dequantizes one panel of 16 weight rows at a time
// and transposes it into float_tile.h's [K][16] layout, where the outer-product micro-kernel meets
// every activation row in tiles of 6 (the float method's kernel: no horizontal sums, 2 weight loads
// per 12 FMAs), so the dequantization and the transpose are paid once per 16 columns for all rows.
void panel_gemm(const float* xp, int64_t ldx, int64_t M, int64_t K, const uint8_t* wp, int64_t row_bytes,
                int64_t num_blocks, int64_t n, const float* bias, DequantRow dequant, Isa isa, float* yp) {
  using loomlm::kMaxTileRows;
  using loomlm::kPanel;
  const int64_t panels = (n + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> rows(static_cast<size_t>(kPanel * K)), panel(static_cast<size_t>(kPanel * K));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t col0 = p * kPanel, cols = std::min(kPanel, n - col0);
      for (int64_t j = 0; j < cols; ++j) dequant(wp + (col0 + j) * row_bytes, num_blocks, rows.data() + j * K);
      std::fill(rows.begin() + cols * K, rows.end(), 0.f);
#if LOOMLM_X86
      if (isa >= Isa::kAvx2) {
        rows_to_panel_avx2(rows.data(), K, panel.data());
      } else
#endif
      {
        rows_to_panel_scalar(rows.data(), K, panel.data());
      }
      const float* b = bias ? bias + col0 : nullptr;
      for (int64_t m = 0; m < M; m += kMaxTileRows) {
        const int r = static_cast<int>(std::min<int64_t>(kMaxTileRows, M - m));
#if LOOMLM_X86
        if (isa >= Isa::kAvx2) {
          loomlm::tile_avx2_rows(xp + m * ldx, ldx, r, panel.data(), K, yp + m * n + col0, n, cols, b, nullptr);
          continue;
        }
#endif
        loomlm::tile_scalar(xp + m * ldx, ldx, r, panel.data(), K, yp + m * n + col0, n, cols, b);
      }
    }
  });
}

// Checks w against K and returns the number of blocks per row.
int64_t check_weight(const at::Tensor& w, const QFormat& f, int64_t k, const char* fn) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte, fn, ": w must be a uint8 CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), fn, ": w must be a contiguous [N, row_bytes] tensor");
  TORCH_CHECK(k > 0 && k % f.block == 0, fn, ": K=", k, " is not a positive multiple of the ", f.name,
              " block size ", f.block);
  const int64_t num_blocks = k / f.block;
  TORCH_CHECK(w.size(1) == num_blocks * f.bytes, fn, ": w has ", w.size(1), " bytes per row, but K=", k, " in ",
              f.name, " takes ", num_blocks * f.bytes, " (", num_blocks, " blocks of ", f.bytes, " bytes)");
  return num_blocks;
}

}  // namespace

// x: [M, K] float32 (rows contiguous), w: [N, row_bytes] uint8 GGUF blocks (row n = output feature n),
// bias: [N] or None. Returns y [M, N] float32 = x @ dequant(w).T (+ bias), with x quantized to 8 bits
// per block. isa: "auto" (the CPU's best), "avx512bw", "avx2" or "scalar" (tests compare them).
// activation_planes 2: the precision of two 8-bit planes. K-quants: each activation row is quantized
// twice, x ~ d1 q1 + d2 q2 with q2 the 8-bit code of the residual x - d1 q1, and both planes run as
// rows of one group (each weight block read once for both): the activation error shrinks from d1 / 2
// to d2 / 2 <= d1 / 254 per element, for twice the integer work. 32-element blocks: one 16-bit
// plane (XBlock16), error <= max|x| / 65534 <= d1 / 516, for the integer work of one 8-bit plane.
// 1: llama.cpp's single 8-bit plane.
at::Tensor quant_gemm(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n,
                      const c10::optional<at::Tensor>& bias, const std::string& isa_name, int64_t activation_planes,
                      int64_t float_rows) {
  TORCH_CHECK(activation_planes == 1 || activation_planes == 2, "quant_gemm: activation_planes must be 1 or 2");
  const QFormat& f = find_format(qtype, "quant_gemm");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "quant_gemm: x must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quant_gemm: x must be [M, K] with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t num_blocks = check_weight(w, f, K, "quant_gemm");
  TORCH_CHECK(w.size(0) == n, "quant_gemm: w has ", w.size(0), " rows, but n=", n);
  const float* bias_ptr = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat, "quant_gemm: bias must be float32 CPU");
    TORCH_CHECK(bias->numel() == n, "quant_gemm: bias has ", bias->numel(), " elements, expected ", n);
    bias_c = bias->contiguous();
    bias_ptr = bias_c.data_ptr<float>();
  }
  const Isa isa = parse_isa(isa_name);
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return y;

  if (float_rows > 0 && M >= float_rows) {
    panel_gemm(x.data_ptr<float>(), x.stride(0), M, K, w.data_ptr<uint8_t>(), w.size(1), num_blocks, n, bias_ptr,
               pick_dequant_fast(f.type, isa), isa, y.data_ptr<float>());
    return y;
  }

  // Quantize every activation row once (per plane): virtual row P * m + p is plane p of row m.
  const bool k_quant = is_k_quant(f.type);
  const bool w16 = activation_planes == 2 && !k_quant;  // one 16-bit plane in place of two 8-bit ones
  const int64_t P = w16 ? 1 : activation_planes, R = M * P;
  const int64_t xrow_bytes = num_blocks * static_cast<int64_t>(k_quant ? sizeof(XBlock256)
                                                               : w16   ? sizeof(XBlock16)
                                                                       : sizeof(XBlock32));
  std::vector<uint8_t> xq(static_cast<size_t>(R * xrow_bytes));
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    std::vector<float> residual(P > 1 ? K : 0);
    for (int64_t m = m0; m < m1; ++m) {
      uint8_t* dst = xq.data() + P * m * xrow_bytes;
      const float* row = xp + m * ldx;
      if (w16) {
        quantize_row_32(row, num_blocks, reinterpret_cast<XBlock16*>(dst));
      } else if (k_quant) {
        auto* blocks = reinterpret_cast<XBlock256*>(dst);
        quantize_row_256(row, num_blocks, blocks);
        if (P == 1) continue;
        for (int64_t i = 0; i < K; ++i) residual[i] = row[i] - blocks[i / 256].d * blocks[i / 256].q[i % 256];
        quantize_row_256(residual.data(), num_blocks, reinterpret_cast<XBlock256*>(dst + xrow_bytes));
      } else {
        auto* blocks = reinterpret_cast<XBlock32*>(dst);
        quantize_row_32(row, num_blocks, blocks);
        if (P == 1) continue;
        for (int64_t i = 0; i < K; ++i) residual[i] = row[i] - blocks[i / 32].d * blocks[i / 32].q[i % 32];
        quantize_row_32(residual.data(), num_blocks, reinterpret_cast<XBlock32*>(dst + xrow_bytes));
      }
    }
  });

  Kernel tiles[kMaxGroupRows], singles[kMaxGroupRows];  // WR rows at a time; one row for a panel's tail
  for (int r = 0; r < kMaxGroupRows; ++r) {
    tiles[r] = pick(f.type, isa, r + 1, true, w16);
    singles[r] = pick(f.type, isa, r + 1, false, w16);
  }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.size(1);
  // One plane: straight into y with the bias. Two: the planes' products, summed into y below.
  std::vector<float> planes(P > 1 ? R * n : 0);
  float* yp = P > 1 ? planes.data() : y.data_ptr<float>();
  const float* row_bias = P > 1 ? nullptr : bias_ptr;
  // >= 16 weight rows per task, more when a row is little work (~32K multiply-adds per task).
  const int64_t grain = std::max<int64_t>(kPanelRows, 32768 / (R * K) + 1);
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
    const uint8_t* xs[kMaxGroupRows];
    float out[4 * kMaxGroupRows];
    for (int64_t p0 = n0; p0 < n1; p0 += kPanelRows) {
      const int64_t p1 = std::min(n1, p0 + kPanelRows);
      for (int64_t m = 0; m < R; m += kMaxGroupRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxGroupRows, R - m));
        for (int r = 0; r < rows; ++r) xs[r] = xq.data() + (m + r) * xrow_bytes;
        for (int64_t j = p0; j < p1;) {
          const Kernel k = j + tiles[rows - 1].wrows <= p1 ? tiles[rows - 1] : singles[rows - 1];
          k.fn(wp + j * row_bytes, row_bytes, xs, num_blocks, out);
          for (int i = 0; i < k.wrows; ++i, ++j) {
            const float b = row_bias ? row_bias[j] : 0.f;
            for (int r = 0; r < rows; ++r) yp[(m + r) * n + j] = out[i * rows + r] + b;
          }
        }
      }
    }
  });
  if (P > 1) {
    float* out = y.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      const float* first = yp + 2 * m * n;
      const float* second = first + n;
      for (int64_t j = 0; j < n; ++j) out[m * n + j] = first[j] + second[j] + (bias_ptr ? bias_ptr[j] : 0.f);
    }
  }
  return y;
}

// w: [N, row_bytes] uint8 GGUF blocks -> [N, k] float32. isa "scalar" (the default): equal to
// gguf.quants.dequantize bit for bit. "avx2" / "avx512bw" / "auto": the float path's dequantizer, the same bits but
// for Q4_1 (<= 1 ulp, see dequantize_row_avx2).
at::Tensor quant_dequantize(const at::Tensor& w, int64_t qtype, int64_t k, const std::string& isa_name) {
  const QFormat& f = find_format(qtype, "quant_dequantize");
  const int64_t num_blocks = check_weight(w, f, k, "quant_dequantize");
  const int64_t N = w.size(0), row_bytes = w.size(1);
  at::Tensor y = at::empty({N, k}, at::TensorOptions().dtype(at::kFloat));
  const DequantRow row_fn = pick_dequant_fast(f.type, parse_isa(isa_name));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / k), [&](int64_t n0, int64_t n1) {
    for (int64_t j = n0; j < n1; ++j) row_fn(wp + j * row_bytes, num_blocks, yp + j * k);
  });
  return y;
}

std::string quant_isa() {
  const Isa isa = best_isa();
  return isa == Isa::kAvx512 ? "avx512bw" : isa == Isa::kAvx2 ? "avx2" : "scalar";
}

void register_quant(pybind11::module& m) {
  // As the other kernels: no Python object touched, so no GIL held (see paged_decode_cpu.cpp).
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("quant_gemm", &quant_gemm, "x [M, K] @ dequant(GGUF blocks w [N, row_bytes]).T (+ bias) -> [M, N] (CPU)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("qtype"), pybind11::arg("n"),
        pybind11::arg("bias") = pybind11::none(), pybind11::arg("isa") = "auto", pybind11::arg("activation_planes") = 1,
        pybind11::arg("float_rows") = 0, no_gil);
  m.def("quant_dequantize", &quant_dequantize, "GGUF blocks w [N, row_bytes] -> float32 [N, k] (CPU)",
        pybind11::arg("w"), pybind11::arg("qtype"), pybind11::arg("k"), pybind11::arg("isa") = "scalar", no_gil);
  m.def("quant_isa", &quant_isa, "the instruction set quant_gemm uses on this CPU (avx512bw, avx2 or scalar)");
}
