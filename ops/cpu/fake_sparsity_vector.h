#pragma once

// The hand-written CPU loops of fake_sparsity: x and result float32, float16
// or bfloat16, the mask bool, uint8 or one of those, with a bool or uint8
// mask or a 16-bit type among the three (aten's mul wins or ties on the rest:
// docs/performance.md, "Operator, CPU"). GCC vectorises none of c10::Half's
// or c10::BFloat16's conversions, and aten's mul converts a bool or uint8
// mask one element at a time; these loops convert 16 (AVX-512) or 8 (AVX2 +
// F16C) elements at once.
//
// Same bits as mask * x: PyTorch computes a product of these types in float
// (both operands converted exactly, bool as 0 or 1, uint8 exactly) and
// rounds once to the result type, to nearest even. float -> float16 is
// VCVTPS2PH with round-to-nearest-even; float -> bfloat16 is c10's integer
// rounding (VCVTNEPS2BF16 would flush denormals, c10 does not), with NaN
// written as c10 writes it.
//
// The loop is chosen once, from torch's CPU capability, so ATEN_CPU_CAPABILITY
// (default, avx2, avx512) selects it the same way as PyTorch's own kernels,
// which is how the tests reach every path (aten's mul under "default") on one
// machine.

#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define SPARSITY_HALF_LOOPS_X86 1
#endif

namespace sparsity {
namespace ops {
namespace vector_loops {

template <typename T>
constexpr bool is_16bit_float = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
template <typename T>
constexpr bool is_float_like = is_16bit_float<T> || std::is_same_v<T, float>;
template <typename T>
constexpr bool is_byte = std::is_same_v<T, bool> || std::is_same_v<T, uint8_t>;

// The (out, x, mask) triples these loops handle. Each computes in float.
template <typename out_t, typename x_t, typename mask_t>
constexpr bool covers = is_float_like<out_t> && is_float_like<x_t> &&
    (is_float_like<mask_t> || is_byte<mask_t>) &&
    (is_16bit_float<out_t> || is_16bit_float<x_t> || is_16bit_float<mask_t> || is_byte<mask_t>);

// A bool mask is passed as its bytes.
template <typename mask_t>
using mask_bytes_t = std::conditional_t<std::is_same_v<mask_t, bool>, uint8_t, mask_t>;

template <typename out_t, typename x_t, typename mask_t>
using Loop = void (*)(out_t*, const x_t*, const mask_bytes_t<mask_t>*, int64_t);

#ifdef SPARSITY_HALF_LOOPS_X86

#define SPARSITY_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define SPARSITY_AVX2 __attribute__((target("avx2,fma,f16c")))

// ---- AVX-512: 16 lanes of float
//
// The zero-masking forms, with every lane on, stand for the plain ones:
// GCC 12 warns -Wmaybe-uninitialized about the "undefined" source register
// of the plain forms once inlined (GCC bug 105593).
constexpr __mmask16 kAll16 = 0xffff;

template <typename T>
SPARSITY_AVX512 inline __m512 load16(const void* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_maskz_cvtph_ps(kAll16, _mm256_loadu_si256(static_cast<const __m256i*>(p)));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bfloat16 is the upper half of a float: widening is exact.
    const __m512i bits = _mm512_maskz_cvtepu16_epi32(kAll16, _mm256_loadu_si256(static_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll16, bits, 16));
  } else {
    const __m512i bytes = _mm512_maskz_cvtepu8_epi32(kAll16, _mm_loadu_si128(static_cast<const __m128i*>(p)));
    if constexpr (std::is_same_v<T, bool>) {
      return _mm512_maskz_mov_ps(_mm512_test_epi32_mask(bytes, bytes), _mm512_set1_ps(1.0f));
    } else {
      return _mm512_maskz_cvtepi32_ps(kAll16, bytes);
    }
  }
}

template <typename T>
SPARSITY_AVX512 inline void store16(void* p, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(p, v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm256_storeu_si256(
        static_cast<__m256i*>(p), _mm512_maskz_cvtps_ph(kAll16, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>);
    // c10::detail::round_to_nearest_even: add 0x7fff plus the lowest kept
    // bit, keep the upper 16 bits; NaN becomes 0x7fc0.
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll16, bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_maskz_srli_epi32(
        kAll16,
        _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_maskz_cvtepi32_epi16(kAll16, rounded));
  }
}

// ---- AVX2 + F16C: 8 lanes of float

template <typename T>
SPARSITY_AVX2 inline __m256 load8(const void* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
  } else {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(p)));
    if constexpr (std::is_same_v<T, bool>) {
      const __m256i zero = _mm256_cmpeq_epi32(bytes, _mm256_setzero_si256());
      return _mm256_andnot_ps(_mm256_castsi256_ps(zero), _mm256_set1_ps(1.0f));
    } else {
      return _mm256_cvtepi32_ps(bytes);
    }
  }
}

