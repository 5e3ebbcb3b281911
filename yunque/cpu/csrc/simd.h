// Vector helpers shared by the CPU kernels (AVX-512F, AVX512-BF16).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace yq {

typedef uint16_t bf16;

// Cephes expf: range reduction by ln 2, degree-5 polynomial, about 1 ulp on [-88, 88].
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 -> fp32 (masked lanes read as 0) and back, rounding to nearest even.
inline __m512 load_bf16(const bf16* p, __mmask16 m = 0xFFFF) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// Loads and stores of 16 elements (masked lanes read as 0, are not written) as fp32 vectors.
template <class E>
struct Io;
template <>
struct Io<bf16> {
  static __m512 load(const bf16* p, __mmask16 m = 0xFFFF) { return load_bf16(p, m); }
  static void store(bf16* p, __m512 x, __mmask16 m = 0xFFFF) { _mm256_mask_storeu_epi16(p, m, to_bf16(x)); }
  static __m512 round(__m512 x) {  // to the nearest bf16, kept as fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(x)), 16));
  }
  static float get(const bf16* p) {
    uint32_t u = (uint32_t)*p << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  static void put(bf16* p, float x) {
    bf16 b[16];
    _mm256_storeu_si256((__m256i*)b, to_bf16(_mm512_set1_ps(x)));
    *p = b[0];
  }
};
template <>
struct Io<float> {
  static __m512 load(const float* p, __mmask16 m = 0xFFFF) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, __m512 x, __mmask16 m = 0xFFFF) { _mm512_mask_storeu_ps(p, m, x); }
  static __m512 round(__m512 x) { return x; }
  static float get(const float* p) { return *p; }
  static void put(float* p, float x) { *p = x; }
};

inline __mmask16 tail(long n, long j) { return n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1); }

}  // namespace yq
