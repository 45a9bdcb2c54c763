// Paged decode attention for CPU: each query token attends to its context read in place
// from the block pool (no gathered copy), one pass over K and one over V.
// Layout as loomlm.layers.attention: pool [num_kv_heads, num_blocks, block_size, head_dim].
// Work item = (sequence, kv head): its G query heads share every K/V row they read.
// Optional per call: a sliding window (only the last `window` positions are read) and an
// attention-logit soft cap (cap * tanh(score / cap) on the scaled scores), as a layer of Gemma 2.
// Head sizes 64, 128 and 256 run `attend_vec` (explicit vectors); others `attend_generic`.
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


// Head sizes 64, 128 and 256 with block sizes that are a multiple of 4. Vectors of 8 floats (GCC/
// Clang vector types: one AVX2 register, or the low half of an AVX-512 one); a 16-float type
// was lowered through the stack on AVX2 hosts (GCC splits vectors wider than the target's and
// spilled them: ~140 ns per context row on an AMD EPYC, 10x this version).
// K pass: the scores of four rows at a time per query head, reduced together (`sum4`).
// V pass: block by block; for each query head, 64 output columns at a time in 8 register
// accumulators, saved to a small [G, D] array between blocks, so each V row is read from memory
// once for all G heads. Blocks are prefetched kPrefetchBlocks ahead (one 4 KB block per ~80 ns
// of compute at D = 64, G = 3: a single block ahead left the core waiting on memory), K's
// last blocks prefetching V's first.
typedef float vec8 __attribute__((vector_size(32)));

constexpr int64_t kPrefetchBlocks = 4;

inline vec8 load8(const float* ptr) {
  vec8 v;
  std::memcpy(&v, ptr, sizeof(v));
  return v;
}

inline void store8(float* ptr, vec8 v) { std::memcpy(ptr, &v, sizeof(v)); }

// The sums of the lanes of a, b, c and d, in lanes 0..3 of the result.
inline vec8 sum4(vec8 a, vec8 b, vec8 c, vec8 d) {
  const vec8 ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
                  __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);  // [a: 4 partial | b: 4]
  const vec8 cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 8, 9, 10, 11) +
                  __builtin_shufflevector(c, d, 4, 5, 6, 7, 12, 13, 14, 15);  // [c: 4 | d: 4]
  const vec8 q = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 4, 5, 12, 13) +
                 __builtin_shufflevector(ab, cd, 2, 3, 10, 11, 6, 7, 14, 15);  // [a: 2 | c: 2 | b: 2 | d: 2]
  return __builtin_shufflevector(q, q, 0, 4, 2, 6, 0, 4, 2, 6) + __builtin_shufflevector(q, q, 1, 5, 3, 7, 1, 5, 3, 7);
}

inline void prefetch_block(const float* block, int64_t num_floats) {
  for (int64_t i = 0; i < num_floats; i += 16) __builtin_prefetch(block + i);  // one 64-byte line each
}

