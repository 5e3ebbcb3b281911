// The MLP's SwiGLU and the RMSNorm as single passes, forward and backward, bf16 or fp32 on
// AVX-512 (AVX512-BF16), fp32 on AVX2 + FMA (the build with YQ_AVX2: simd.h).
//
// Why: as PyTorch ops, SwiGLU is silu, a product and its temporaries, recomputed in backward
// (silu again, silu_backward and two products), and RMSNorm is a square, a mean, an rsqrt, two
// products and a cast, each a pass over the activations: together ~7% of a bf16 LoRA step of a
// 56M model at seq 512 x 4. Here each is one pass that reads its inputs once, in fp32 on AVX2-only
// CPUs too (the YQ_AVX2 build; bench/NOTES.md, "AVX2 build of the CPU kernels").
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

using namespace yq;

namespace {

constexpr long CHUNK = 4096;  // elements per work item: elementwise, so results do not depend on the split

// 1 + e^-x: silu(x) = x / it and sigmoid(x) = 1 / it, divided as PyTorch divides.
inline vf silu_den(vf x) { return add(set1(1.f), exp_ps(sub(zero(), x))); }

// out = silu(gate) * up, silu(gate) rounded to E first (F.silu(gate) * up).
template <class E>
void swiglu_fwd(const E* gate, const E* up, E* out, long n, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (long c = 0; c < n; c += CHUNK) {
    const long end = std::min(n, c + CHUNK);
    for (long j = c; j < end; j += L) {
      const vmask m = tail(end, j);
      const vf x = Io<E>::load(gate + j, m);
      const vf s = Io<E>::round(div(x, silu_den(x)));
      Io<E>::store(out + j, mul(s, Io<E>::load(up + j, m)), m);
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
    for (long j = c; j < end; j += L) {
      const vmask m = tail(end, j);
      const vf x = Io<E>::load(gate + j, m), gv = Io<E>::load(g + j, m), one = set1(1.f);
      const vf den = silu_den(x);  // shared by both gradients
      if (dup) Io<E>::store(dup + j, mul(gv, Io<E>::round(div(x, den))), m);
      if (dgate) {
        const vf gu = Io<E>::round(mul(gv, Io<E>::load(up + j, m)));
        const vf sg = div(one, den);
        // grad * (sig * (1 + x * (1 - sig))), as aten's silu_backward
        const vf d = mul(sg, fmadd(x, sub(one, sg), one));
        Io<E>::store(dgate + j, mul(gu, d), m);
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
    vf ss = zero();
    for (int j = 0; j < D; j += L) {
      const vf v = load(xi + j, tail(D, j));
      ss = fmadd(v, v, ss);
    }
    const float ri = 1.f / std::sqrt(hsum(ss) / D + eps);
    r[i] = ri;
    for (int j = 0; j < D; j += L) {
      const vmask m = tail(D, j);
      const vf n = mul(load(xi + j, m), set1(ri));
      Io<O>::store(y + i * D + j, mul(load(w + j, m), n), m);
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
      const vf ri = set1(r[i]);
      vf dot = zero();
      for (int j = 0; j < D; j += L) {
        const vmask m = tail(D, j);
        const vf n = mul(load(xi + j, m), ri), gv = Io<O>::load(gi + j, m);
        dot = fmadd(mul(gv, load(w + j, m)), n, dot);
        if (pb) store(pb + j, fmadd(gv, n, load(pb + j, m)), m);
      }
      const vf mean = set1(hsum(dot) / D);
      for (int j = 0; j < D; j += L) {
        const vmask m = tail(D, j);
        const vf n = mul(load(xi + j, m), ri);
        const vf gn = mul(Io<O>::load(gi + j, m), load(w + j, m));
        store(gx + i * D + j, mul(ri, fnmadd(n, mean, gn)), m);
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

int yq_lanes() { return L; }  // 16: the AVX-512 build; 8: the AVX2 build

void yq_rms_fwd_f32(const float* x, const float* w, float* y, float* r, long rows, int D, float eps, int nt) {
  rms_fwd(x, w, y, r, rows, D, eps, nt);
}
void yq_rms_bwd_f32(const float* g, const float* x, const float* w, const float* r, float* gx, float* gw, long rows,
                    int D, int nt) {
  rms_bwd(g, x, w, r, gx, gw, rows, D, nt);
}
void yq_swiglu_fwd_f32(const float* gate, const float* up, float* out, long n, int nt) { swiglu_fwd(gate, up, out, n, nt); }
void yq_swiglu_bwd_f32(const float* g, const float* gate, const float* up, float* dgate, float* dup, long n, int nt) {
  swiglu_bwd(g, gate, up, dgate, dup, n, nt);
}

#ifndef YQ_AVX2
void yq_rms_fwd_bf16(const float* x, const float* w, bf16* y, float* r, long rows, int D, float eps, int nt) {
  rms_fwd(x, w, y, r, rows, D, eps, nt);
}
void yq_rms_bwd_bf16(const bf16* g, const float* x, const float* w, const float* r, float* gx, float* gw, long rows,
                     int D, int nt) {
  rms_bwd(g, x, w, r, gx, gw, rows, D, nt);
}
void yq_swiglu_fwd_bf16(const bf16* gate, const bf16* up, bf16* out, long n, int nt) { swiglu_fwd(gate, up, out, n, nt); }
void yq_swiglu_bwd_bf16(const bf16* g, const bf16* gate, const bf16* up, bf16* dgate, bf16* dup, long n, int nt) {
  swiglu_bwd(g, gate, up, dgate, dup, n, nt);
}
#endif

}  // extern "C"
