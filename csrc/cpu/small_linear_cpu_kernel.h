// The vectorized CPU kernel of small_linear / small_mt_linear, included once per CPU capability:
// small_linear_cpu.cpp (DEFAULT: ATen's portable Vectorized) and small_linear_cpu_avx2.cpp
// (AVX2 + FMA + F16C, compiled under `#pragma GCC target`). The includer defines CPU_CAPABILITY
// (DEFAULT or AVX2), which names both ATen's inline namespace at::vec::CPU_CAPABILITY and ours,
// so the two copies coexist in one library.
//
// Shape of the work (memory-bound GEMV over a few rows): parallel_for over blocks of kNB output
// features n. For each block, for each group of rows sharing an effective weight (W alone, or
// W + ΔW_u for one open slot u), for each register tile of up to kMB rows: stream K once, forming
// v = w (+ d) in registers in the accumulation type (w + d rounded to the layer dtype, as merge
// stores it) and FMA-ing it into kMB x kNB accumulators.
// W's block is pulled from memory by the first group and re-read from L1/L2 by the others; each
// open ΔW_u's block is read once from memory, by its own group; closed tasks and base rows are in
// the W-only group and never touch ΔW.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "small_linear_cpu_plan.h"

#ifndef TAPS_FAST_CPU_NB
#define TAPS_FAST_CPU_NB 3  // output features per register tile
#endif
#ifndef TAPS_FAST_CPU_KC
#define TAPS_FAST_CPU_KC 256  // K elements per chunk (x rows and W / ΔW rows stay in L1)
#endif
#ifndef TAPS_FAST_CPU_MB
#define TAPS_FAST_CPU_MB 4  // x rows per register tile
#endif

namespace taps_fast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int kNB = TAPS_FAST_CPU_NB;
constexpr int kMB = TAPS_FAST_CPU_MB;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// K elements of a weight row from k on, converted to the accumulation type (one vector's worth).
template <typename T>
inline Vectorized<acc_t<T>> load_acc(const T* p) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    Vectorized<float> out;
    at::vec::load_fp32_from_fp16(p, out);
    return out;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    Vectorized<float> out;
    at::vec::load_fp32_from_bf16(p, out);
    return out;
  } else {
    return Vectorized<T>::loadu(p);
  }
}

// v rounded to T (to nearest even) and widened back: W + ΔW takes the values merge stores, on
// every backend. The fp32 sum of two fp16 / bf16 numbers rounded once more to fp16 / bf16 is the
// correctly rounded sum (24 >= 2 * 11 + 2 significand bits: double rounding is innocuous), i.e.
// the bits of torch's fp16 / bf16 add. A no-op for fp32 and fp64.
// AVX2: F16C's vcvtps2ph / vcvtph2ps for fp16; bf16 rounds in the fp32 bits (add 0x7fff plus the
// kept lsb, clear the low half; NaN passed through). ATen's convert_from_float / convert_to_float
// pair converts two vectors and repacks them: with it the open bf16 gate took 45 ms where the
// closed one took 18 (8 layers N = K = 3072, M = 16, 2 threads, 2-core x86_64, no GPU,
// torch 2.14.1); fp32 takes 1.6x its closed gate.
template <typename T>
inline Vectorized<acc_t<T>> round_to_layer(const Vectorized<acc_t<T>>& v) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, c10::Half>) {
    return Vectorized<float>(_mm256_cvtph_ps(_mm256_cvtps_ph(__m256(v), _MM_FROUND_TO_NEAREST_INT)));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256 f = __m256(v);
    const __m256i i = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(i, _mm256_set1_epi32(0x7fff)), lsb),
                                       _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
    return Vectorized<float>(_mm256_blendv_ps(_mm256_castsi256_ps(r), f, _mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
  } else {
    return v;
  }
#else
  if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
  } else {
    return v;
  }
#endif
}

template <typename A>
inline A hsum(const Vectorized<A>& v) {
  __at_align__ A buf[Vectorized<A>::size()];
  v.store(buf);
  A s = 0;
  for (int64_t i = 0; i < Vectorized<A>::size(); ++i) s += buf[i];
  return s;
}

