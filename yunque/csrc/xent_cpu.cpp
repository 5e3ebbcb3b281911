// Cross-entropy of bf16 logits and its gradient, in place, for x86 CPUs with AVX-512.
//
// Why: the output head's softmax was three to four passes over fp32 copies of a (rows, vocab)
// chunk (log_softmax, exp into bf16, the casts between them): at a 128k vocabulary ~10% of a
// bf16 LoRA step, memory-bound. Here each row (256 KB at 128k) is read once from memory and
// twice more from L2: max, sum of exponentials, then softmax - onehot written over the logits.
// Numerics are log_softmax's: fp32 throughout, one rounding to bf16 of the gradient.

#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>

#include "simd.h"

using yq::bf16;

namespace {

inline float to_float(bf16 x) {
  uint32_t u = (uint32_t)x << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

}  // namespace

extern "C" {

// logits (N, V) row stride ld; loss[i] = logsumexp(row i) - row i [target i]. With grad, row i
// becomes softmax(row i) with 1 subtracted at the target, rounded to bf16.
void yq_xent_bf16(bf16* logits, long ld, const int64_t* targets, float* loss, int N, int V, int grad, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int i = 0; i < N; ++i) {
    bf16* x = logits + (long)i * ld;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < V; j += 16) {
      const __mmask16 m = V - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - j)) - 1);
      mx = _mm512_mask_max_ps(mx, m, mx, yq::load_bf16(x + j, m));
    }
    const float rowmax = _mm512_reduce_max_ps(mx);
    __m512 s = _mm512_setzero_ps();
    for (int j = 0; j < V; j += 16) {
      const __mmask16 m = V - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - j)) - 1);
      s = _mm512_add_ps(s, _mm512_maskz_mov_ps(m, yq::exp_ps(_mm512_sub_ps(yq::load_bf16(x + j, m), _mm512_set1_ps(rowmax)))));
    }
    const float lse = rowmax + std::log(_mm512_reduce_add_ps(s));
    const float at_target = to_float(x[targets[i]]) - lse;  // log p(y)
    loss[i] = -at_target;
    if (!grad) continue;
    for (int j = 0; j < V; j += 16) {
      const __mmask16 m = V - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - j)) - 1);
      const __m512 p = yq::exp_ps(_mm512_sub_ps(yq::load_bf16(x + j, m), _mm512_set1_ps(lse)));
      _mm256_mask_storeu_epi16(x + j, m, yq::to_bf16(p));
    }
    const __m512 g = _mm512_set1_ps(std::exp(at_target) - 1.0f);  // redone from fp32, as the target entry
    bf16 gy[16];
    _mm256_storeu_si256((__m256i*)gy, yq::to_bf16(g));
    x[targets[i]] = gy[0];
  }
}

}  // extern "C"
