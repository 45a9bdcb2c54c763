// Paged decode attention for CPU: each query token attends to its context read in place
// from the block pool (no gathered copy), one pass over K and one over V.
// Layout as loomlm.layers.attention: pool [num_kv_heads, num_blocks, block_size, head_dim].
// Work item = (sequence, kv head): its G query heads share every K/V row they read.
// Optional per call: a sliding window (only the last `window` positions are read) and an
// attention-logit soft cap (cap * tanh(score / cap) on the scaled scores), as a layer of Gemma 2.
// Head sizes 64 and 128 run `attend_vec` (explicit vectors); others `attend_generic`.
#include <torch/extension.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

struct Problem {
  const float* q;             // [S, H, D]
  const float* k;             // [KVH, NB, BS, D]
  const float* v;
  const int64_t* tables;      // [S, max_blocks]
  const int64_t* lens;        // [S]
  float* out;                 // [S, H, D]
  int64_t H, D, NB, BS, G, max_blocks;
  float scale;
  int64_t window;             // > 0: attend only the last `window` positions; 0: the whole context
  float soft_cap;             // > 0: scores <- soft_cap * tanh(scores / soft_cap); 0: none
};

// The first context position sequence s attends. transformers' sliding_window_overlay keeps
// kv_idx > q_idx - window (masking_utils.py); the query sits at context_len - 1.
inline int64_t first_attended(const Problem& p, int64_t context_len) {
  return p.window > 0 && context_len > p.window ? context_len - p.window : 0;
}

// Gemma 2's soft cap on scores [G, L] and their row maxes mx [G] (transformers' eager_attention_forward
// in modeling_gemma2.py: after scaling, before the softmax). tanh is increasing, so the capped max
// is still each row's max, bit for bit.
void soft_cap_rows(float* __restrict scores, float* mx, int64_t G, int64_t L, float cap) {
  for (int64_t i = 0; i < G * L; ++i) scores[i] = cap * std::tanh(scores[i] / cap);
  for (int64_t g = 0; g < G; ++g) mx[g] = cap * std::tanh(mx[g] / cap);
}

// scores [G, L] -> their exponentials exp(score - max); inv_sum [G] = 1 / their row sums.
void softmax_rows(float* __restrict scores, const float* mx, float* inv_sum, int64_t G, int64_t L) {
  for (int64_t g = 0; g < G; ++g) {
    float* __restrict sg = scores + g * L;
    const float m = mx[g];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < L; ++t) {
      sg[t] = loomlm::exp_nonpositive(sg[t] - m);
      sum += sg[t];
    }
    inv_sum[g] = 1.f / sum;
  }
}

// The G scores of one K row (scores[g * L] for each query head g), folded into the running max.
inline void score_row(const float* __restrict qs, const float* __restrict krow, int64_t D, int64_t G,
                      float* scores, int64_t L, float* mx) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = qs + g * D;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += qg[d] * krow[d];
    scores[g * L] = dot;
    mx[g] = dot > mx[g] ? dot : mx[g];
  }
}

