// Causal flash attention on x86 CPUs, forward and backward: bf16 and fp32 with AVX-512 (and
// AVX512-BF16), fp32 with AVX2 + FMA (the build with YQ_AVX2: simd.h's 8-lane helpers).
//
// Why: PyTorch's CPU flash kernel runs these shapes (hd 64, T 512) at 11-18% of the bf16
// matmul peak on AVX512-BF16 machines without AMX (a quarter of a bf16 LoRA training step), and
// at under half the fp32 peak in fp32, on AVX2-only CPUs too (there this file's AVX2 build runs
// in its place, fp32). Here every product is one register-blocked microkernel
// (vdpbf16ps on VNNI pairs for bf16, vfmadd for fp32), the softmax is fused between the
// products, and tiles stay in L1. The two precisions are one template: a 32-bit "word" of the
// reduction holds a pair of bf16 or one float.
//
// Layouts: q (B, T, H, hd), k/v (B, T, K, hd), any strides in elements (even, last dim dense);
// out and grads are dense (B, T, n, hd); lse is (B, H, T) fp32. Masks: key j is visible to
// query i when lo(i) <= j <= i, lo(i) = max(segment start of i, i - window + 1), so packed
// documents and sliding windows are one call. Numerics follow flash attention: scores and
// softmax in fp32, probabilities rounded to bf16 (in the bf16 kernel) before the products that
// read them.
//
// Built by yunque/cpu/kernels.py with g++ on first use; plain C ABI, no torch headers.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

using namespace yq;
typedef uint32_t u32;

namespace {

constexpr int BM = 64, BN = 64;  // query rows x key columns per tile
constexpr int NC = BN / L;        // vectors per tile row
// Register blocking of the products: up to 6 rows x NVMAX vectors of accumulators, plus NVMAX
// vectors of B and one broadcast of A: 29 of 32 zmm registers, 15 of 16 ymm registers.
constexpr int NVMAX = L == 16 ? 4 : 2;

// Product traits. W elements make one 32-bit word of the reduction dimension (loads and
// stores are simd.h's Io).
template <class E>
struct El;
#ifndef YQ_AVX2
template <>
struct El<bf16> {
  static constexpr int W = 2;
  static __m512 fma(__m512 c, u32 a, __m512 b) {
    return _mm512_dpbf16_ps(c, (__m512bh)_mm512_set1_epi32((int)a), (__m512bh)b);
  }
};
#endif
template <>
struct El<float> {
  static constexpr int W = 1;
  static vf fma(vf c, u32 a, vf b) {
    float f;
    __builtin_memcpy(&f, &a, 4);
    return fmadd(set1(f), b, c);
  }
};

// C[R x L*NV] (+)= A . B over K2 words. A word (r, kk) = A[r*ars + kk*aks]; B word (kk, n) =
// B[kk*ldb + n] holds the n-th column's elements of that word (VNNI order for bf16).
template <class E, int R, int NV>
inline void micro(int K2, const u32* A, long ars, long aks, const u32* B, long ldb, float* C, long ldc, bool acc) {
  vf c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r][v] = acc ? load(C + r * ldc + L * v) : zero();
  for (int kk = 0; kk < K2; ++kk) {
    vf b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load((const float*)(B + kk * ldb + L * v));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const u32 a = A[r * ars + kk * aks];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = El<E>::fma(c[r][v], a, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * ldc + L * v, c[r][v]);
}

template <class E, int R>
inline void micro_n(int nv, int K2, const u32* A, long ars, long aks, const u32* B, long ldb, float* C, long ldc, bool acc) {
  switch (nv) {
#ifndef YQ_AVX2
    case 4: micro<E, R, 4>(K2, A, ars, aks, B, ldb, C, ldc, acc); break;
    case 3: micro<E, R, 3>(K2, A, ars, aks, B, ldb, C, ldc, acc); break;
#endif
    case 2: micro<E, R, 2>(K2, A, ars, aks, B, ldb, C, ldc, acc); break;
    default: micro<E, R, 1>(K2, A, ars, aks, B, ldb, C, ldc, acc); break;
  }
}

// C[M x N] (+)= A[M x K2 words] . B[K2 words x N]; N a multiple of 16.
template <class E>
void gemm(int M, int N, int K2, const u32* A, long ars, long aks, const u32* B, long ldb, float* C, long ldc, bool acc) {
  for (int n0 = 0; n0 < N; n0 += L * NVMAX) {
    const int nv = std::min(NVMAX, (N - n0) / L);
    int m = 0;
    for (; m + 6 <= M; m += 6) micro_n<E, 6>(nv, K2, A + m * ars, ars, aks, B + n0, ldb, C + m * ldc + n0, ldc, acc);
    const u32* a = A + m * ars;
    float* c = C + m * ldc + n0;
    switch (M - m) {
      case 5: micro_n<E, 5>(nv, K2, a, ars, aks, B + n0, ldb, c, ldc, acc); break;
      case 4: micro_n<E, 4>(nv, K2, a, ars, aks, B + n0, ldb, c, ldc, acc); break;
      case 3: micro_n<E, 3>(nv, K2, a, ars, aks, B + n0, ldb, c, ldc, acc); break;
      case 2: micro_n<E, 2>(nv, K2, a, ars, aks, B + n0, ldb, c, ldc, acc); break;
      case 1: micro_n<E, 1>(nv, K2, a, ars, aks, B + n0, ldb, c, ldc, acc); break;
      default: break;
    }
  }
}

// dst[p*Tp + j] = word p of row j (rows j >= T are zero): the B operand of X . rows^T.
template <class E>
void pack_transposed(const E* src, long st, int T, int hd, int Tp, u32* dst) {
  const int words = hd / El<E>::W;
  for (int j = 0; j < Tp; ++j) {
    const u32* row = (const u32*)(src + (long)j * st);
    for (int p = 0; p < words; ++p) dst[(long)p * Tp + j] = j < T ? row[p] : 0u;
  }
}

#ifndef YQ_AVX2
// 16 words (lo[n], hi[n]) from two rows of 16 bf16.
inline __m512i pair_words(__m256i lo, __m256i hi) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
}

