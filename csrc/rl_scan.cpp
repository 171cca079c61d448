// RL element-wise ops and scans on CPU: KL penalty (+ backward), token rewards, GAE, whitening passes.
// OpenMP over rows (or over flat chunks for the element-wise ops). Every function that reads
// user data also counts the non-finite values it met on positions that matter (valid positions
// only), so the Python wrapper's finite check costs no extra pass over memory.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <unistd.h>

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

// Backward id of veRL's straight-through ("+") estimators: the gradient of k2 without its clamp.
constexpr int kStraightThrough = 4;

template <int EST, bool NEED_LOGP, bool NEED_REF>
void kl_backward(const float* logp, const float* ref, const float* grad_out, float* grad_logp, float* grad_ref,
                 int64_t n, float clamp) {
#pragma omp parallel for schedule(static) if (n >= kParallelMinElems)
  for (int64_t c0 = 0; c0 < n; c0 += kElemChunk) {
    const int64_t c1 = c0 + kElemChunk < n ? c0 + kElemChunk : n;
    for (int64_t i = c0; i < c1; ++i) {
      const float r = logp[i] - ref[i];
      float g;
      if constexpr (EST == kStraightThrough) {
        g = grad_out[i] * r;  // the gradient of the unclamped r^2 / 2, whatever the forward value
      } else {
        const float est = kl_estimate<EST>(r);
        // The output clamp passes the gradient only inside [-clamp, clamp] (torch.clamp's rule).
        const float g_inside = grad_out[i] * kl_estimate_grad<EST>(r);
        g = select_bits((est >= -clamp) & (est <= clamp), g_inside, 0.0f);
      }
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
    case kStraightThrough:
      return kl_backward_dispatch<kStraightThrough>(logp, ref, grad_out, grad_logp, grad_ref, n, clamp);
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

namespace {

// One row of the GAE scan over t in [t_begin, t_end), walking backwards; next_value / next_adv are
// the carried state (in and out). Returns how many valid positions held a non-finite input.
inline int64_t gae_row_scalar(const float* rr, const float* vr, const uint8_t* mr, float* ar, float* ret,
                              int64_t t_begin, int64_t t_end, float gamma, float gamma_lam, float& next_value,
                              float& next_adv) {
  int64_t bad = 0;
  float nv = next_value, na = next_adv;
  for (int64_t t = t_end - 1; t >= t_begin; --t) {
    if (mr[t]) {
      const float v = vr[t];
      const float delta = rr[t] + gamma * nv - v;
      const float a = delta + gamma_lam * na;
      bad += !std::isfinite(rr[t]) || !std::isfinite(v);
      ar[t] = a;
      ret[t] = a + v;
      nv = v;
      na = a;
    } else {
      ar[t] = 0.0f;
      ret[t] = 0.0f;
    }
  }
  next_value = nv;
  next_adv = na;
  return bad;
}

inline int64_t gae_row(const float* rewards, const float* values, const uint8_t* mask, const float* bootstrap,
                       float* advantages, float* returns, int64_t b, int64_t T, float gamma, float gamma_lam) {
  // Carried from the next valid position: its value (terminal 0, or the bootstrap value of a
  // truncated response) and its advantage. Masked positions leave both untouched.
  float next_value = bootstrap != nullptr ? bootstrap[b] : 0.0f;
  float next_adv = 0.0f;
  int64_t bad = bootstrap != nullptr ? !std::isfinite(next_value) : 0;
  const int64_t o = b * T;
  bad += gae_row_scalar(rewards + o, values + o, mask + o, advantages + o, returns + o, 0, T, gamma, gamma_lam,
                        next_value, next_adv);
  return bad;
}

constexpr int64_t kTileRows = 8;
constexpr int64_t kStep = 8;

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RLHF_FAST_GAE_AVX2 1

// The scalar scan is one dependent FMA chain per row (~4-5 cycles per element). The AVX2 kernel
// runs 8 rows in lockstep instead: it loads an 8-row x 8-step block, transposes it so that one
// register holds the 8 rows at one time step, and walks the 8 steps with the carried state as
// [8] vectors (8 independent chains per instruction; holes are per-lane selects), then transposes
// the advantages and returns back. Compiled for AVX2+FMA only, chosen at run time
// (__builtin_cpu_supports), so the extension still runs on CPUs without AVX2 (scalar rows).
// Measured single-thread on the 2-core EPYC box, 512 x 4096: 3.9 ms scalar -> 2.0 ms.

__attribute__((target("avx2,fma"))) inline void transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3,
                                                           __m256& r4, __m256& r5, __m256& r6, __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(u0, u4, 0x20);
  r1 = _mm256_permute2f128_ps(u1, u5, 0x20);
  r2 = _mm256_permute2f128_ps(u2, u6, 0x20);
  r3 = _mm256_permute2f128_ps(u3, u7, 0x20);
  r4 = _mm256_permute2f128_ps(u0, u4, 0x31);
  r5 = _mm256_permute2f128_ps(u1, u5, 0x31);
  r6 = _mm256_permute2f128_ps(u2, u6, 0x31);
  r7 = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// 8 rows x kStep steps from `base` (row stride T) -> x[k] = the 8 rows at step k.
// The 128-bit lane exchange of the transpose is folded into the loads (vinsertf128 from memory
// costs a load, not a shuffle): x[i] holds steps 0-3 of row i and row i+4, or steps 4-7 of both.
__attribute__((target("avx2,fma"))) inline void load_block(const float* base, int64_t T, __m256 (&x)[kStep]) {
  __m256 q[8];
  // Row pointers advanced by additions: few live registers (GCC otherwise keeps all 7 row offsets
  // of every stream and spills them).
  const float* lo = base;
  const float* hi = base + 4 * T;
  for (int i = 0; i < 4; ++i, lo += T, hi += T) {
    q[i] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(lo)), _mm_loadu_ps(hi), 1);
    q[i + 4] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(lo + 4)), _mm_loadu_ps(hi + 4), 1);
  }
  // q[i] (i < 4) = [row i steps 0-3 | row i+4 steps 0-3]; q[i+4] the same for steps 4-7.
  for (int h = 0; h < 2; ++h) {
    const __m256 t0 = _mm256_unpacklo_ps(q[4 * h + 0], q[4 * h + 1]), t1 = _mm256_unpackhi_ps(q[4 * h + 0], q[4 * h + 1]);
    const __m256 t2 = _mm256_unpacklo_ps(q[4 * h + 2], q[4 * h + 3]), t3 = _mm256_unpackhi_ps(q[4 * h + 2], q[4 * h + 3]);
    x[4 * h + 0] = _mm256_shuffle_ps(t0, t2, 0x44);
    x[4 * h + 1] = _mm256_shuffle_ps(t0, t2, 0xEE);
    x[4 * h + 2] = _mm256_shuffle_ps(t1, t3, 0x44);
    x[4 * h + 3] = _mm256_shuffle_ps(t1, t3, 0xEE);
  }
}

