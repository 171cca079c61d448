// The GRPO-era policy-loss family on CPU (clip / cispo / sapo; token, sequence or sequence-token ratio;
// optional rollout-correction weight), padded rows or packed segments. Per sequence: an optional first
// loop for the per-sequence sums (mean log-ratio, summed sampling log-ratio), then the token loop.
// OpenMP over sequences. Formulas and conventions: rlhf_fast/ops/policy_losses.py (module docstring);
// the partial-sum rows are its _LOSS.._SEQ_IS layout, the backward's per-sequence values its [4, S] layout.
#include <cmath>

#include "ops.h"

namespace rlhf_fast {

namespace {

constexpr float kLogRatioClamp = 20.0f;
constexpr int kRows = 14;

inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

struct FamilyToken {
  float loss;    // per-token loss l (before the IS weight)
  float q;       // d (w l) / d log-ratio, 0 outside the log-ratio clamp
  float direct;  // d l / d logp not through the ratio (cispo)
  float w;       // rollout-correction weight
  float ratio;
  bool clip_on, dual_on, low, high, dropped;
};

// lr: the log-ratio the ratio is built from (token or sequence); d_is: the IS log-ratio (token or sequence sum).
inline FamilyToken family_token(float lp, float a, float lr, float d_is, const PolicyFamilyParams& p) {
  FamilyToken t{};
  t.ratio = std::exp(clampf(lr, p.lr_lo, p.lr_hi));
  const bool live = lr >= p.lr_lo && lr <= p.lr_hi;
  t.w = 1.0f;
  if (p.is_level != 0) {
    const float x = std::exp(clampf(d_is, -kLogRatioClamp, kLogRatioClamp));
    if (p.is_mask) {
      t.dropped = x < p.is_lo || x > p.is_hi;
      t.w = t.dropped ? 0.0f : x;
    } else {
      t.w = clampf(x, p.is_lo, p.is_hi);
    }
  }
  float dratio = 0.0f;
  const float r = t.ratio;
  if (p.loss == 0) {  // clip (asymmetric, two-sided delta, dual clip)
    const float u = r < p.delta ? r : p.delta;
    const float unclipped = -a * u;
    const float clipped = -a * clampf(r, p.ratio_lo, p.ratio_hi);
    t.clip_on = clipped > unclipped;
    const float loss = t.clip_on ? clipped : unclipped;
    const float cap = -p.dual_clip * a;  // dual_clip = +inf disables: cap = +inf for a < 0
    t.dual_on = a < 0.0f && cap < loss;
    t.loss = t.dual_on ? cap : loss;
    const bool in_clip = r >= p.ratio_lo && r <= p.ratio_hi;
    dratio = t.dual_on ? 0.0f : (t.clip_on ? (in_clip ? -a : 0.0f) : (r <= p.delta ? -a : 0.0f));
    t.low = u < p.ratio_lo && a < 0.0f;
    t.high = u > p.ratio_hi && a > 0.0f;
  } else if (p.loss == 1) {  // cispo: stop-gradient clipped weight times logp
    const float c = clampf(r, p.ratio_lo, p.ratio_hi);
    t.loss = -c * a * lp;
    t.direct = -c * a;
    t.clip_on = r < p.ratio_lo || r > p.ratio_hi;
    t.low = r < p.ratio_lo && a < 0.0f;
    t.high = r > p.ratio_hi && a > 0.0f;
  } else {  // sapo
    const float tau = a > 0.0f ? p.tau_pos : p.tau_neg;
    const float sig = 1.0f / (1.0f + std::exp(-tau * (r - 1.0f)));
    t.loss = -sig * (4.0f / tau) * a;
    dratio = -a * 4.0f * sig * (1.0f - sig);
  }
  t.q = live ? t.w * dratio * r : 0.0f;
  return t;
}

struct Segment {
  int64_t start, len;
};

inline Segment segment(const int64_t* cu, int64_t r, int64_t T) {
  return cu ? Segment{cu[r], cu[r + 1] - cu[r]} : Segment{r * T, T};
}

// Token-level IS log-ratio old - sampling; NaN (not recorded) counts as 0.
inline float is_log_ratio(const float* old, const float* samp, int64_t i) {
  const float d = old[i] - samp[i];
  return d == d ? d : 0.0f;
}

}  // namespace

void policy_family_fwd_f32(const float* logp, const float* old, const float* adv, const float* samp,
                           const uint8_t* mask, const int64_t* cu, float* partial, int64_t R, int64_t T,
                           const PolicyFamilyParams& p) {
  const int64_t work = cu ? cu[R] : R * T;
#pragma omp parallel for schedule(dynamic, 16) if (work > 32768)
  for (int64_t r = 0; r < R; ++r) {
    const Segment s = segment(cu, r, T);
    // Sums in double: exact counts and no drift on sequences of thousands of tokens.
    double seq_lr = 0, seq_is = 0;
    if (p.seq != 0 || p.is_level == 2) {
      double s_lr = 0;
      int64_t n = 0;
      for (int64_t i = s.start; i < s.start + s.len; ++i) {
        if (mask && !mask[i]) continue;
        s_lr += logp[i] - old[i];
        if (p.is_level == 2) seq_is += is_log_ratio(old, samp, i);
        n += 1;
      }
      seq_lr = s_lr / static_cast<double>(n > 0 ? n : 1);
    }
    const float f_seq_lr = static_cast<float>(seq_lr), f_seq_is = static_cast<float>(seq_is);
    double s_loss = 0, s_lr2 = 0, s_ratio = 0, s_w = 0, s_q = 0;
    int64_t n = 0, n_clip = 0, n_dual = 0, n_bad = 0, n_low = 0, n_high = 0, n_drop = 0;
    for (int64_t i = s.start; i < s.start + s.len; ++i) {
      if (mask && !mask[i]) continue;  // masked-out entries never contribute, even NaN
      const float lr_tok = logp[i] - old[i];
      const float d_is = p.is_level == 1 ? is_log_ratio(old, samp, i) : f_seq_is;
      const FamilyToken t = family_token(logp[i], adv[i], p.seq == 0 ? lr_tok : f_seq_lr, d_is, p);
      s_loss += t.w * t.loss;
      s_lr2 += 0.5 * static_cast<double>(lr_tok) * lr_tok;
      s_ratio += t.ratio;
      s_w += t.w;
      s_q += t.q;
      n += 1;
      n_clip += t.clip_on;
      n_dual += t.dual_on;
      n_low += t.low;
      n_high += t.high;
      n_drop += t.dropped;
      n_bad += (lr_tok - lr_tok + adv[i] - adv[i]) != 0.0f;  // x - x is NaN exactly for NaN/inf
    }
    const double values[kRows] = {s_loss, double(n), double(n_clip), s_lr2, s_ratio, double(n_dual), double(n_bad),
                                  double(n_low), double(n_high), s_w, double(n_drop), s_q, seq_lr, seq_is};
    for (int k = 0; k < kRows; ++k) partial[k * R + r] = static_cast<float>(values[k]);
  }
}

void policy_family_bwd_f32(const float* logp, const float* old, const float* adv, const float* samp,
                           const uint8_t* mask, const int64_t* cu, const float* row_values, float* grad, int64_t R,
                           int64_t T, const PolicyFamilyParams& p) {
  const int64_t work = cu ? cu[R] : R * T;
#pragma omp parallel for schedule(dynamic, 16) if (work > 32768)
  for (int64_t r = 0; r < R; ++r) {
    const Segment s = segment(cu, r, T);
    const float scale = row_values[r], seq_lr = row_values[R + r], seq_is = row_values[2 * R + r];
    const float seq_coef = row_values[3 * R + r];
    for (int64_t i = s.start; i < s.start + s.len; ++i) {
      if (mask && !mask[i]) {
        grad[i] = 0.0f;
        continue;
      }
      const float d_is = p.is_level == 1 ? is_log_ratio(old, samp, i) : seq_is;
      const FamilyToken t = family_token(logp[i], adv[i], p.seq == 0 ? logp[i] - old[i] : seq_lr, d_is, p);
      // sequence ratio with the gradient through the mean: every token gets the sequence's sum / n
      const float coef = t.w * t.direct + (p.seq == 1 ? seq_coef : t.q);
      grad[i] = coef * scale;
    }
  }
}

}  // namespace rlhf_fast