// The B operand of X . rows (rows >= T are zero): word row jw holds rows W*jw .. W*jw+W-1.
void pack_rows(const bf16* src, long st, int T, int hd, int Tp, u32* dst) {
  const __m256i zero = _mm256_setzero_si256();
  for (int jp = 0; jp < Tp / 2; ++jp) {
    const int j = 2 * jp;
    for (int d = 0; d < hd; d += 16) {
      __m256i lo = j < T ? _mm256_loadu_si256((const __m256i*)(src + (long)j * st + d)) : zero;
      __m256i hi = j + 1 < T ? _mm256_loadu_si256((const __m256i*)(src + (long)(j + 1) * st + d)) : zero;
      _mm512_storeu_si512(dst + (long)jp * hd + d, pair_words(lo, hi));
    }
  }
}
#endif
void pack_rows(const float* src, long st, int T, int hd, int Tp, u32* dst) {
  for (int j = 0; j < Tp; ++j)
    for (int d = 0; d < hd; d += L) store((float*)dst + (long)j * hd + d, j < T ? load(src + (long)j * st + d) : zero());
}

// Rows r .. r+W-1 of P and dS (L columns each) into the backward's operands: PV and DSV are
// word rows (the A of P^T dO and dS^T Q, read down their columns); DSB is dS row-major (the A
// of dS K). For fp32 the word rows are the rows, and DSB is DSV.
#ifndef YQ_AVX2
inline void put_rows(const __m512 (&p)[2], const __m512 (&ds)[2], int r, int col, bool second, u32* PV, u32* DSV,
                     bf16* DSB) {
  const __m256i p0 = to_bf16(p[0]), p1 = to_bf16(p[1]), s0 = to_bf16(ds[0]), s1 = to_bf16(ds[1]);
  _mm512_storeu_si512(PV + (r / 2) * BN + col, pair_words(p0, p1));
  _mm512_storeu_si512(DSV + (r / 2) * BN + col, pair_words(s0, s1));
  _mm256_storeu_si256((__m256i*)(DSB + r * BN + col), s0);
  if (second) _mm256_storeu_si256((__m256i*)(DSB + (r + 1) * BN + col), s1);
}
#endif
inline void put_rows(const vf (&p)[1], const vf (&ds)[1], int r, int col, bool, u32* PV, u32* DSV, float*) {
  store((float*)PV + r * BN + col, p[0]);
  store((float*)DSV + r * BN + col, ds[0]);
}

