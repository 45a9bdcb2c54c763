// Test-only: the x86 intrinsics quant_cpu.cpp uses, emulated in portable code by SIMDe
// (https://github.com/simd-everywhere/simde, Debian's libsimde-dev), so that its AVX-512BW kernels
// run on CPUs without AVX-512 (quant_simde.cpp). SIMDe's native aliases map the `_mm*` names to its
// `simde_mm*` functions; this header adds the few that SIMDe 0.7.4 lacks or aliases wrongly.
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>

// SIMDe 0.7.4 aliases the two-argument form to its four-argument mask form.
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)

// Missing from SIMDe 0.7.4: built from two 256-bit halves, which SIMDe has.
inline simde__m512 loomlm_simde_mm512_cvtepi32_ps(simde__m512i a) {
  const simde__m256 lo = simde_mm256_cvtepi32_ps(simde_mm512_castsi512_si256(a));
  const simde__m256 hi = simde_mm256_cvtepi32_ps(simde_mm512_extracti64x4_epi64(a, 1));
  return simde_mm512_castpd_ps(
      simde_mm512_insertf64x4(simde_mm512_castpd256_pd512(simde_mm256_castps_pd(lo)), simde_mm256_castps_pd(hi), 1));
}
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps(a) loomlm_simde_mm512_cvtepi32_ps(a)
