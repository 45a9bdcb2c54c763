// Scalar math written as plain arithmetic, so loops that call it vectorize (no libm calls).
#pragma once

#include <cstdint>
#include <cstring>

namespace loomlm {

// exp(x) for x <= 0 (e.g. softmax scores minus their max): Cephes' expf range reduction and polynomial (relative error ~2e-7), 2^n built
// from the exponent bits. Inputs below -87 return exp(-87) ~ 1.6e-38, which vanishes next to
// the max term (exp(0) = 1) in every softmax sum.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  const int32_t exponent = (bits - 0x4B400000 + 127) << 23;  // n + bias, in the exponent field
  float scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return poly * scale;
}

// 1 / (1 + exp(-x)) for any x, from exp of a non-positive argument only (no overflow).
inline float sigmoid(float x) {
  const float e = exp_nonpositive(x < 0.f ? x : -x);  // exp(-|x|)
  const float r = 1.f / (1.f + e);
  return x < 0.f ? e * r : r;
}

}  // namespace loomlm
