// Test-only module: quant_cpu.cpp with every x86 intrinsic emulated by SIMDe (simde_x86.h), its
// best ISA reported as AVX-512BW on any CPU. tests/test_quant_kernels.py runs the AVX-512BW kernels
// through it against the scalar ones on hosts without AVX-512 (kernels.simde_quant_kernels()).
#define LOOMLM_SIMDE 1
#include "quant_cpu.cpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { register_quant(m); }
