// The AVX2 + FMA + F16C copy of the CPU kernel (small_linear_cpu_kernel.h). setup.py compiles
// every source with the same flags, so the ISA is raised here for this file alone: the pragma comes
// before any include, and CPU_CAPABILITY_AVX2 selects ATen's 256-bit Vectorized (in the inline
// namespace at::vec::AVX2, apart from the DEFAULT copy). small_linear_cpu.cpp calls it only where
// the CPU reports avx2, fma and f16c.
//
// Shared inline functions (c10, std) are compiled here for AVX2 too; small_linear_cpu.cpp, which
// holds the DEFAULT copy and sorts first among the sources, comes first at link time, so the
// linker keeps its (baseline) copies of those.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx2,fma,f16c")
// g++ preprocesses before it applies the pragma, so the ISA macros that the headers test
// (sleef.h, ATen's vec256, <immintrin.h>) are not set by it: set them here, as -mavx2 -mfma -mf16c
// would.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "small_linear_cpu_kernel.h"
#else
// Not x86: no AVX2 copy; the dispatcher never calls this one.
#include "small_linear_cpu_plan.h"
#include <c10/util/Exception.h>
namespace taps_fast::cpu::AVX2 {
void run_small_linear(const Plan&) { TORCH_CHECK(false, "taps_fast: no AVX2 kernel on this CPU"); }
}  // namespace taps_fast::cpu::AVX2
#endif
