// PPO clipped policy loss and clipped value loss on CPU: one pass forward (per-row partial sums
// for the aggregation), one pass backward (per-token coefficient recomputed from the inputs).
// OpenMP over rows; the inner loops are branch-free selects the compiler can vectorise.
// Formulas and tie conventions: rlhf_fast/ops/ppo_loss.py (module docstring).
#include <cmath>

#include "ops.h"

namespace rlhf_fast {

namespace {

constexpr float kLogRatioClamp = 20.0f;

inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// x - x is 0 for finite x and NaN for NaN/inf.
inline bool non_finite(float x) { return (x - x) != 0.0f; }

struct PolicyToken {
  float log_ratio, ratio, unclipped, clipped, loss;
  bool clip_on, dual_on;
};

inline PolicyToken policy_token(float lp, float old, float a, float clip_low, float clip_high,
                                float dual_clip) {
  PolicyToken p;
  p.log_ratio = lp - old;
  p.ratio = std::exp(clampf(p.log_ratio, -kLogRatioClamp, kLogRatioClamp));
  p.unclipped = -a * p.ratio;
  p.clipped = -a * clampf(p.ratio, 1.0f - clip_low, 1.0f + clip_high);
  p.clip_on = p.clipped > p.unclipped;
  const float loss = p.clip_on ? p.clipped : p.unclipped;
  const float cap = -dual_clip * a;  // dual_clip = +inf disables: cap = +inf for a < 0
  p.dual_on = a < 0.0f && cap < loss;
  p.loss = p.dual_on ? cap : loss;
  return p;
}

}  // namespace

void ppo_policy_loss_fwd_f32(const float* logp, const float* old, const float* adv, const uint8_t* mask,
                             float* partial, int64_t R, int64_t T, float clip_low, float clip_high,
                             float dual_clip) {
#pragma omp parallel for schedule(static) if (R * T > 32768)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t o = r * T;
    // Row sums in double: exact counts and no drift on rows of thousands of tokens.
    double s_loss = 0, s_half_lr2 = 0, s_ratio = 0;
    int64_t n = 0, n_clip = 0, n_dual = 0, n_bad = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (!mask[o + t]) continue;  // masked-out entries never contribute, even NaN
      const float a = adv[o + t];
      const PolicyToken p = policy_token(logp[o + t], old[o + t], a, clip_low, clip_high, dual_clip);
      s_loss += p.loss;
      s_half_lr2 += 0.5 * static_cast<double>(p.log_ratio) * p.log_ratio;
      s_ratio += p.ratio;
      n += 1;
      n_clip += p.clip_on;
      n_dual += p.dual_on;
      n_bad += non_finite(p.log_ratio) || non_finite(a);
    }
    partial[0 * R + r] = static_cast<float>(s_loss);
    partial[1 * R + r] = static_cast<float>(n);
    partial[2 * R + r] = static_cast<float>(n_clip);
    partial[3 * R + r] = static_cast<float>(s_half_lr2);
    partial[4 * R + r] = static_cast<float>(s_ratio);
    partial[5 * R + r] = static_cast<float>(n_dual);
    partial[6 * R + r] = static_cast<float>(n_bad);
  }
}

void ppo_policy_loss_bwd_f32(const float* logp, const float* old, const float* adv, const uint8_t* mask,
                             const float* row_weight, const float* grad_loss, float* grad, int64_t R,
                             int64_t T, float clip_low, float clip_high, float dual_clip) {
  const float g = *grad_loss;
#pragma omp parallel for schedule(static) if (R * T > 32768)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t o = r * T;
    const float scale = g * row_weight[r];
    for (int64_t t = 0; t < T; ++t) {
      const PolicyToken p = policy_token(logp[o + t], old[o + t], adv[o + t], clip_low, clip_high, dual_clip);
      // d loss / d logp = d(-A·ratio)/d logp = -A·ratio on the unclipped branch, inside the
      // closed clamp interval of the log-ratio; 0 on the clipped branch or under the dual cap.
      const bool live = mask[o + t] && !p.clip_on && !p.dual_on && std::fabs(p.log_ratio) <= kLogRatioClamp;
      grad[o + t] = live ? p.unclipped * scale : 0.0f;
    }
  }
}

void value_loss_fwd_f32(const float* values, const float* old_values, const float* returns,
                        const uint8_t* mask, float* partial, int64_t R, int64_t T, float clip) {
#pragma omp parallel for schedule(static) if (R * T > 32768)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t o = r * T;
    double s_loss = 0;
    int64_t n = 0, n_clip = 0, n_bad = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (!mask[o + t]) continue;
      const float v = values[o + t], v_old = old_values[o + t], ret = returns[o + t];
      const float delta = v - v_old;
      // clamp V itself (not V_old + clamp(delta)): inside the range it returns V exactly, so rounding
      // can never make the clipped branch look larger (TRL clamps V the same way).
      const float v_clipped = std::fmin(std::fmax(v, v_old - clip), v_old + clip);
      const float err_u = (v - ret) * (v - ret);
      const float err_c = (v_clipped - ret) * (v_clipped - ret);
      const bool clip_on = err_c > err_u;
      s_loss += 0.5f * (clip_on ? err_c : err_u);
      n += 1;
      n_clip += clip_on;
      n_bad += non_finite(delta) || non_finite(ret);
    }
    partial[0 * R + r] = static_cast<float>(s_loss);
    partial[1 * R + r] = static_cast<float>(n);
    partial[2 * R + r] = static_cast<float>(n_clip);
    partial[3 * R + r] = static_cast<float>(n_bad);
  }
}

void value_loss_bwd_f32(const float* values, const float* old_values, const float* returns,
                        const uint8_t* mask, const float* row_weight, const float* grad_loss, float* grad,
                        int64_t R, int64_t T, float clip) {
  const float g = *grad_loss;
#pragma omp parallel for schedule(static) if (R * T > 32768)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t o = r * T;
    const float scale = g * row_weight[r];
    for (int64_t t = 0; t < T; ++t) {
      const float v = values[o + t], v_old = old_values[o + t], ret = returns[o + t];
      const float delta = v - v_old;
      // clamp V itself (not V_old + clamp(delta)): inside the range it returns V exactly, so rounding
      // can never make the clipped branch look larger (TRL clamps V the same way).
      const float v_clipped = std::fmin(std::fmax(v, v_old - clip), v_old + clip);
      const float err_u = (v - ret) * (v - ret);
      const float err_c = (v_clipped - ret) * (v_clipped - ret);
      // Clipped branch: d V_clip / d V = 1 inside the closed clamp interval, else 0.
      const float coef = err_c > err_u ? (std::fabs(delta) <= clip ? v_clipped - ret : 0.0f) : v - ret;
      grad[o + t] = mask[o + t] ? coef * scale : 0.0f;
    }
  }
}

}  // namespace rlhf_fast
