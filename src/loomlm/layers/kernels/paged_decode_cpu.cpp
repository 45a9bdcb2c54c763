// Paged decode attention for CPU: each query token attends to its context read in place
// from the block pool (no gathered copy), one pass over K and one over V.
// Layout as loomlm.layers.attention: pool [num_kv_heads, num_blocks, block_size, head_dim].
// Work item = (sequence, kv head): its G query heads share every K/V row they read.
// The head dimension is a template parameter for the common sizes so the inner loops
// fully unroll into vector FMAs (0 = runtime size).
#include <torch/extension.h>
#include <cmath>
#include <limits>
#include <vector>

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
};

template <int64_t kDim>
void attend(const Problem& p, int64_t s, int64_t kh, std::vector<float>& scores) {
  const int64_t D = kDim ? kDim : p.D;
  const int64_t L = p.lens[s], G = p.G, BS = p.BS;
  scores.resize(G * L);
  const float* qs = p.q + (s * p.H + kh * G) * D;  // its G query heads, contiguous
  const int64_t* table = p.tables + s * p.max_blocks;
  for (int64_t t0 = 0; t0 < L; t0 += BS) {  // block by block: a block's rows are contiguous
    const float* kblock = p.k + (kh * p.NB + table[t0 / BS]) * BS * D;
    const int64_t n = L - t0 < BS ? L - t0 : BS;
    for (int64_t j = 0; j < n; ++j) {
      const float* krow = kblock + j * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qs + g * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += qg[d] * krow[d];
        scores[g * L + t0 + j] = acc * p.scale;
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * L;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < L; ++t) mx = sg[t] > mx ? sg[t] : mx;
    float sum = 0.f;
    for (int64_t t = 0; t < L; ++t) { sg[t] = std::exp(sg[t] - mx); sum += sg[t]; }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
    float* og = p.out + (s * p.H + kh * G + g) * D;
    for (int64_t d = 0; d < D; ++d) og[d] = 0.f;
  }
  for (int64_t t0 = 0; t0 < L; t0 += BS) {
    const float* vblock = p.v + (kh * p.NB + table[t0 / BS]) * BS * D;
    const int64_t n = L - t0 < BS ? L - t0 : BS;
    for (int64_t j = 0; j < n; ++j) {
      const float* vrow = vblock + j * D;
      for (int64_t g = 0; g < G; ++g) {
        const float w = scores[g * L + t0 + j];
        float* og = p.out + (s * p.H + kh * G + g) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) og[d] += w * vrow[d];
      }
    }
  }
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q,             // [S, H, D] float32
                                     torch::Tensor k_cache,       // [KVH, NB, BS, D] float32
                                     torch::Tensor v_cache,       // [KVH, NB, BS, D] float32
                                     torch::Tensor block_tables,  // [S, max_blocks] int64
                                     torch::Tensor context_lens,  // [S] int64
                                     double scale) {
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
            static_cast<float>(scale)};
#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t kh = 0; kh < KVH; ++kh) {
        switch (p.D) {
          case 64: attend<64>(p, s, kh, scores); break;
          case 128: attend<128>(p, s, kh, scores); break;
          default: attend<0>(p, s, kh, scores);
        }
      }
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention (CPU, float32)");
}