// out[i * NB + j] = sum_k x[i, k] * (w[j, k] (+ d[j, k])) for i < MB, j < NB.
// x: MB rows of stride K (accumulation type); w, d: NB rows of stride K.
// acc[i * NB + j] += x[i, k] * (w[j, k] (+ d[j, k])) over k in [0, klen) for i < MB, j < NB, klen a
// multiple of the vector width; x: MB rows, w, d: NB rows, all of stride K. pw / pd (or nullptr):
// blocks to prefetch meanwhile at the same offsets (the next block of output features).
template <typename T, int MB, int NB, bool HAS_D>
inline void tile(const acc_t<T>* __restrict__ x, const T* __restrict__ w,
                 const T* __restrict__ d, int64_t K, int64_t klen,
                 Vectorized<acc_t<T>>* __restrict__ accbuf, const T* pw, const T* pd) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t VW = V::size();
  V acc[MB][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[i][j] = accbuf[i * NB + j];
  // One vector of K: v_j = w_j (+ d_j), rounded to T, for the NB features, FMA'd into every row's
  // accumulators.
  auto step = [&](int64_t kk) __attribute__((always_inline)) {
    V v[NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) {
      v[j] = load_acc(w + j * K + kk);
      if constexpr (HAS_D) v[j] = round_to_layer<T>(v[j] + load_acc(d + j * K + kk));
    }
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const V xi = V::loadu(x + i * K + kk);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) acc[i][j] = at::vec::fmadd(xi, v[j], acc[i][j]);
    }
  };
  int64_t k = 0;
  if (pw != nullptr) {
    // One prefetch per 64-byte line of the next block, spread over this block's k loop.
    constexpr int64_t kLine = 64 / sizeof(T);
    for (; k + kLine <= klen; k += kLine) {
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        __builtin_prefetch(pw + j * K + k, 0, 3);
        if (HAS_D && pd != nullptr) __builtin_prefetch(pd + j * K + k, 0, 3);
      }
#pragma GCC unroll 4
      for (int64_t kk = k; kk < k + kLine; kk += VW) step(kk);
    }
  }
  for (; k < klen; k += VW) step(k);
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) accbuf[i * NB + j] = acc[i][j];
}

template <typename T, int NB, bool HAS_D>
inline void tile_rows(const acc_t<T>* x, const T* w, const T* d, int64_t K, int64_t klen,
                      int64_t mb, Vectorized<acc_t<T>>* accbuf, const T* pw, const T* pd) {
  switch (mb) {
    case 1: tile<T, 1, NB, HAS_D>(x, w, d, K, klen, accbuf, pw, pd); break;
#if TAPS_FAST_CPU_MB >= 2
    case 2: tile<T, 2, NB, HAS_D>(x, w, d, K, klen, accbuf, pw, pd); break;
#endif
#if TAPS_FAST_CPU_MB >= 3
    case 3: tile<T, 3, NB, HAS_D>(x, w, d, K, klen, accbuf, pw, pd); break;
#endif
#if TAPS_FAST_CPU_MB >= 4
    case 4: tile<T, 4, NB, HAS_D>(x, w, d, K, klen, accbuf, pw, pd); break;
#endif
#if TAPS_FAST_CPU_MB >= 5
    case 5: tile<T, 5, NB, HAS_D>(x, w, d, K, klen, accbuf, pw, pd); break;
#endif
#if TAPS_FAST_CPU_MB >= 6
    case 6: tile<T, 6, NB, HAS_D>(x, w, d, K, klen, accbuf, pw, pd); break;
#endif
    default: break;
  }
}