// Carried state and constants of one tile's scan.
struct TileScan {
  __m256 nv, na;      // V and A of the next valid position, per row
  __m256 g, gl, one;  // γ, γλ, 1
  __m256 probe;       // collects NaN when a return is non-finite (see gae_tile_avx2)
};

// Scans steps t0 .. t0+7 (backwards) of the tile whose row 0 starts at r0 / v0 / m0; leaves the
// advantages and returns transposed back to row-major in a / ret (a[i] = row i, steps t0 .. t0+7).
__attribute__((target("avx2,fma"), always_inline)) inline void scan_block(TileScan& s, const float* r0, const float* v0,
                                                           const uint8_t* m0, int64_t t0, int64_t T,
                                                           __m256 (&a)[kStep], __m256 (&ret)[kStep]) {
  __m256 r[kStep], v[kStep], on[kStep];
  load_block(r0 + t0, T, r);
  load_block(v0 + t0, T, v);
  // Mask bytes widened to int32; any nonzero byte is valid (as in the scalar path) -> all-ones lane.
  const __m256i zero = _mm256_setzero_si256();
  const uint8_t* mp = m0 + t0;
  for (int i = 0; i < 8; ++i, mp += T) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mp));
    on[i] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(bytes), zero));
  }
  transpose8(on[0], on[1], on[2], on[3], on[4], on[5], on[6], on[7]);
  const __m256 zero_ps = _mm256_setzero_ps();
  for (int k = kStep - 1; k >= 0; --k) {
    // On a valid lane A = δ + γλ·A_next; on a hole A_next passes through = 0 + 1·A_next. Folding
    // the select into the FMA's operands keeps one FMA (no blend) on the carried chain.
    const __m256 delta = _mm256_and_ps(_mm256_fmadd_ps(s.g, s.nv, _mm256_sub_ps(r[k], v[k])), on[k]);
    s.na = _mm256_fmadd_ps(_mm256_blendv_ps(s.one, s.gl, on[k]), s.na, delta);
    s.nv = _mm256_blendv_ps(s.nv, v[k], on[k]);
    a[k] = _mm256_and_ps(s.na, on[k]);
    ret[k] = _mm256_and_ps(_mm256_add_ps(s.na, v[k]), on[k]);
    // ret·0 is NaN exactly when ret is NaN or ±inf (0 on masked lanes).
    s.probe = _mm256_fmadd_ps(ret[k], zero_ps, s.probe);
  }
  transpose8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
  transpose8(ret[0], ret[1], ret[2], ret[3], ret[4], ret[5], ret[6], ret[7]);
}