inline int lowest_key(const int32_t* seg, int i, int window) {  // lo(i)
  int lo = seg ? seg[i] : 0;
  if (window > 0) lo = std::max(lo, i - window + 1);
  return lo;
}

// Columns j0 + [0, BN) of one row that lie in [lo, hi], as NC lane masks.
inline void visible(int j0, int lo, int hi, vmask m[NC]) {
  for (int v = 0; v < NC; ++v) m[v] = lanes_in(j0 + L * v, lo, hi);
}

// RoPE in Hugging Face's rotate-half layout, with the sign folded into sin's first half:
// y = x * cos + roll(x, hd/2) * sin. Tables are fp32 rows (B, T, hd) with strides (rb, rt).
struct Rope {
  const float* cos;
  const float* sin;
  long rb, rt;
  const float* c(int b, int t) const { return cos + b * rb + (long)t * rt; }
  const float* s(int b, int t) const { return sin + b * rb + (long)t * rt; }
};

// Rotates one row of hd values in fp32 (lo, hi halves) into dst.
template <class E>
inline void rotate_row(const E* x, const float* c, const float* s, int hd, E* dst) {
  const int h2 = hd / 2;
  for (int d = 0; d < h2; d += L) {
    const vf lo = Io<E>::load(x + d), hi = Io<E>::load(x + d + h2);
    Io<E>::store(dst + d, add(mul(lo, load(c + d)), mul(hi, load(s + d))));
    Io<E>::store(dst + d + h2, add(mul(hi, load(c + d + h2)), mul(lo, load(s + d + h2))));
  }
}

// The gradient through the rotation, dx = dy * cos + roll(dy * sin, hd/2), of an fp32 row, rounded once.
template <class E>
inline void unrotate_row(const float* dy, const float* c, const float* s, int hd, E* dst) {
  const int h2 = hd / 2;
  for (int d = 0; d < h2; d += L) {
    const vf lo = load(dy + d), hi = load(dy + d + h2);
    Io<E>::store(dst + d, fmadd(lo, load(c + d), mul(hi, load(s + d + h2))));
    Io<E>::store(dst + d + h2, fmadd(hi, load(c + d + h2), mul(lo, load(s + d))));
  }
}

// out (B, T, n, hd) dense = RoPE(x), x (B, T, n, hd) with strides (sb, st, sh).
template <class E>
void rope_fwd(const E* x, long sb, long st, long sh, Rope r, E* out, int B, int T, int n, int hd, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (long bt = 0; bt < (long)B * T; ++bt) {
    const int b = bt / T, t = bt % T;
    for (int h = 0; h < n; ++h) rotate_row(x + b * sb + t * st + h * sh, r.c(b, t), r.s(b, t), hd, out + (bt * n + h) * hd);
  }
}

template <class E>
void fwd(const E* q, long qsb, long qst, long qsh, const E* k, long ksb, long kst, long ksh, const E* v, long vsb,
         long vst, long vsh, const int32_t* seg, E* out, float* lse, int B, int T, int H, int K, int hd, int window,
         float scale, int nthreads) {
  constexpr int W = El<E>::W;
  const int Tp = (T + BN - 1) / BN * BN, G = H / K, nqb = (T + BM - 1) / BM, hw = hd / W;
  std::vector<u32> KT((size_t)B * K * hw * Tp), VP((size_t)B * K * (Tp / W) * hd);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int bk = 0; bk < B * K; ++bk) {
    const int b = bk / K, kh = bk % K;
    pack_transposed(k + b * ksb + kh * ksh, kst, T, hd, Tp, KT.data() + (size_t)bk * hw * Tp);
    pack_rows(v + b * vsb + kh * vsh, vst, T, hd, Tp, VP.data() + (size_t)bk * (Tp / W) * hd);
  }
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> S(BM * BN), O(BM * hd), m(BM), l(BM);
    std::vector<E> P(BM * BN);
    std::vector<int> lo(BM);