// Any head size and block size: one dot product per (row, query head).
void attend_generic(const Problem& p, int64_t s, int64_t kh, std::vector<float>& buffer) {
  const int64_t D = p.D;
  const int64_t end = p.lens[s], start = first_attended(p, end), G = p.G, BS = p.BS;
  const int64_t L = end - start;             // positions attended: [start, end)
  buffer.resize(G * L + 2 * G * D + 2 * G);
  float* __restrict scores = buffer.data();  // [G, L]
  float* __restrict qs = scores + G * L;     // [G, D]: its G query heads, pre-scaled
  float* __restrict acc = qs + G * D;        // [G, D]: output accumulators
  float* __restrict mx = acc + G * D;        // [G]: running max score
  float* __restrict inv_sum = mx + G;        // [G]: 1 / softmax denominator
  const float* q = p.q + (s * p.H + kh * G) * D;
  for (int64_t i = 0; i < G * D; ++i) {
    qs[i] = q[i] * p.scale;
    acc[i] = 0.f;
  }
  const int64_t* table = p.tables + s * p.max_blocks;
  for (int64_t g = 0; g < G; ++g) mx[g] = -std::numeric_limits<float>::infinity();
  // block by block (a block's rows are contiguous); position t0 + j is score column t0 + j - start
  for (int64_t t0 = start - start % BS; t0 < end; t0 += BS) {
    const float* __restrict kblock = p.k + (kh * p.NB + table[t0 / BS]) * BS * D;
    const int64_t n = end - t0 < BS ? end - t0 : BS;
    for (int64_t j = t0 < start ? start - t0 : 0; j < n; ++j) {
      score_row(qs, kblock + j * D, D, G, scores + t0 + j - start, L, mx);
    }
  }
  if (p.soft_cap > 0.f) soft_cap_rows(scores, mx, G, L, p.soft_cap);
  softmax_rows(scores, mx, inv_sum, G, L);
  for (int64_t t0 = start - start % BS; t0 < end; t0 += BS) {
    const float* __restrict vblock = p.v + (kh * p.NB + table[t0 / BS]) * BS * D;
    const int64_t n = end - t0 < BS ? end - t0 : BS;
    for (int64_t j = t0 < start ? start - t0 : 0; j < n; ++j) {
      const float* __restrict vrow = vblock + j * D;
      for (int64_t g = 0; g < G; ++g) {
        const float w = scores[g * L + t0 + j - start];
        float* __restrict ag = acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] += w * vrow[d];
      }
    }
  }
  float* out = p.out + (s * p.H + kh * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv_sum[g];
  }
}


// Head sizes that are a multiple of 16 (kVecs vectors of 16 floats) and block sizes that are a
// multiple of 4. GCC/Clang vector types lower to whatever the target has (two AVX2 registers or
// one AVX-512 register per vector). Scores of four rows at a time, reduced together (`sum4`),
// and output accumulators held in registers across the whole V pass.
typedef float vec16 __attribute__((vector_size(64)));

inline vec16 load16(const float* ptr) {
  vec16 v;
  std::memcpy(&v, ptr, sizeof(v));
  return v;
}

inline void store16(float* ptr, vec16 v) { std::memcpy(ptr, &v, sizeof(v)); }