// Output features [n, n + NB) for every row of the plan. K is walked in chunks of kKC so that a
// chunk's x rows and W / ΔW rows stay in L1 while every group and row tile uses them; the
// vector accumulators of all M rows (accbuf, M * NB vectors) carry over from chunk to chunk.
template <typename T, int NB>
inline void feature_block(const Plan& p, int64_t n, Vectorized<acc_t<T>>* accbuf) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t VW = V::size();
  constexpr int64_t kKC = TAPS_FAST_CPU_KC;
  const int64_t K = p.K, N = p.N, M = p.M;
  const int64_t Kv = K / VW * VW;
  const A* x = static_cast<const A*>(p.x);
  const T* w = static_cast<const T*>(p.weight) + n * K;
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  for (int64_t i = 0; i < M * NB; ++i) accbuf[i] = V(A(0));
  // Prefetch the next feature block of each stream while its current block is first read: W by
  // the first tile, each ΔW_u by the first tile of its group.
  const bool pf = p.prefetch && n + 2 * NB <= N;
  for (int64_t k0 = 0; k0 < Kv; k0 += kKC) {
    const int64_t klen = std::min<int64_t>(kKC, Kv - k0);
    bool w_fresh = true;
    for (const RowGroup& g : p.groups) {
      const T* d = g.delta ? static_cast<const T*>(g.delta) + n * K + k0 : nullptr;
      for (int64_t i = g.begin; i < g.end; i += kMB) {
        const int64_t mb = std::min<int64_t>(kMB, g.end - i);
        const bool first = i == g.begin && pf;
        const T* pw = first ? (w_fresh ? w + k0 + NB * K : (d ? d + NB * K : nullptr)) : nullptr;
        const T* pd = first && w_fresh && d ? d + NB * K : nullptr;
        w_fresh = false;
        if (d)
          tile_rows<T, NB, true>(x + i * K + k0, w + k0, d, K, klen, mb, accbuf + i * NB, pw, pd);
        else
          tile_rows<T, NB, false>(x + i * K + k0, w + k0, nullptr, K, klen, mb, accbuf + i * NB,
                                  pw, nullptr);
      }
    }
  }
  A b[NB];
  for (int j = 0; j < NB; ++j) b[j] = bias ? static_cast<A>(bias[n + j]) : A(0);
  for (const RowGroup& g : p.groups) {
    const T* d = g.delta ? static_cast<const T*>(g.delta) + n * K : nullptr;
    for (int64_t i = g.begin; i < g.end; ++i) {
      const A* xr = x + i * K;
      const A poison = static_cast<A>(p.poison[i]);
      T* yr = y + p.out_row[i] * N + n;
      for (int j = 0; j < NB; ++j) {
        A s = hsum(accbuf[i * NB + j]);
        for (int64_t k = Kv; k < K; ++k) {  // tail: K not a multiple of the vector width
          A v = static_cast<A>(w[j * K + k]);
          if (d) v = static_cast<A>(static_cast<T>(v + static_cast<A>(d[j * K + k])));
          s += xr[k] * v;
        }
        yr[j] = static_cast<T>(s + b[j] + poison);
      }
    }
  }
}

template <typename T>
void run_typed(const Plan& p) {
  const int64_t nblocks = (p.N + kNB - 1) / kNB;
  int64_t streams = 1;  // W plus the open deltas: bytes streamed per feature block
  for (const RowGroup& g : p.groups) streams += g.delta != nullptr;
  const int64_t block_bytes = std::max<int64_t>(1, kNB * p.K * int64_t(sizeof(T)) * streams
                                                   + kNB * p.M * p.K * 2);
  // Split across threads only when each share has enough bytes to amortise waking the pool.
  constexpr int64_t kMinBytesPerThread = 96 * 1024;
  const int64_t grain = std::max<int64_t>(1, (kMinBytesPerThread + block_bytes - 1) / block_bytes);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<Vectorized<acc_t<T>>> accbuf(p.M * kNB);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = blk * kNB;
      if (n + kNB <= p.N) {
        feature_block<T, kNB>(p, n, accbuf.data());
      } else {
        for (int64_t r = n; r < p.N; ++r) feature_block<T, 1>(p, r, accbuf.data());
      }
    }
  });
}

}  // namespace

void run_small_linear(const Plan& p) {
  switch (p.dtype) {
    case c10::ScalarType::Float: run_typed<float>(p); break;
    case c10::ScalarType::Double: run_typed<double>(p); break;
    case c10::ScalarType::Half: run_typed<c10::Half>(p); break;
    case c10::ScalarType::BFloat16: run_typed<c10::BFloat16>(p); break;
    default: TORCH_CHECK(false, "taps_fast: unsupported dtype ", p.dtype);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace taps_fast