template <typename T>
SPARSITY_AVX2 inline void store8(void* p, __m256 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(static_cast<float*>(p), v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>);
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
    // 8 x 32 -> 8 x 16 bits: packus works within 128-bit halves, so gather
    // the two halves' results into the low 128 bits.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xd8);
    _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
}

// The loop for a vector width: whole vectors, then the tail through small
// zeroed buffers, so the tail is computed by the same instructions.
#define SPARSITY_DEFINE_HALF_LOOP(NAME, TARGET, WIDTH, LOAD, STORE, MUL)                          \
  template <typename out_t, typename x_t, typename mask_t>                                        \
  TARGET void NAME(out_t* out, const x_t* x, const mask_bytes_t<mask_t>* mask, int64_t n) {       \
    int64_t i = 0;                                                                                \
    for (; i + WIDTH <= n; i += WIDTH) {                                                          \
      STORE<out_t>(out + i, MUL(LOAD<mask_t>(mask + i), LOAD<x_t>(x + i)));                       \
    }                                                                                             \
    if (i < n) {                                                                                  \
      const int64_t rest = n - i;                                                                 \
      x_t x_tail[WIDTH] = {};                                                                     \
      mask_bytes_t<mask_t> mask_tail[WIDTH] = {};                                                 \
      out_t out_tail[WIDTH];                                                                      \
      std::memcpy(x_tail, x + i, rest * sizeof(x_t));                                             \
      std::memcpy(mask_tail, mask + i, rest * sizeof(mask_tail[0]));                              \
      STORE<out_t>(out_tail, MUL(LOAD<mask_t>(mask_tail), LOAD<x_t>(x_tail)));                    \
      std::memcpy(out + i, out_tail, rest * sizeof(out_t));                                       \
    }                                                                                             \
  }

SPARSITY_DEFINE_HALF_LOOP(loop_avx512, SPARSITY_AVX512, 16, load16, store16, _mm512_mul_ps)
SPARSITY_DEFINE_HALF_LOOP(loop_avx2, SPARSITY_AVX2, 8, load8, store8, _mm256_mul_ps)

#undef SPARSITY_DEFINE_HALF_LOOP

#endif // SPARSITY_HALF_LOOPS_X86

// The loop to use on this machine: the widest one that both torch's CPU
// capability and the processor allow; nullptr (aten's mul) when neither does.
template <typename out_t, typename x_t, typename mask_t>
Loop<out_t, x_t, mask_t> pick() {
  static const Loop<out_t, x_t, mask_t> chosen = []() -> Loop<out_t, x_t, mask_t> {
#ifdef SPARSITY_HALF_LOOPS_X86
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c")) {
      return &loop_avx512<out_t, x_t, mask_t>;
    }
    if ((capability == "AVX512" || capability == "AVX2") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
      return &loop_avx2<out_t, x_t, mask_t>;
    }
#endif
    return nullptr;
  }();
  return chosen;
}

} // namespace vector_loops
} // namespace ops
} // namespace sparsity