// The sums of the lanes of a, b, c and d, in lanes 0..3 of the result (12 shuffles, 6 adds
// instead of four separate horizontal sums).
inline vec16 sum4(vec16 a, vec16 b, vec16 c, vec16 d) {
  const vec16 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vec16 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // [a | b | c | d], four partial sums each
  const vec16 quads = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                      __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  // lanes 0..7: [a | b | c | d], two partial sums each
  const vec16 pairs = __builtin_shufflevector(quads, quads, 0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13) +
                      __builtin_shufflevector(quads, quads, 2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(pairs, pairs, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6) +
         __builtin_shufflevector(pairs, pairs, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7);
}

inline void prefetch_block(const float* block, int64_t num_floats) {
  for (int64_t i = 0; i < num_floats; i += 16) __builtin_prefetch(block + i);  // one 64-byte line each
}

template <int kVecs>
void attend_vec(const Problem& p, int64_t s, int64_t kh, std::vector<float>& buffer) {
  constexpr int64_t D = 16 * kVecs;
  const int64_t end = p.lens[s], start = first_attended(p, end), G = p.G, BS = p.BS;
  const int64_t L = end - start;             // positions attended: [start, end), score column t - start
  buffer.resize(G * L + G * D + 2 * G);
  float* __restrict scores = buffer.data();  // [G, L]
  float* __restrict qs = scores + G * L;     // [G, D]: its G query heads, pre-scaled
  float* __restrict mx = qs + G * D;         // [G]: max score
  float* __restrict inv_sum = mx + G;        // [G]: 1 / softmax denominator
  const float* q = p.q + (s * p.H + kh * G) * D;
  for (int64_t i = 0; i < G * D; ++i) qs[i] = q[i] * p.scale;
  for (int64_t g = 0; g < G; ++g) mx[g] = -std::numeric_limits<float>::infinity();
  const int64_t* table = p.tables + s * p.max_blocks;
  const int64_t first_block = start / BS, num_blocks = (end + BS - 1) / BS;
  const int64_t head_base = kh * p.NB;
  for (int64_t b = first_block; b < num_blocks; ++b) {
    const int64_t t0 = b * BS;
    const float* kblock = p.k + (head_base + table[b]) * BS * D;
    if (b + 1 < num_blocks) prefetch_block(p.k + (head_base + table[b + 1]) * BS * D, BS * D);
    const int64_t n = end - t0 < BS ? end - t0 : BS;
    int64_t j = t0 < start ? start - t0 : 0;  // a window may start mid-block (loads are unaligned anyway)
    for (; j + 4 <= n; j += 4) {
      const float* rows = kblock + j * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qs + g * D;
        vec16 d0 = {}, d1 = {}, d2 = {}, d3 = {};
#pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) {
          const vec16 qv = load16(qg + 16 * v);
          d0 += qv * load16(rows + 16 * v);
          d1 += qv * load16(rows + D + 16 * v);
          d2 += qv * load16(rows + 2 * D + 16 * v);
          d3 += qv * load16(rows + 3 * D + 16 * v);
        }
        const vec16 dots = sum4(d0, d1, d2, d3);
        float* dst = scores + g * L + t0 + j - start;
        for (int i = 0; i < 4; ++i) {
          dst[i] = dots[i];
          mx[g] = dots[i] > mx[g] ? dots[i] : mx[g];
        }
      }
    }
    for (; j < n; ++j) score_row(qs, kblock + j * D, D, G, scores + t0 + j - start, L, mx);  // the last block's tail
  }
  if (p.soft_cap > 0.f) soft_cap_rows(scores, mx, G, L, p.soft_cap);
  softmax_rows(scores, mx, inv_sum, G, L);
  float* out = p.out + (s * p.H + kh * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    const float* wg = scores + g * L;
    vec16 even[kVecs] = {}, odd[kVecs] = {};  // two accumulator sets: two rows in flight
    for (int64_t b = first_block; b < num_blocks; ++b) {
      const int64_t t0 = b * BS;
      const float* vblock = p.v + (head_base + table[b]) * BS * D;
      if (g == 0 && b + 1 < num_blocks) prefetch_block(p.v + (head_base + table[b + 1]) * BS * D, BS * D);
      const int64_t n = end - t0 < BS ? end - t0 : BS;
      int64_t j = t0 < start ? start - t0 : 0;
      for (; j + 2 <= n; j += 2) {
        const float w0 = wg[t0 - start + j], w1 = wg[t0 - start + j + 1];
#pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) {
          even[v] += w0 * load16(vblock + j * D + 16 * v);
          odd[v] += w1 * load16(vblock + (j + 1) * D + 16 * v);
        }
      }
      if (j < n) {
        const float w0 = wg[t0 - start + j];
#pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) even[v] += w0 * load16(vblock + j * D + 16 * v);
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) store16(out + g * D + 16 * v, (even[v] + odd[v]) * inv_sum[g]);
  }
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q,             // [S, H, D] float32
                                     torch::Tensor k_cache,       // [KVH, NB, BS, D] float32
                                     torch::Tensor v_cache,       // [KVH, NB, BS, D] float32
                                     torch::Tensor block_tables,  // [S, max_blocks] int64
                                     torch::Tensor context_lens,  // [S] int64
                                     double scale,
                                     int64_t window,              // > 0: attend the last `window` positions only
                                     double soft_cap) {           // > 0: cap * tanh(score / cap); 0: none
  TORCH_CHECK(window >= 0 && soft_cap >= 0, "paged_decode_attention: window and soft_cap must be >= 0 (0 = none)");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32 &&
              v_cache.scalar_type() == torch::kFloat32, "paged_decode_attention: float32 only");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt64 && context_lens.scalar_type() == torch::kInt64,
              "paged_decode_attention: int64 block tables and context lengths");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              block_tables.is_contiguous() && context_lens.is_contiguous(), "contiguous inputs expected");
  const int64_t S = q.size(0), KVH = k_cache.size(0);
  auto out = torch::empty_like(q);
  Problem p{q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
            block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), out.data_ptr<float>(),
            q.size(1), q.size(2), k_cache.size(1), k_cache.size(2), q.size(1) / KVH, block_tables.size(1),
            static_cast<float>(scale), window, static_cast<float>(soft_cap)};
