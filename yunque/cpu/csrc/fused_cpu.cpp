// The MLP's SwiGLU and the RMSNorm as single passes, forward and backward, bf16 or fp32.
//
// Why: as PyTorch ops, SwiGLU is silu, a product and its temporaries, recomputed in backward
// (silu again, silu_backward and two products), and RMSNorm is a square, a mean, an rsqrt, two
// products and a cast, each a pass over the activations: together ~7% of a bf16 LoRA step of a
// 56M model at seq 512 x 4. Here each is one pass that reads its inputs once.
//
// Numerics follow the PyTorch ops they replace, rounding where those round (silu's output and
// each product in bf16); silu's exp is yq::exp_ps (~1 ulp), so a bf16 result may differ from
// PyTorch's in its last bit for a few elements in 10^5.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

using yq::bf16;
using yq::exp_ps;
using yq::Io;
using yq::tail;

namespace {

constexpr long CHUNK = 4096;  // elements per work item: elementwise, so results do not depend on the split

// 1 + e^-x: silu(x) = x / it and sigmoid(x) = 1 / it, divided as PyTorch divides.
inline __m512 silu_den(__m512 x) { return _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))); }

// out = silu(gate) * up, silu(gate) rounded to E first (F.silu(gate) * up).
template <class E>
void swiglu_fwd(const E* gate, const E* up, E* out, long n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (long c = 0; c < n; c += CHUNK) {
    const long end = std::min(n, c + CHUNK);
    for (long j = c; j < end; j += 16) {
      const __mmask16 m = tail(end, j);
      const __m512 x = Io<E>::load(gate + j, m);
      const __m512 s = Io<E>::round(_mm512_div_ps(x, silu_den(x)));
      Io<E>::store(out + j, _mm512_mul_ps(s, Io<E>::load(up + j, m)), m);
    }
  }
}

// d_up = g * silu(gate); d_gate = silu_backward(g * up, gate), with the products rounded to E as
// autograd rounds them. Either output may be null.
template <class E>
void swiglu_bwd(const E* g, const E* gate, const E* up, E* dgate, E* dup, long n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (long c = 0; c < n; c += CHUNK) {
    const long end = std::min(n, c + CHUNK);
    for (long j = c; j < end; j += 16) {
      const __mmask16 m = tail(end, j);
      const __m512 x = Io<E>::load(gate + j, m), gv = Io<E>::load(g + j, m), one = _mm512_set1_ps(1.f);
      const __m512 den = silu_den(x);  // shared by both gradients
      if (dup) Io<E>::store(dup + j, _mm512_mul_ps(gv, Io<E>::round(_mm512_div_ps(x, den))), m);
      if (dgate) {
        const __m512 gu = Io<E>::round(_mm512_mul_ps(gv, Io<E>::load(up + j, m)));
        const __m512 sg = _mm512_div_ps(one, den);
        // grad * (sig * (1 + x * (1 - sig))), as aten's silu_backward
        const __m512 d = _mm512_mul_ps(sg, _mm512_fmadd_ps(x, _mm512_sub_ps(one, sg), one));
        Io<E>::store(dgate + j, _mm512_mul_ps(gu, d), m);
      }
    }
  }
}

// y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps) per row of D; x, w fp32 (HF normalises in
// fp32), y in O (the autocast dtype: the cast every consumer would make is made here once).
template <class O>
void rms_fwd(const float* x, const float* w, O* y, float* r, long rows, int D, float eps, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (long i = 0; i < rows; ++i) {
    const float* xi = x + i * D;
    __m512 ss = _mm512_setzero_ps();
    for (int j = 0; j < D; j += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(tail(D, j), xi + j);
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const float ri = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / D + eps);
    r[i] = ri;
    for (int j = 0; j < D; j += 16) {
      const __mmask16 m = tail(D, j);
      const __m512 n = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xi + j), _mm512_set1_ps(ri));
      Io<O>::store(y + i * D + j, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + j), n), m);
    }
  }
}

