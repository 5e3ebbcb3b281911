// Cross-entropy of bf16 or fp32 logits and its gradient, in place, for x86 CPUs with AVX-512
// (bf16 and fp32) or AVX2 + FMA (fp32: the build with YQ_AVX2, simd.h).
//
// Why: the output head's softmax was three to four passes over fp32 copies of a (rows, vocab)
// chunk (log_softmax, exp into bf16, the casts between them): at a 128k vocabulary ~10% of a
// bf16 LoRA step, memory-bound. Here each row (256 KB at 128k) is read once from memory and
// twice more from L2: max, sum of exponentials, then softmax - onehot written over the logits.
// Numerics are log_softmax's: fp32 throughout, one rounding to bf16 of the gradient. In fp32 it
// saves the (rows, vocab) log-probabilities temporary and two of its passes.

#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>

#include "simd.h"

using namespace yq;

namespace {

// logits (N, V) row stride ld; loss[i] = logsumexp(row i) - row i [target i]. With grad, row i
// becomes softmax(row i) with 1 subtracted at the target, rounded to E.
template <class E>
void xent(E* logits, long ld, const int64_t* targets, float* loss, int N, int V, int grad, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int i = 0; i < N; ++i) {
    E* x = logits + (long)i * ld;
    vf mx = set1(-INFINITY);
    for (int j = 0; j < V; j += L) {
      const vmask m = tail(V, j);
      mx = max_where(mx, m, Io<E>::load(x + j, m));
    }
    const float rowmax = hmax(mx);
    vf s = zero();
    for (int j = 0; j < V; j += L) {
      const vmask m = tail(V, j);
      s = add(s, keep(m, exp_ps(sub(Io<E>::load(x + j, m), set1(rowmax)))));
    }
    const float lse = rowmax + std::log(hsum(s));
    const float at_target = Io<E>::get(x + targets[i]) - lse;  // log p(y)
    loss[i] = -at_target;
    if (!grad) continue;
    for (int j = 0; j < V; j += L) {
      const vmask m = tail(V, j);
      Io<E>::store(x + j, exp_ps(sub(Io<E>::load(x + j, m), set1(lse))), m);
    }
    Io<E>::put(x + targets[i], std::exp(at_target) - 1.0f);  // redone from fp32, as the target entry
  }
}

}  // namespace

extern "C" {

void yq_xent_f32(float* logits, long ld, const int64_t* targets, float* loss, int N, int V, int grad, int nthreads) {
  xent(logits, ld, targets, loss, N, V, grad, nthreads);
}
#ifndef YQ_AVX2
void yq_xent_bf16(bf16* logits, long ld, const int64_t* targets, float* loss, int N, int V, int grad, int nthreads) {
  xent(logits, ld, targets, loss, N, V, grad, nthreads);
}
#endif

}  // extern "C"