#pragma omp parallel
  {
    std::vector<float> buffer;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t kh = 0; kh < KVH; ++kh) {
        if (p.BS % 4 == 0 && p.D == 64) {
          attend_vec<4>(p, s, kh, buffer);
        } else if (p.BS % 4 == 0 && p.D == 128) {
          attend_vec<8>(p, s, kh, buffer);
        } else {
          attend_generic(p, s, kh, buffer);
        }
      }
    }
  }
  return out;
}

// fused_ops_cpu.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, int64_t head_dim);
at::Tensor argmax_rows(const at::Tensor& x);
// gemm_cpu.cpp
at::Tensor pack_f32(const at::Tensor& weight_t);
at::Tensor gemm_f32(const at::Tensor& x, const at::Tensor& packed, int64_t n, const c10::optional<at::Tensor>& bias,
                    const std::string& isa_name, int64_t large_m);
std::string gemm_isa();
// quant_cpu.cpp
at::Tensor quant_gemm(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n,
                      const c10::optional<at::Tensor>& bias, const std::string& isa_name);
at::Tensor quant_dequantize(const at::Tensor& w, int64_t qtype, int64_t k);
std::string quant_isa();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object: they run without the GIL, so that the server's event loop
  // (and every other Python thread) keeps running while a step is in a kernel, as torch's own ops do.
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, float32)", no_gil);
  m.def("rms_norm", &rms_norm, "RMSNorm of each row (CPU, float32)", no_gil);
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x; x = rms_norm(residual), in place (CPU, float32)", no_gil);
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up of a fused gate+up projection (CPU, float32)", no_gil);
  m.def("rotary_", &rotary_, "rotate-half RoPE in place on the leading heads of each row (CPU, float32)", no_gil);
  m.def("argmax_rows", &argmax_rows, "torch.argmax(x, dim=-1) of [R, V] rows (CPU, float32)", no_gil);
  m.def("pack_f32", &pack_f32, "pack a [K, N] weight into [ceil(N/16), K, 16] panels (CPU, float32)", no_gil);
  m.def("gemm_f32", &gemm_f32, "x [M, K] @ packed weight (+ bias) -> [M, N] (CPU, float32)", pybind11::arg("x"),
        pybind11::arg("packed"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("isa") = "auto", pybind11::arg("large_m") = 0, no_gil);
  m.def("gemm_isa", &gemm_isa, "the instruction set gemm_f32 uses on this CPU (avx2 or scalar)");
  m.def("quant_gemm", &quant_gemm, "x [M, K] @ dequant(GGUF blocks w [N, row_bytes]).T (+ bias) -> [M, N] (CPU)",
        pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("qtype"), pybind11::arg("n"),
        pybind11::arg("bias") = pybind11::none(), pybind11::arg("isa") = "auto", no_gil);
  m.def("quant_dequantize", &quant_dequantize, "GGUF blocks w [N, row_bytes] -> float32 [N, k] (CPU)",
        pybind11::arg("w"), pybind11::arg("qtype"), pybind11::arg("k"), no_gil);
  m.def("quant_isa", &quant_isa, "the instruction set quant_gemm uses on this CPU (avx2 or scalar)");
}