// Rows b0 .. b0+7. T % kStep trailing steps run scalar first (they are the latest in time), then
// whole blocks walk down to t = 0. STREAM writes the outputs with non-temporal stores (see gae_f32).
template <bool STREAM>
__attribute__((target("avx2,fma"))) int64_t gae_tile_avx2(const float* rewards, const float* values,
                                                          const uint8_t* mask, const float* bootstrap,
                                                          float* advantages, float* returns, int64_t b0,
                                                          int64_t T, float gamma, float gamma_lam) {
  alignas(32) float next_value[kTileRows];
  alignas(32) float next_adv[kTileRows];
  int64_t bad = 0;
  const int64_t t_vec = T - T % kStep;
  for (int64_t i = 0; i < kTileRows; ++i) {
    const int64_t o = (b0 + i) * T;
    next_value[i] = bootstrap != nullptr ? bootstrap[b0 + i] : 0.0f;
    next_adv[i] = 0.0f;
    if (bootstrap != nullptr) bad += !std::isfinite(next_value[i]);
    bad += gae_row_scalar(rewards + o, values + o, mask + o, advantages + o, returns + o, t_vec, T, gamma,
                          gamma_lam, next_value[i], next_adv[i]);
  }
  TileScan s;
  s.nv = _mm256_load_ps(next_value);
  s.na = _mm256_load_ps(next_adv);
  s.g = _mm256_set1_ps(gamma);
  s.gl = _mm256_set1_ps(gamma_lam);
  s.one = _mm256_set1_ps(1.0f);
  // A non-finite input at a valid position makes that position's return non-finite (inf - inf,
  // NaN and inf all propagate through the FMAs and the + v), so one NaN-collecting FMA per step
  // flags the tile; only then is the exact count taken (a scalar pass, on the error path only). An
  // overflow of finite inputs may flag a tile too: the recount then finds nothing.
  s.probe = _mm256_setzero_ps();
  const float* r0 = rewards + b0 * T;
  const float* v0 = values + b0 * T;
  const uint8_t* m0 = mask + b0 * T;
  float* a0 = advantages + b0 * T;
  float* ret0 = returns + b0 * T;
  __m256 a_hi[kStep], ret_hi[kStep], a_lo[kStep], ret_lo[kStep];
  if constexpr (!STREAM) {
    for (int64_t t0 = t_vec - kStep; t0 >= 0; t0 -= kStep) {
      scan_block(s, r0, v0, m0, t0, T, a_hi, ret_hi);
      float* ap = a0 + t0;
      float* rp = ret0 + t0;
      for (int i = 0; i < 8; ++i, ap += T, rp += T) {
        _mm256_storeu_ps(ap, a_hi[i]);
        _mm256_storeu_ps(rp, ret_hi[i]);
      }
    }
  } else {
    // Streaming stores must fill whole 64-byte lines: blocks go in pairs (16 steps per row), and
    // the caller guarantees T % 16 == 0 and 64-byte aligned outputs.
    for (int64_t t0 = t_vec - 2 * kStep; t0 >= 0; t0 -= 2 * kStep) {
      scan_block(s, r0, v0, m0, t0 + kStep, T, a_hi, ret_hi);
      scan_block(s, r0, v0, m0, t0, T, a_lo, ret_lo);
      float* ap = a0 + t0;
      float* rp = ret0 + t0;
      for (int i = 0; i < 8; ++i, ap += T, rp += T) {
        _mm256_stream_ps(ap, a_lo[i]);
        _mm256_stream_ps(ap + kStep, a_hi[i]);
        _mm256_stream_ps(rp, ret_lo[i]);
        _mm256_stream_ps(rp + kStep, ret_hi[i]);
      }
    }
    _mm_sfence();  // streaming stores are weakly ordered: make them visible before returning
  }
  if (_mm256_movemask_ps(_mm256_cmp_ps(s.probe, s.probe, _CMP_UNORD_Q)) != 0) {
    for (int64_t i = 0; i < kTileRows; ++i) {
      const int64_t o = (b0 + i) * T;
      for (int64_t t = 0; t < t_vec; ++t) {
        bad += (mask[o + t] != 0) & (!std::isfinite(rewards[o + t]) | !std::isfinite(values[o + t]));
      }
    }
  }
  return bad;
}