#pragma omp for schedule(dynamic)
    for (long item = 0; item < (long)B * H * nqb; ++item) {
      const int b = item / (H * nqb), h = (item / nqb) % H, i0 = (item % nqb) * BM, M = std::min(BM, T - i0);
      const long bk = (long)b * K + h / G;
      const int32_t* sg = seg ? seg + (long)b * T : nullptr;
      const u32* A = (const u32*)(q + b * qsb + (long)i0 * qst + h * qsh);
      int first = i0;
      for (int r = 0; r < M; ++r) {
        lo[r] = lowest_key(sg, i0 + r, window);
        first = std::min(first, lo[r]);
        m[r] = -INFINITY;
        l[r] = 0.f;
      }
      std::fill(O.begin(), O.end(), 0.f);
      for (int j0 = first / BN * BN; j0 < i0 + M; j0 += BN) {
        gemm<E>(M, BN, hw, A, qst / W, 1, KT.data() + bk * hw * Tp + j0, Tp, S.data(), BN, false);
        for (int r = 0; r < M; ++r) {
          vmask vis[NC];
          visible(j0, lo[r], i0 + r, vis);
          vf x[NC];
          vf mx = set1(-INFINITY);
          for (int c = 0; c < NC; ++c) {
            x[c] = mul(load(S.data() + r * BN + L * c), set1(scale));
            mx = max_where(mx, vis[c], x[c]);
          }
          const float rowmax = hmax(mx);
          E* pr = P.data() + r * BN;
          if (rowmax == -INFINITY) {  // no visible key in this tile
            std::memset(pr, 0, BN * sizeof(E));
            continue;
          }
          const float mnew = std::max(m[r], rowmax), alpha = std::exp(m[r] - mnew);
          vf sum = zero();
          for (int c = 0; c < NC; ++c) {
            vf p = keep(vis[c], exp_ps(sub(x[c], set1(mnew))));
            sum = add(sum, p);
            Io<E>::store(pr + L * c, p);
          }
          l[r] = l[r] * alpha + hsum(sum);
          m[r] = mnew;
          if (alpha != 1.f)
            for (int d = 0; d < hd; d += L) store(O.data() + r * hd + d, mul(load(O.data() + r * hd + d), set1(alpha)));
        }
        gemm<E>(M, hd, BN / W, (const u32*)P.data(), BN / W, 1, VP.data() + bk * (Tp / W) * hd + (j0 / W) * hd, hd,
                O.data(), hd, true);
      }
      for (int r = 0; r < M; ++r) {
        const vf inv = set1(1.f / l[r]);
        E* o = out + (((long)b * T + i0 + r) * H + h) * hd;
        for (int d = 0; d < hd; d += L) Io<E>::store(o + d, mul(load(O.data() + r * hd + d), inv));
        lse[((long)b * H + h) * T + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  }
}

// out, dout dense (B, T, H, hd); dq dense (B, T, H, hd); dk, dv dense (B, T, K, hd).
template <class E>
void bwd(const E* q, long qsb, long qst, long qsh, const E* k, long ksb, long kst, long ksh, const E* v, long vsb,
         long vst, long vsh, const int32_t* seg, const E* out, const E* dout, const float* lse, E* dq, E* dk, E* dv,
         const Rope* rope, int B, int T, int H, int K, int hd, int window, float scale, int nthreads) {
  constexpr int W = El<E>::W;
  const int Tp = (T + BN - 1) / BN * BN, G = H / K, hw = hd / W;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<u32> KT(hw * Tp), VT(hw * Tp), KR(Tp / W * hd), QR(Tp / W * hd), DOR(Tp / W * hd);
    std::vector<u32> PV(BM / W * BN), DSV(BM / W * BN);
    std::vector<E> DSBbuf(W == 2 ? BM * BN : 0);
    E* DSB = W == 2 ? DSBbuf.data() : (E*)DSV.data();
    std::vector<float> D(Tp), dQ(Tp * hd), dK(Tp * hd), dV(Tp * hd), S(BM * BN), dP(BM * BN);
    std::vector<int> lo(Tp);
#pragma omp for schedule(dynamic)
    for (int bk = 0; bk < B * K; ++bk) {
      const int b = bk / K, kh = bk % K;
      const int32_t* sg = seg ? seg + (long)b * T : nullptr;
      const E* kb = k + b * ksb + kh * ksh;
      pack_transposed(kb, kst, T, hd, Tp, KT.data());
      pack_transposed(v + b * vsb + kh * vsh, vst, T, hd, Tp, VT.data());
      pack_rows(kb, kst, T, hd, Tp, KR.data());
      std::fill(dK.begin(), dK.end(), 0.f);
      std::fill(dV.begin(), dV.end(), 0.f);
      for (int i = 0; i < T; ++i) lo[i] = lowest_key(sg, i, window);
      for (int g = 0; g < G; ++g) {
        const int h = kh * G + g;
        const E* qb = q + b * qsb + h * qsh;
        const E* ob = out + ((long)b * T * H + h) * hd;
        const E* gb = dout + ((long)b * T * H + h) * hd;
        const float* Lse = lse + ((long)b * H + h) * T;
        pack_rows(qb, qst, T, hd, Tp, QR.data());
        pack_rows(gb, (long)H * hd, T, hd, Tp, DOR.data());
        for (int i = 0; i < T; ++i) {  // D_i = dO_i . O_i
          vf s = zero();
          for (int d = 0; d < hd; d += L) s = fmadd(Io<E>::load(gb + (long)i * H * hd + d), Io<E>::load(ob + (long)i * H * hd + d), s);
          D[i] = hsum(s);
        }
        std::fill(dQ.begin(), dQ.end(), 0.f);
        for (int j0 = 0; j0 < T; j0 += BN) {
          const int jl = std::min(j0 + BN, T) - 1;
          int iend = j0;  // lo(i) is non-decreasing, so the rows that see this tile are a run from j0
          while (iend < T && lo[iend] <= jl) ++iend;
          for (int i0 = j0 / BM * BM; i0 < iend; i0 += BM) {
            const int M = std::min(BM, T - i0), Mp = (M + W - 1) / W * W;
            gemm<E>(M, BN, hw, (const u32*)(qb + (long)i0 * qst), qst / W, 1, KT.data() + j0, Tp, S.data(), BN, false);
            gemm<E>(M, BN, hw, (const u32*)(gb + (long)i0 * H * hd), (long)H * hd / W, 1, VT.data() + j0, Tp, dP.data(),
                    BN, false);
            for (int r = 0; r < Mp; r += W) {  // W rows at a time: a bf16 word interleaves two rows
              vmask vis[W][NC];
              vf li[W], di[W];
              for (int t = 0; t < W; ++t) {
                const int rr = r + t, i = i0 + rr;
                for (int c = 0; c < NC; ++c) vis[t][c] = no_lanes();
                if (rr < M) visible(j0, lo[i], i, vis[t]);
                li[t] = set1(rr < M ? Lse[i] : 0.f);
                di[t] = set1(rr < M ? D[i] : 0.f);
              }
              for (int c = 0; c < NC; ++c) {
                vf p[W], ds[W];
                for (int t = 0; t < W; ++t) {
                  const vf sc = load(S.data() + (r + t) * BN + L * c);
                  p[t] = keep(vis[t][c], exp_ps(fmsub(sc, set1(scale), li[t])));
                  const vf dpv = load(dP.data() + (r + t) * BN + L * c);
                  ds[t] = mul(mul(p[t], sub(dpv, di[t])), set1(scale));
                }
                put_rows(p, ds, r, L * c, r + 1 < M, PV.data(), DSV.data(), DSB);
              }
            }
            // dV_j += P^T dO_i, dK_j += dS^T Q_i: A is the word-row buffer read down its columns.
            gemm<E>(BN, hd, Mp / W, PV.data(), 1, BN, DOR.data() + (i0 / W) * hd, hd, dV.data() + (long)j0 * hd, hd, true);
            gemm<E>(BN, hd, Mp / W, DSV.data(), 1, BN, QR.data() + (i0 / W) * hd, hd, dK.data() + (long)j0 * hd, hd, true);
            gemm<E>(M, hd, BN / W, (const u32*)DSB, BN / W, 1, KR.data() + (j0 / W) * hd, hd, dQ.data() + (long)i0 * hd,
                    hd, true);
          }
        }
        for (int i = 0; i < T; ++i) {
          E* dqi = dq + (((long)b * T + i) * H + h) * hd;
          if (rope)
            unrotate_row(dQ.data() + (long)i * hd, rope->c(b, i), rope->s(b, i), hd, dqi);
          else
            for (int d = 0; d < hd; d += L) Io<E>::store(dqi + d, load(dQ.data() + (long)i * hd + d));
        }
      }
      for (int j = 0; j < T; ++j) {
        const long o = (((long)b * T + j) * K + kh) * hd;
        if (rope) unrotate_row(dK.data() + (long)j * hd, rope->c(b, j), rope->s(b, j), hd, dk + o);
        for (int d = 0; d < hd; d += L) {
          if (!rope) Io<E>::store(dk + o + d, load(dK.data() + (long)j * hd + d));
          Io<E>::store(dv + o + d, load(dV.data() + (long)j * hd + d));
        }
      }
    }
  }
}

}  // namespace

