// Vector helpers shared by the CPU kernels, for one of two instruction sets:
// - AVX-512F with AVX512-BF16 (the default): 16 fp32 lanes, bf16 loads and stores;
// - AVX2 with FMA (compiled with -DYQ_AVX2): 8 fp32 lanes, fp32 only.
// The kernels are written once against these, in steps of L lanes, and built once per set: the
// AVX2 build is for CPUs without AVX-512, where PyTorch's ops are all that would run otherwise.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace yq {

typedef uint16_t bf16;

#ifdef YQ_AVX2

typedef __m256 vf;
// All ones in the lanes that are in; `all` when every lane is: masked stores (vmaskmovps) are
// several times slower than plain ones on some CPUs (AMD's), so whole vectors skip them.
struct vmask {
  __m256i m;
  bool all;
};
constexpr int L = 8;

inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vf zero() { return _mm256_setzero_ps(); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf fnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline vf fmsub(vf a, vf b, vf c) { return _mm256_fmsub_ps(a, b, c); }
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vf x) { _mm256_storeu_ps(p, x); }
inline vf load(const float* p, vmask m) { return m.all ? load(p) : _mm256_maskload_ps(p, m.m); }  // lanes out read as 0
inline void store(float* p, vf x, vmask m) {  // lanes out are not written
  if (m.all)
    store(p, x);
  else
    _mm256_maskstore_ps(p, m.m, x);
}
inline vf keep(vmask m, vf x) { return _mm256_and_ps(_mm256_castsi256_ps(m.m), x); }  // lanes out are 0
inline vf max_where(vf a, vmask m, vf b) { return _mm256_blendv_ps(a, _mm256_max_ps(a, b), _mm256_castsi256_ps(m.m)); }
inline vmask no_lanes() { return {_mm256_setzero_si256(), false}; }

// Lanes first + k with lo <= first + k <= hi.
inline vmask lanes_in(int first, int lo, int hi) {
  const __m256i j = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
  const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo), j), _mm256_cmpgt_epi32(j, _mm256_set1_epi32(hi)));
  return {_mm256_xor_si256(out, _mm256_set1_epi32(-1)), false};
}
// The lanes of elements j .. j+L-1 that are below n.
inline vmask tail(long n, long j) {
  const int left = (int)std::min<long>(n - j, L);
  return {_mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), left == L};
}

inline float hsum(vf x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax(vf x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline vf round_int(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p * 2^n for integral n in [-127, 127], as vscalefps: two exact power-of-two products (each
// factor a normal float), so a subnormal result is rounded once, by the second.
inline vf scale2(vf p, vf n) {
  const __m256i k = _mm256_cvtps_epi32(n), k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  const __m256i bias = _mm256_set1_epi32(127);
  const vf f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
  const vf f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}

#else

typedef __m512 vf;
typedef __mmask16 vmask;
constexpr int L = 16;

inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf zero() { return _mm512_setzero_ps(); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
inline vf fmsub(vf a, vf b, vf c) { return _mm512_fmsub_ps(a, b, c); }
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline vf load(const float* p, vmask m) { return _mm512_maskz_loadu_ps(m, p); }
inline void store(float* p, vf x, vmask m) { _mm512_mask_storeu_ps(p, m, x); }
inline vf keep(vmask m, vf x) { return _mm512_maskz_mov_ps(m, x); }
inline vf max_where(vf a, vmask m, vf b) { return _mm512_mask_max_ps(a, m, a, b); }
inline vmask no_lanes() { return 0; }

inline vmask lanes_in(int first, int lo, int hi) {
  const __m512i j = _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(first));
  return _mm512_cmp_epi32_mask(j, _mm512_set1_epi32(lo), _MM_CMPINT_NLT) & _mm512_cmp_epi32_mask(j, _mm512_set1_epi32(hi), _MM_CMPINT_LE);
}
inline vmask tail(long n, long j) { return n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1); }

inline float hsum(vf x) { return _mm512_reduce_add_ps(x); }
inline float hmax(vf x) { return _mm512_reduce_max_ps(x); }

inline vf round_int(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf scale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }

// 16 bf16 -> fp32 (masked lanes read as 0) and back, rounding to nearest even.
inline __m512 load_bf16(const bf16* p, __mmask16 m = 0xFFFF) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

#endif

// Cephes expf: range reduction by ln 2, degree-5 polynomial, about 1 ulp on [-88, 88]. The same
// bits in both builds.
inline vf exp_ps(vf x) {
  x = vmax(vmin(x, set1(88.0f)), set1(-88.0f));
  const vf n = round_int(mul(x, set1(1.44269504088896341f)));
  vf r = fnmadd(n, set1(0.693359375f), x);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  p = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  return scale2(p, n);
}

// Loads and stores of L elements (lanes out read as 0, are not written) as fp32 vectors.
template <class E>
struct Io;
#ifndef YQ_AVX2
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
#endif
template <>
struct Io<float> {
  static vf load(const float* p) { return yq::load(p); }
  static vf load(const float* p, vmask m) { return yq::load(p, m); }
  static void store(float* p, vf x) { yq::store(p, x); }
  static void store(float* p, vf x, vmask m) { yq::store(p, x, m); }
  static vf round(vf x) { return x; }
  static float get(const float* p) { return *p; }
  static void put(float* p, float x) { *p = x; }
};

}  // namespace yq