constexpr int RMS_BLOCK = 64;  // rows per partial weight-gradient sum: a fixed order for any thread count

// gx = r * (g*w - n * mean(g*w * n)), n = x * r; gw = sum over rows of g * n (gw may be null).
template <class O>
void rms_bwd(const O* g, const float* x, const float* w, const float* r, float* gx, float* gw, long rows, int D,
             int nthreads) {
  const long nb = (rows + RMS_BLOCK - 1) / RMS_BLOCK;
  std::vector<float> part(gw ? nb * D : 0);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (long b = 0; b < nb; ++b) {
    float* pb = gw ? part.data() + b * D : nullptr;
    if (pb) std::fill(pb, pb + D, 0.f);
    for (long i = b * RMS_BLOCK; i < std::min(rows, (b + 1) * RMS_BLOCK); ++i) {
      const float* xi = x + i * D;
      const O* gi = g + i * D;
      const __m512 ri = _mm512_set1_ps(r[i]);
      __m512 dot = _mm512_setzero_ps();
      for (int j = 0; j < D; j += 16) {
        const __mmask16 m = tail(D, j);
        const __m512 n = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xi + j), ri), gv = Io<O>::load(gi + j, m);
        dot = _mm512_fmadd_ps(_mm512_mul_ps(gv, _mm512_maskz_loadu_ps(m, w + j)), n, dot);
        if (pb) _mm512_mask_storeu_ps(pb + j, m, _mm512_fmadd_ps(gv, n, _mm512_maskz_loadu_ps(m, pb + j)));
      }
      const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / D);
      for (int j = 0; j < D; j += 16) {
        const __mmask16 m = tail(D, j);
        const __m512 n = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xi + j), ri);
        const __m512 gn = _mm512_mul_ps(Io<O>::load(gi + j, m), _mm512_maskz_loadu_ps(m, w + j));
        _mm512_mask_storeu_ps(gx + i * D + j, m, _mm512_mul_ps(ri, _mm512_fnmadd_ps(n, mean, gn)));
      }
    }
  }
  if (gw) {
    std::fill(gw, gw + D, 0.f);
    for (long b = 0; b < nb; ++b)
      for (int j = 0; j < D; ++j) gw[j] += part[b * D + j];
  }
}

}  // namespace

extern "C" {

void yq_rms_fwd_bf16(const float* x, const float* w, bf16* y, float* r, long rows, int D, float eps, int nt) {
  rms_fwd(x, w, y, r, rows, D, eps, nt);
}
void yq_rms_fwd_f32(const float* x, const float* w, float* y, float* r, long rows, int D, float eps, int nt) {
  rms_fwd(x, w, y, r, rows, D, eps, nt);
}
void yq_rms_bwd_bf16(const bf16* g, const float* x, const float* w, const float* r, float* gx, float* gw, long rows,
                     int D, int nt) {
  rms_bwd(g, x, w, r, gx, gw, rows, D, nt);
}
void yq_rms_bwd_f32(const float* g, const float* x, const float* w, const float* r, float* gx, float* gw, long rows,
                    int D, int nt) {
  rms_bwd(g, x, w, r, gx, gw, rows, D, nt);
}

void yq_swiglu_fwd_bf16(const bf16* gate, const bf16* up, bf16* out, long n, int nt) { swiglu_fwd(gate, up, out, n, nt); }
void yq_swiglu_fwd_f32(const float* gate, const float* up, float* out, long n, int nt) { swiglu_fwd(gate, up, out, n, nt); }
void yq_swiglu_bwd_bf16(const bf16* g, const bf16* gate, const bf16* up, bf16* dgate, bf16* dup, long n, int nt) {
  swiglu_bwd(g, gate, up, dgate, dup, n, nt);
}
void yq_swiglu_bwd_f32(const float* g, const float* gate, const float* up, float* dgate, float* dup, long n, int nt) {
  swiglu_bwd(g, gate, up, dgate, dup, n, nt);
}

}  // extern "C"