extern "C" {

int yq_attn_version() { return 3; }

#define YQ_ATTN(SUFFIX, E)                                                                                          \
  void yq_attn_fwd_##SUFFIX(const E* q, long qsb, long qst, long qsh, const E* k, long ksb, long kst, long ksh,     \
                            const E* v, long vsb, long vst, long vsh, const int32_t* seg, E* out, float* lse, int B, \
                            int T, int H, int K, int hd, int window, float scale, int nthreads) {                    \
    fwd<E>(q, qsb, qst, qsh, k, ksb, kst, ksh, v, vsb, vst, vsh, seg, out, lse, B, T, H, K, hd, window, scale,       \
           nthreads);                                                                                               \
  }                                                                                                                 \
  /* cos == null: no RoPE in backward; else dq/dk are taken back through it (q/k were rotated by yq_rope). */      \
  void yq_attn_bwd_##SUFFIX(const E* q, long qsb, long qst, long qsh, const E* k, long ksb, long kst, long ksh,     \
                            const E* v, long vsb, long vst, long vsh, const int32_t* seg, const E* out,             \
                            const E* dout, const float* lse, E* dq, E* dk, E* dv, const float* cos,                 \
                            const float* sin, long rb, long rt, int B, int T, int H, int K, int hd, int window,     \
                            float scale, int nthreads) {                                                            \
    const Rope rope{cos, sin, rb, rt};                                                                              \
    bwd<E>(q, qsb, qst, qsh, k, ksb, kst, ksh, v, vsb, vst, vsh, seg, out, dout, lse, dq, dk, dv,                   \
           cos ? &rope : nullptr, B, T, H, K, hd, window, scale, nthreads);                                         \
  }                                                                                                                 \
  void yq_rope_##SUFFIX(const E* x, long sb, long st, long sh, const float* cos, const float* sin, long rb,        \
                        long rt, E* out, int B, int T, int n, int hd, int nthreads) {                               \
    rope_fwd<E>(x, sb, st, sh, Rope{cos, sin, rb, rt}, out, B, T, n, hd, nthreads);                                 \
  }

YQ_ATTN(f32, float)
#ifndef YQ_AVX2
YQ_ATTN(bf16, bf16)
#endif

}  // extern "C"
