// Fused elementwise ops of the Llama block for CPU, float32: each reads and writes its rows
// once, where the PyTorch versions (layers/norm.py, activation.py, rotary.py) run 3 to 6
// separate ops with a temporary each. Same math as transformers' LlamaRMSNorm, SiLU-and-mul
// and rotate-half RoPE; vLLM's CPU backend fuses the same ops (`fused_add_rms_norm`,
// `silu_and_mul`, `rotary_embedding`). Rows are split over ATen's thread pool in tasks of at
// least kGrain elements, so small decode batches run on one thread without a fork.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "vec_math.h"

namespace {

constexpr int64_t kGrain = 32768;

int64_t rows_per_task(int64_t row_len) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, row_len)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": float32 CPU tensor expected");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": 2-D tensor with contiguous rows expected");
}

// out[i] = w[i] * x[i] / sqrt(mean(x^2) + eps), as transformers' LlamaRMSNorm.
inline void rms_norm_row(const float* __restrict x, const float* __restrict w, float* __restrict out, int64_t n,
                         float eps) {
  float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
  for (int64_t i = 0; i < n; ++i) sum_sq += x[i] * x[i];
  const float inv_rms = 1.f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv_rms);
}

}  // namespace

// x: [T, H] -> a new [T, H] tensor, normalized row by row with weight [H].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "rms_norm: weight of size hidden expected");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  const int64_t n = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, x.size(0), rows_per_task(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * xs, wp, op + r * n, n, static_cast<float>(eps));
  });
  return out;
}

// In place, as vLLM's fused_add_rms_norm: residual += x, then x = rms_norm(residual). Both [T, H].
void add_rms_norm_(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm x");
  check_rows(residual, "add_rms_norm residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: x and residual shapes differ");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "add_rms_norm: weight of size hidden expected");
  const int64_t n = x.size(1);
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t xs = x.stride(0), rs = residual.stride(0);
  at::parallel_for(0, x.size(0), rows_per_task(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* __restrict xr = xp + r * xs;
      float* __restrict rr = rp + r * rs;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) rr[i] += xr[i];
      rms_norm_row(rr, wp, xr, n, static_cast<float>(eps));
    }
  });
}

// gate_up: [T, 2I] (gate then up, as the fused projection) -> [T, I] = silu(gate) * up.
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_and_mul gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_and_mul: even last dimension expected");
  const int64_t inter = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), inter}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t gs = gate_up.stride(0);
  at::parallel_for(0, gate_up.size(0), rows_per_task(inter), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict gate = gp + r * gs;
      const float* __restrict up = gate + inter;
      float* __restrict o = op + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) o[i] = gate[i] * loomlm::sigmoid(gate[i]) * up[i];
    }
  });
  return out;
}

// In place on the first num_heads * head_dim columns of each row of x ([T, >= num_heads * head_dim]):
// rotate-half RoPE, x * cos + rotate_half(x) * sin, with cos/sin: [T, head_dim].
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads, int64_t head_dim) {
  check_rows(x, "rotary x");
  check_rows(cos, "rotary cos");
  check_rows(sin, "rotary sin");
  TORCH_CHECK(head_dim % 2 == 0 && x.size(1) >= num_heads * head_dim, "rotary: bad head_dim or num_heads");
  TORCH_CHECK(cos.size(0) == x.size(0) && sin.size(0) == x.size(0) && cos.size(1) == head_dim &&
              sin.size(1) == head_dim, "rotary: cos/sin of shape [num_tokens, head_dim] expected");
  const int64_t half = head_dim / 2;
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t xs = x.stride(0), cs = cos.stride(0), ss = sin.stride(0);
  at::parallel_for(0, x.size(0), rows_per_task(num_heads * head_dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict c = cp + r * cs;
      const float* __restrict s = sp + r * ss;
      for (int64_t h = 0; h < num_heads; ++h) {
        float* __restrict lo = xp + r * xs + h * head_dim;
        float* __restrict hi = lo + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = lo[i], b = hi[i];
          lo[i] = a * c[i] - b * s[i];
          hi[i] = b * c[half + i] + a * s[half + i];
        }
      }
    }
  });
}

// x: [R, V] float32 (rows contiguous) -> int64 [R]: each row's argmax as torch.argmax gives it
// (the first maximal index; a row holding NaN gives its first NaN). ATen's CPU argmax is a scalar
// loop (2 ms for 32 rows of a 49152-token vocabulary on an AMD EPYC); here one vectorized pass
// finds the max (and whether a NaN is present), a second the first index holding it.
at::Tensor argmax_rows(const at::Tensor& x) {
  check_rows(x, "argmax_rows x");
  const int64_t V = x.size(1);
  TORCH_CHECK(V > 0, "argmax_rows: empty rows");
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t xs = x.stride(0);
  constexpr int64_t kChunk = 64;
  at::parallel_for(0, x.size(0), rows_per_task(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict row = xp + r * xs;
      float m = -std::numeric_limits<float>::infinity();
      int has_nan = 0;
#pragma omp simd reduction(max : m) reduction(| : has_nan)
      for (int64_t i = 0; i < V; ++i) {
        m = row[i] > m ? row[i] : m;
        has_nan |= row[i] != row[i];
      }
      int64_t index = 0;
      for (int64_t i0 = 0; i0 < V; i0 += kChunk) {
        const int64_t i1 = std::min(V, i0 + kChunk);
        int hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t i = i0; i < i1; ++i) hit |= has_nan ? row[i] != row[i] : row[i] == m;
        if (!hit) continue;
        for (index = i0; index < i1; ++index) {
          if (has_nan ? row[index] != row[index] : row[index] == m) break;
        }
        break;
      }
      op[r] = index;
    }
  });
  return out;
}
