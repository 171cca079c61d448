// RL element-wise ops and scans on CPU: KL penalty (+ backward), token rewards, GAE, whitening passes.
// OpenMP over rows (or over flat chunks for the element-wise ops). Every function that reads
// user data also counts the non-finite values it met on positions that matter (valid positions
// only), so the Python wrapper's finite check costs no extra pass over memory.
#include <cmath>
#include <cstdint>

#include "ops.h"

namespace rlhf_fast {

namespace {

constexpr float kLogRatioClamp = 20.0f;

// Clamp that lets NaN through (std::min/max would silently replace it with a bound).
inline float clamp_keep_nan(float x, float lo, float hi) { return x > hi ? hi : (x < lo ? lo : x); }

// The estimate for one log-ratio r (estimator ids match rlhf_fast.ops.kl.KL_ESTIMATORS).
inline float kl_estimate(float r, int estimator) {
  switch (estimator) {
    case 0:
      return r;
    case 1:
      return 0.5f * r * r;
    case 2: {
      // exp(-r) - 1 + r written with expm1 so small ratios keep their digits.
      const float rc = clamp_keep_nan(r, -kLogRatioClamp, kLogRatioClamp);
      return std::expm1(-rc) + rc;
    }
    default:
      return std::fabs(r);
  }
}

// d estimate / d r (before the output clamp). Zero outside the ±20 log-ratio clamp for k3,
// like torch.clamp's gradient; |r|' at 0 is 0 like torch.abs.
inline float kl_estimate_grad(float r, int estimator) {
  switch (estimator) {
    case 0:
      return 1.0f;
    case 1:
      return r;
    case 2:
      if (r > kLogRatioClamp || r < -kLogRatioClamp) return 0.0f;
      return -std::expm1(-r);
    default:
      return r > 0.0f ? 1.0f : (r < 0.0f ? -1.0f : 0.0f);
  }
}

constexpr int64_t kElemChunk = 1 << 14;

}  // namespace

int64_t kl_penalty_f32(const float* logp, const float* ref, float* out, int64_t n, int estimator, float clamp) {
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (n > 4 * kElemChunk)
  for (int64_t c0 = 0; c0 < n; c0 += kElemChunk) {
    const int64_t c1 = c0 + kElemChunk < n ? c0 + kElemChunk : n;
    for (int64_t i = c0; i < c1; ++i) {
      const float r = logp[i] - ref[i];
      bad += !std::isfinite(r);
      out[i] = clamp_keep_nan(kl_estimate(r, estimator), -clamp, clamp);
    }
  }
  return bad;
}

void kl_penalty_backward_f32(const float* logp, const float* ref, const float* grad_out, float* grad_logp,
                             float* grad_ref, int64_t n, int estimator, float clamp) {
#pragma omp parallel for schedule(static) if (n > 4 * kElemChunk)
  for (int64_t c0 = 0; c0 < n; c0 += kElemChunk) {
    const int64_t c1 = c0 + kElemChunk < n ? c0 + kElemChunk : n;
    for (int64_t i = c0; i < c1; ++i) {
      const float r = logp[i] - ref[i];
      const float est = kl_estimate(r, estimator);
      // The output clamp passes the gradient only inside [-clamp, clamp] (torch.clamp's rule).
      const float g = (est >= -clamp && est <= clamp) ? grad_out[i] * kl_estimate_grad(r, estimator) : 0.0f;
      if (grad_logp != nullptr) grad_logp[i] = g;
      if (grad_ref != nullptr) grad_ref[i] = -g;
    }
  }
}

int64_t token_rewards_f32(const float* scores, const float* kl, const uint8_t* mask, float* out, int64_t B,
                          int64_t T, float kl_coef) {
  int64_t bad = 0;
  const float neg_coef = -kl_coef;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (B * T > 65536)
  for (int64_t b = 0; b < B; ++b) {
    const float* klr = kl + b * T;
    const uint8_t* mr = mask + b * T;
    float* outr = out + b * T;
    int64_t last = -1;
    for (int64_t t = T - 1; t >= 0; --t) {
      if (mr[t]) {
        last = t;
        break;
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      const bool on = mr[t] != 0;
      bad += on && !std::isfinite(klr[t]);
      outr[t] = on ? neg_coef * klr[t] : 0.0f;
    }
    if (last >= 0) {
      bad += !std::isfinite(scores[b]);
      outr[last] += scores[b];
    }
  }
  return bad;
}

int64_t gae_f32(const float* rewards, const float* values, const uint8_t* mask, const float* bootstrap,
                float* advantages, float* returns, int64_t B, int64_t T, float gamma, float lam) {
  int64_t bad = 0;
  const float gamma_lam = gamma * lam;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (B * T > 65536)
  for (int64_t b = 0; b < B; ++b) {
    const float* rr = rewards + b * T;
    const float* vr = values + b * T;
    const uint8_t* mr = mask + b * T;
    float* ar = advantages + b * T;
    float* ret = returns + b * T;
    // Carried from the next valid position: its value (terminal 0, or the bootstrap value of a
    // truncated response) and its advantage. Masked positions leave both untouched.
    float next_value = bootstrap != nullptr ? bootstrap[b] : 0.0f;
    float next_adv = 0.0f;
    if (bootstrap != nullptr) bad += !std::isfinite(next_value);
    for (int64_t t = T - 1; t >= 0; --t) {
      if (mr[t]) {
        const float v = vr[t];
        const float delta = rr[t] + gamma * next_value - v;
        const float a = delta + gamma_lam * next_adv;
        bad += !std::isfinite(rr[t]) || !std::isfinite(v);
        ar[t] = a;
        ret[t] = a + v;
        next_value = v;
        next_adv = a;
      } else {
        ar[t] = 0.0f;
        ret[t] = 0.0f;
      }
    }
  }
  return bad;
}

int64_t masked_row_sqdev_f32(const float* x, const uint8_t* mask, float mean, float* sqdev, int64_t R, int64_t C) {
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (R * C > 32768)
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * C;
    const uint8_t* mr = mask + r * C;
    // Float partial sums per block folded into double, as in masked_row_sum_f32.
    double s = 0.0;
    constexpr int64_t kBlock = 1024;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
      float bs = 0.0f;
      for (int64_t c = c0; c < c1; ++c) {
        const float d = xr[c] - mean;
        bs += mr[c] ? d * d : 0.0f;
      }
      s += bs;
    }
    bad += !std::isfinite(s);
    sqdev[r] = static_cast<float>(s);
  }
  return bad;
}

void masked_affine_f32(const float* x, const uint8_t* mask, float* out, int64_t n, float mean, float scale,
                       float offset) {
#pragma omp parallel for schedule(static) if (n > 4 * kElemChunk)
  for (int64_t c0 = 0; c0 < n; c0 += kElemChunk) {
    const int64_t c1 = c0 + kElemChunk < n ? c0 + kElemChunk : n;
    for (int64_t i = c0; i < c1; ++i) out[i] = mask[i] ? (x[i] - mean) * scale + offset : 0.0f;
  }
}

}  // namespace rlhf_fast
