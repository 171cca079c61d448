// Log-prob row passes on CPU for the fused LM-head log-prob op: the matmul that produces a chunk of
// logits runs in MKL (torch.mm in the Python wrapper); these passes turn one [n, V] fp32 logits
// chunk into per-row log-prob / entropy / log-sum-exp (forward), or in place into grad_logits
// (backward). OpenMP over rows; the inner loops use a polynomial expf written in plain float
// arithmetic so the compiler vectorises it (target_clones picks AVX-512 / AVX2 at load time).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RLHF_FAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RLHF_FAST_CLONES
#endif

namespace rlhf_fast {
namespace {

// expf for x <= 0 (every call site subtracts the row max first), |rel err| < 2e-7 on [-87, 0].
// exp(x) = 2^k * exp(r), k = round(x / ln2), r = x - k ln2 in [-ln2/2, ln2/2]; degree-6 Taylor/
// minimax polynomial for exp(r). Below -87 the result flushes to 0. NaN propagates through r.
inline float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : x;  // keeps 2^k a normal float; NaN compares false -> stays NaN
  const float kf = std::nearbyint(xc * 1.44269504088896341f);
  const float r = (xc - kf * 0.693359375f) + kf * 2.12194440e-4f;  // two-part ln2 (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x < -87.0f ? 0.0f : y;
}

}  // namespace

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