template <int64_t D>
void attend_vec(const Problem& p, int64_t s, int64_t kh, std::vector<float>& buffer) {
  static_assert(D % 64 == 0, "attend_vec: head size a multiple of 64");
  constexpr int kVecs = D / 8;
  const int64_t end = p.lens[s], start = first_attended(p, end), G = p.G, BS = p.BS;
  const int64_t L = end - start;             // positions attended: [start, end), score column t - start
  buffer.resize(G * L + 2 * G * D + 2 * G);
  float* __restrict scores = buffer.data();  // [G, L]
  float* __restrict qs = scores + G * L;     // [G, D]: its G query heads, pre-scaled
  float* __restrict acc = qs + G * D;        // [G, D]: output accumulators between V blocks
  float* __restrict mx = acc + G * D;        // [G]: max score
  float* __restrict inv_sum = mx + G;        // [G]: 1 / softmax denominator
  const float* q = p.q + (s * p.H + kh * G) * D;
  for (int64_t i = 0; i < G * D; ++i) {
    qs[i] = q[i] * p.scale;
    acc[i] = 0.f;
  }
  for (int64_t g = 0; g < G; ++g) mx[g] = -std::numeric_limits<float>::infinity();
  const int64_t* table = p.tables + s * p.max_blocks;
  const int64_t first_block = start / BS, num_blocks = (end + BS - 1) / BS;
  const int64_t head_base = kh * p.NB, block_floats = BS * D;
  auto k_block = [&](int64_t b) { return p.k + (head_base + table[b]) * block_floats; };
  auto v_block = [&](int64_t b) { return p.v + (head_base + table[b]) * block_floats; };
  for (int64_t b = first_block; b < num_blocks && b < first_block + kPrefetchBlocks; ++b) {
    prefetch_block(k_block(b), block_floats);
  }
  for (int64_t b = first_block; b < num_blocks; ++b) {
    const int64_t ahead = b + kPrefetchBlocks;  // past K's end: V's first blocks
    if (ahead < num_blocks) {
      prefetch_block(k_block(ahead), block_floats);
    } else if (first_block + ahead - num_blocks < num_blocks) {
      prefetch_block(v_block(first_block + ahead - num_blocks), block_floats);
    }
    const int64_t t0 = b * BS;
    const float* kblock = k_block(b);
    const int64_t n = end - t0 < BS ? end - t0 : BS;
    int64_t j = t0 < start ? start - t0 : 0;  // a window may start mid-block (loads are unaligned anyway)
    for (; j + 4 <= n; j += 4) {
      const float* rows = kblock + j * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qs + g * D;
        // Two accumulators per row (even and odd vectors): eight FMA chains in flight.
        vec8 e0 = {}, e1 = {}, e2 = {}, e3 = {}, o0 = {}, o1 = {}, o2 = {}, o3 = {};
#pragma GCC unroll 32
        for (int v = 0; v < kVecs; v += 2) {
          const vec8 qe = load8(qg + 8 * v), qo = load8(qg + 8 * v + 8);
          e0 += qe * load8(rows + 8 * v);
          o0 += qo * load8(rows + 8 * v + 8);
          e1 += qe * load8(rows + D + 8 * v);
          o1 += qo * load8(rows + D + 8 * v + 8);
          e2 += qe * load8(rows + 2 * D + 8 * v);
          o2 += qo * load8(rows + 2 * D + 8 * v + 8);
          e3 += qe * load8(rows + 3 * D + 8 * v);
          o3 += qo * load8(rows + 3 * D + 8 * v + 8);
        }
        const vec8 dots = sum4(e0 + o0, e1 + o1, e2 + o2, e3 + o3);
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
  for (int64_t b = first_block; b < num_blocks; ++b) {
    if (b + kPrefetchBlocks < num_blocks) prefetch_block(v_block(b + kPrefetchBlocks), block_floats);
    const int64_t t0 = b * BS;
    const float* vblock = v_block(b);
    const int64_t n = end - t0 < BS ? end - t0 : BS;
    const int64_t j0 = t0 < start ? start - t0 : 0;
    for (int64_t g = 0; g < G; ++g) {
      const float* wg = scores + g * L + t0 - start;  // wg[j]: the weight of block row j
      for (int64_t c = 0; c < D; c += 64) {  // 64 columns: 8 accumulators
        float* ag = acc + g * D + c;
        vec8 a[8];
#pragma GCC unroll 8
        for (int v = 0; v < 8; ++v) a[v] = load8(ag + 8 * v);
        for (int64_t j = j0; j < n; ++j) {
          const float w = wg[j];
          const float* vrow = vblock + j * D + c;
#pragma GCC unroll 8
          for (int v = 0; v < 8; ++v) a[v] += w * load8(vrow + 8 * v);
        }
#pragma GCC unroll 8
        for (int v = 0; v < 8; ++v) store8(ag + 8 * v, a[v]);
      }
    }
  }
  float* out = p.out + (s * p.H + kh * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv_sum[g];
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
          attend_vec<64>(p, s, kh, buffer);
        } else if (p.BS % 4 == 0 && p.D == 128) {
          attend_vec<128>(p, s, kh, buffer);
        } else if (p.BS % 4 == 0 && p.D == 256) {
          attend_vec<256>(p, s, kh, buffer);
        } else {
          attend_generic(p, s, kh, buffer);
        }
      }
    }
  }
  return out;
}

// vLLM's reshape_and_cache: key/value [T, KVH, D] (rows of any stride, head_dim contiguous) into
// the pools [KVH, NB, BS, D] at slot_mapping [T] (slot = block * BS + offset). Replaces two
// index_copy_ calls, ~12 us each at one token: this is one memcpy per token and head.
void reshape_and_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor k_cache,
                       torch::Tensor v_cache, const torch::Tensor& slot_mapping) {
  TORCH_CHECK(key.scalar_type() == torch::kFloat32 && value.scalar_type() == torch::kFloat32 &&
              k_cache.scalar_type() == torch::kFloat32 && v_cache.scalar_type() == torch::kFloat32,
              "reshape_and_cache: float32 only");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.dim() == 1 && slot_mapping.is_contiguous(),
              "reshape_and_cache: slot_mapping must be a contiguous int64 [T] tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
              v_cache.is_contiguous(), "reshape_and_cache: contiguous [KVH, NB, BS, D] pools expected");
  const int64_t T = slot_mapping.size(0), KVH = k_cache.size(0), D = k_cache.size(3);
  const int64_t num_slots = k_cache.size(1) * k_cache.size(2);
  for (const torch::Tensor* t : {&key, &value}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == T && t->size(1) == KVH && t->size(2) == D && t->stride(2) == 1,
                "reshape_and_cache: key and value must be [T, KVH, D] with contiguous head_dim, got ", t->sizes());
  }
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "reshape_and_cache: slot ", slots[t], " outside the pool of ",
                num_slots);
  }
  const float* kp = key.data_ptr<float>();
  const float* vp = value.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < KVH; ++h) {
      const int64_t dst = (h * num_slots + slots[t]) * D;
      std::memcpy(kc + dst, kp + t * key.stride(0) + h * key.stride(1), D * sizeof(float));
      std::memcpy(vc + dst, vp + t * value.stride(0) + h * value.stride(1), D * sizeof(float));
    }
  }
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
void register_quant(pybind11::module& m);
// decoder_stack_cpu.cpp
void register_decoder_stack(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object: they run without the GIL, so that the server's event loop
  // (and every other Python thread) keeps running while a step is in a kernel, as torch's own ops do.
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, float32)", no_gil);
  m.def("reshape_and_cache", &reshape_and_cache,
        "key, value [T, KVH, D] into the [KVH, NB, BS, D] pools at slot_mapping [T] (CPU, float32)", no_gil);
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
  register_quant(m);
  register_decoder_stack(m);
}
