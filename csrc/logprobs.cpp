// Log-prob row passes on CPU for the fused LM-head log-prob op: the matmul that produces a chunk of
// logits runs in MKL (torch.mm in the Python wrapper); these passes turn one [n, V] fp32 logits
// chunk into per-row log-prob / entropy / log-sum-exp (forward), or in place into grad_logits
// (backward). OpenMP over rows; the inner loops use a polynomial expf written in plain float
// arithmetic so the compiler vectorises it (target_clones picks AVX-512 / AVX2 at load time).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "fast_math.h"
#include "ops.h"

namespace rlhf_fast {

RLHF_FAST_CLONES
void logprob_rows_fwd_f32(const float* logits, const int64_t* labels, float* logp, float* entropy, float* lse,
                          int64_t n, int64_t V, int64_t ld, float inv_temperature, int64_t ignore_index) {
#pragma omp parallel for schedule(static) if (n * V > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const float* x = logits + i * ld;
    const int64_t y = labels[i];
    // Pass 1: row max of the raw logits (temperature > 0 keeps the argmax); NaN is tracked apart
    // because max() would drop it.
    // Kept in kLanes independent lanes: a plain max reduction does not vectorise without
    // -ffast-math (NaN ordering), an elementwise max across lanes does.
    constexpr int kLanes = 16;
    float mv[kLanes];
    int32_t nv[kLanes];
    for (int k = 0; k < kLanes; ++k) {
      mv[k] = -std::numeric_limits<float>::infinity();
      nv[k] = 0;
    }
    int64_t j0 = 0;
    for (; j0 + kLanes <= V; j0 += kLanes) {
#pragma omp simd
      for (int k = 0; k < kLanes; ++k) {
        const float v = x[j0 + k];
        mv[k] = v > mv[k] ? v : mv[k];
        nv[k] |= v != v;
      }
    }
    for (int64_t j = j0; j < V; ++j) {
      mv[0] = x[j] > mv[0] ? x[j] : mv[0];
      nv[0] |= x[j] != x[j];
    }
    float m = mv[0];
    bool nan = nv[0] != 0;
    for (int k = 1; k < kLanes; ++k) {
      m = mv[k] > m ? mv[k] : m;
      nan |= nv[k] != 0;
    }
    const float mz = m * inv_temperature;
    // Pass 2: s = sum exp(z - mz), t = sum exp(z - mz) * (z - mz), z = x / T.
    float s = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, t)
    for (int64_t j = 0; j < V; ++j) {
      const float d = x[j] * inv_temperature - mz;
      const float e = exp_nonpos(d);
      s += e;
      t += d == -std::numeric_limits<float>::infinity() ? 0.0f : e * d;  // 0 * -inf is 0 here
    }
    const float log_s = std::log(s);
    float row_lse = mz + log_s;
    if (nan || std::isinf(m)) row_lse = std::numeric_limits<float>::quiet_NaN();  // NaN, or an all -inf / +inf row
    lse[i] = row_lse;
    if (y == ignore_index) {
      logp[i] = 0.0f;
      if (entropy) entropy[i] = 0.0f;
      continue;
    }
    logp[i] = x[y] * inv_temperature - row_lse;
    // entropy = lse - sum p z = log s - t / s
    if (entropy) entropy[i] = nan ? row_lse : log_s - t / s;
  }
}

RLHF_FAST_CLONES
void logprob_rows_bwd_f32(float* logits, const int64_t* labels, const float* lse, const float* entropy,
                          const float* grad_logp, const float* grad_entropy, int64_t n, int64_t V, int64_t ld,
                          float inv_temperature, int64_t ignore_index) {
#pragma omp parallel for schedule(static) if (n * V > 65536)
  for (int64_t i = 0; i < n; ++i) {
    float* x = logits + i * ld;
    const int64_t y = labels[i];
    if (y == ignore_index) {
      std::memset(x, 0, sizeof(float) * V);
      continue;
    }
    const float L = lse[i];
    const float gl = grad_logp ? grad_logp[i] : 0.0f;
    const float ge = grad_entropy ? grad_entropy[i] : 0.0f;
    // d logp / dz_j = 1[j=y] - p_j;  d H / dz_j = -p_j (z_j - sum p z).
    // Both then carry 1/T to the raw logits.
    if (ge != 0.0f) {
      const float H = entropy[i];
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        const float d = x[j] * inv_temperature - L;  // log p; z - sum p z = log p + H (no large cancellation)
        const float p = exp_nonpos(d);
        x[j] = p == 0.0f ? 0.0f : -p * (gl + ge * (d + H)) * inv_temperature;  // z = -inf: 0, not 0 * inf
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        const float z = x[j] * inv_temperature;
        x[j] = -exp_nonpos(z - L) * gl * inv_temperature;
      }
    }
    x[y] += gl * inv_temperature;
  }
}

}  // namespace rlhf_fast