// Working-set size (bytes) from which GAE writes its outputs with streaming stores: the size of the
// last-level cache from Linux sysfs (what lscpu shows), else sysconf, else 32 MiB. (In some VMs
// glibc's sysconf reports the whole host's L3, 10x the cache this CPU shares.) The environment
// variable RLHF_FAST_GAE_STREAM_MIN_BYTES overrides it (0: always stream; a huge value: never), read
// once per process, for A/B measurements on a given machine.
int64_t gae_stream_min_bytes() {
  static const int64_t bytes = [] {
    if (const char* env = std::getenv("RLHF_FAST_GAE_STREAM_MIN_BYTES")) {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (end != env && v >= 0) return static_cast<int64_t>(v);
    }
    for (int index = 3; index >= 2; --index) {
      char path[64];
      std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
      if (std::FILE* f = std::fopen(path, "r")) {
        long kib = 0;
        char unit = 'K';
        const int got = std::fscanf(f, "%ld%c", &kib, &unit);
        std::fclose(f);
        if (got >= 1 && kib > 0) return static_cast<int64_t>(kib) << (unit == 'M' ? 20 : 10);
      }
    }
    long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? static_cast<int64_t>(l3) : int64_t{32} << 20;
  }();
  return bytes;
}

// RLHF_FAST_GAE_SIMD=0 in the environment (read once per process) keeps the portable scalar rows
// on an AVX2 CPU too: tests run that fallback on whole shapes, benchmarks compare the two.
bool cpu_has_avx2_fma() {
  static const bool has = [] {
    const char* env = std::getenv("RLHF_FAST_GAE_SIMD");
    if (env != nullptr && env[0] == '0' && env[1] == '\0') return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

}  // namespace

int64_t gae_f32(const float* rewards, const float* values, const uint8_t* mask, const float* bootstrap,
                float* advantages, float* returns, int64_t B, int64_t T, float gamma, float lam) {
  int64_t bad = 0;
  const float gamma_lam = gamma * lam;
  int64_t n_tiles = 0;
  bool stream = false;
#ifdef RLHF_FAST_GAE_AVX2
  // A tile needs a whole block of steps per row to pay off.
  if (T >= kStep && cpu_has_avx2_fma()) n_tiles = B / kTileRows;
  // Streaming (non-temporal) stores skip the read-for-ownership of every output line and keep the
  // outputs from evicting the inputs: ~20% faster once the working set (17 B per token) is larger
  // than the last-level cache, where the outputs would not stay cached for the next op anyway.
  // Below that, plain stores leave them in cache for the whitening pass that usually follows.
  const auto out_bits = reinterpret_cast<std::uintptr_t>(advantages) | reinterpret_cast<std::uintptr_t>(returns);
  stream = T % 16 == 0 && out_bits % 64 == 0 && B * T * int64_t{17} > gae_stream_min_bytes();
#endif
  // Work units: n_tiles tiles of 8 rows, then the leftover rows one by one (scalar).
  const int64_t n_units = n_tiles + (B - n_tiles * kTileRows);
  // Rows are independent: OpenMP over tiles / rows. The scan does more work per byte than the
  // element-wise kernels, so two threads pay off from a smaller size.
#pragma omp parallel for schedule(static) reduction(+ : bad) if (B * T >= kScanParallelMinElems)
  for (int64_t u = 0; u < n_units; ++u) {
#ifdef RLHF_FAST_GAE_AVX2
    if (u < n_tiles) {
      const int64_t b0 = u * kTileRows;
      bad += stream ? gae_tile_avx2<true>(rewards, values, mask, bootstrap, advantages, returns, b0, T, gamma, gamma_lam)
                    : gae_tile_avx2<false>(rewards, values, mask, bootstrap, advantages, returns, b0, T, gamma, gamma_lam);
      continue;
    }
#endif
    bad += gae_row(rewards, values, mask, bootstrap, advantages, returns, n_tiles * kTileRows + (u - n_tiles), T,
                   gamma, gamma_lam);
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
