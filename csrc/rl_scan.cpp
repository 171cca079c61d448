// RL element-wise ops and scans on CPU: KL penalty (+ backward), token rewards, GAE, whitening passes.
// OpenMP over rows (or over flat chunks for the element-wise ops). Every function that reads
// user data also counts the non-finite values it met on positions that matter (valid positions
// only), so the Python wrapper's finite check costs no extra pass over memory.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "ops.h"

// Vectorisation note: under GCC's default -ftrapping-math a floating-point operation or comparison
// that runs only on one side of a branch (including the right side of && / ||) may not be
// speculated, which leaves the whole loop scalar. The loops below therefore compute every value
// unconditionally and select (?: between ready values, & and | on bools).

namespace rlhf_fast {

namespace {

constexpr float kLogRatioClamp = 20.0f;

// Clamp that lets NaN through (std::min/max would silently replace it with a bound).


// c ? a : b on the bits: GCC neither sinks a or b into a branch nor refuses to vectorise.
inline float select_bits(bool c, float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, sizeof ia);
  std::memcpy(&ib, &b, sizeof ib);
  const int32_t m = -static_cast<int32_t>(c);
  const int32_t bits = (ia & m) | (ib & ~m);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline float clamp_keep_nan(float x, float lo, float hi) {
  return select_bits(x > hi, hi, select_bits(x < lo, lo, x));
}

// e^x for |x| <= 20 (callers clamp first). libm's expf/expm1f are scalar calls (~50x slower than
// the rest of the loop); this is branch-free so the loops below vectorise. Cody-Waite reduction
// x = k·ln2 + f with |f| <= ln2/2, degree-7 Taylor polynomial for e^f (truncation < 1e-8
// relative), 2^k assembled in the exponent bits. Within ~2 ulp of expf.
inline float exp_clamped(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 split so k·kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer in the low bits
  const float t = x * kLog2e + kRound;
  const float kf = t - kRound;
  int32_t tbits;
  std::memcpy(&tbits, &t, sizeof tbits);
  const int32_t k = tbits - 0x4B400000;  // bit pattern of kRound
  const float f = (x - kf * kLn2Hi) - kf * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t scale_bits = (k + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

// e^-r - 1 + r on a clamped ratio: the Taylor series where the subtraction would cancel
// (|r| < 0.25; next term r^7/5040), the direct form elsewhere.
inline float k3_of(float rc) {
  const float series =
      rc * rc * (0.5f - rc * (1.0f / 6.0f - rc * (1.0f / 24.0f - rc * (1.0f / 120.0f - rc * (1.0f / 720.0f)))));
  const float direct = exp_clamped(-rc) - 1.0f + rc;
  return select_bits(std::fabs(rc) < 0.25f, series, direct);
}

// 1 - e^-r, same split.
inline float k3_grad_of(float rc) {
  const float series = rc * (1.0f - rc * (0.5f - rc * (1.0f / 6.0f - rc * (1.0f / 24.0f - rc * (1.0f / 120.0f)))));
  const float direct = 1.0f - exp_clamped(-rc);
  return select_bits(std::fabs(rc) < 0.25f, series, direct);
}

// The estimate for one log-ratio r (EST = index in rlhf_fast.ops.kl.KL_ESTIMATORS). A NaN r gives
// garbage here, but the caller counts it as non-finite and raises.
template <int EST>
inline float kl_estimate(float r) {
  if constexpr (EST == 0) return r;
  if constexpr (EST == 1) return 0.5f * r * r;
  if constexpr (EST == 2) return k3_of(clamp_keep_nan(r, -kLogRatioClamp, kLogRatioClamp));
  return std::fabs(r);
}

// d estimate / d r (before the output clamp). Zero outside the ±20 log-ratio clamp for k3, like
// torch.clamp's gradient; |r|' at 0 is 0 like torch.abs.
template <int EST>
inline float kl_estimate_grad(float r) {
  if constexpr (EST == 0) return 1.0f;
  if constexpr (EST == 1) return r;
  if constexpr (EST == 2) {
    const float g = k3_grad_of(clamp_keep_nan(r, -kLogRatioClamp, kLogRatioClamp));
    return select_bits((r > kLogRatioClamp) | (r < -kLogRatioClamp), 0.0f, g);
  }
  return static_cast<float>(static_cast<int>(r > 0.0f) - static_cast<int>(r < 0.0f));
}

constexpr int64_t kElemChunk = 1 << 14;

// Below ~1M elements (a few ms on one core) these passes run on one thread. A fork/join is cheap
// on an idle machine, but on a shared, oversubscribed one the team waits a whole scheduler quantum
// (~4 ms) whenever one of its threads is descheduled: measured 12 ms instead of 1.5 ms for GAE at
// 256 x 1024 with 2 threads on a loaded 2-core box. Above the threshold the split pays either way.
constexpr int64_t kParallelMinElems = int64_t{1} << 20;
constexpr int64_t kScanParallelMinElems = int64_t{1} << 16;

template <int EST>
int64_t kl_forward(const float* logp, const float* ref, float* out, int64_t n, float clamp) {
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (n >= kParallelMinElems)
  for (int64_t c0 = 0; c0 < n; c0 += kElemChunk) {
    const int64_t c1 = c0 + kElemChunk < n ? c0 + kElemChunk : n;
    int32_t chunk_bad = 0;
    for (int64_t i = c0; i < c1; ++i) {
      const float r = logp[i] - ref[i];
      chunk_bad += (r - r) != 0.0f;  // r - r is NaN exactly when r is NaN or ±inf
      out[i] = clamp_keep_nan(kl_estimate<EST>(r), -clamp, clamp);
    }
    bad += chunk_bad;
  }
  return bad;
}

template <int EST, bool NEED_LOGP, bool NEED_REF>
void kl_backward(const float* logp, const float* ref, const float* grad_out, float* grad_logp, float* grad_ref,
                 int64_t n, float clamp) {
#pragma omp parallel for schedule(static) if (n >= kParallelMinElems)
  for (int64_t c0 = 0; c0 < n; c0 += kElemChunk) {
    const int64_t c1 = c0 + kElemChunk < n ? c0 + kElemChunk : n;
    for (int64_t i = c0; i < c1; ++i) {
      const float r = logp[i] - ref[i];
      const float est = kl_estimate<EST>(r);
      // The output clamp passes the gradient only inside [-clamp, clamp] (torch.clamp's rule).
      const float g_inside = grad_out[i] * kl_estimate_grad<EST>(r);
      const float g = select_bits((est >= -clamp) & (est <= clamp), g_inside, 0.0f);
      if constexpr (NEED_LOGP) grad_logp[i] = g;
      if constexpr (NEED_REF) grad_ref[i] = -g;
    }
  }
}

template <int EST>
void kl_backward_dispatch(const float* logp, const float* ref, const float* grad_out, float* grad_logp,
                          float* grad_ref, int64_t n, float clamp) {
  if (grad_logp != nullptr && grad_ref != nullptr) {
    kl_backward<EST, true, true>(logp, ref, grad_out, grad_logp, grad_ref, n, clamp);
  } else if (grad_logp != nullptr) {
    kl_backward<EST, true, false>(logp, ref, grad_out, grad_logp, grad_ref, n, clamp);
  } else if (grad_ref != nullptr) {
    kl_backward<EST, false, true>(logp, ref, grad_out, grad_logp, grad_ref, n, clamp);
  }
}

}  // namespace

int64_t kl_penalty_f32(const float* logp, const float* ref, float* out, int64_t n, int estimator, float clamp) {
  switch (estimator) {
    case 0:
      return kl_forward<0>(logp, ref, out, n, clamp);
    case 1:
      return kl_forward<1>(logp, ref, out, n, clamp);
    case 2:
      return kl_forward<2>(logp, ref, out, n, clamp);
    default:
      return kl_forward<3>(logp, ref, out, n, clamp);
  }
}

void kl_penalty_backward_f32(const float* logp, const float* ref, const float* grad_out, float* grad_logp,
                             float* grad_ref, int64_t n, int estimator, float clamp) {
  switch (estimator) {
    case 0:
      return kl_backward_dispatch<0>(logp, ref, grad_out, grad_logp, grad_ref, n, clamp);
    case 1:
      return kl_backward_dispatch<1>(logp, ref, grad_out, grad_logp, grad_ref, n, clamp);
    case 2:
      return kl_backward_dispatch<2>(logp, ref, grad_out, grad_logp, grad_ref, n, clamp);
    default:
      return kl_backward_dispatch<3>(logp, ref, grad_out, grad_logp, grad_ref, n, clamp);
  }
}

int64_t token_rewards_f32(const float* scores, const float* kl, const uint8_t* mask, float* out, int64_t B,
                          int64_t T, float kl_coef) {
  int64_t bad = 0;
  const float neg_coef = -kl_coef;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (B * T >= kParallelMinElems)
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
      const float k = neg_coef * klr[t];
      bad += on & ((k - k) != 0.0f);  // k - k is NaN exactly when k is NaN or ±inf
      outr[t] = on ? k : 0.0f;
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
  // The scan is latency-bound (one dependent FMA chain per row), so two threads pay off much
  // earlier than for the bandwidth-bound element-wise kernels.
#pragma omp parallel for schedule(static) reduction(+ : bad) if (B * T >= kScanParallelMinElems)
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
#pragma omp parallel for schedule(static) reduction(+ : bad) if (R * C >= kParallelMinElems)
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
        const float dd = d * d;
        bs += mr[c] ? dd : 0.0f;
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
#pragma omp parallel for schedule(static) if (n >= kParallelMinElems)
  for (int64_t c0 = 0; c0 < n; c0 += kElemChunk) {
    const int64_t c1 = c0 + kElemChunk < n ? c0 + kElemChunk : n;
    for (int64_t i = c0; i < c1; ++i) {
      const float y = (x[i] - mean) * scale + offset;
      out[i] = mask[i] ? y : 0.0f;
    }
  }
}

}  // namespace rlhf_fast
