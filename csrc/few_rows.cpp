// y = x @ w^T (+ bias) for a few rows of x: the per-token matmuls of a decode step (B <= 8 rows).
//
// Why: a decode step multiplies B <= 8 activation rows by every weight matrix, so its time is the time to
// stream the weights once. MKL's sgemm reaches about a third of this machine's copy bandwidth at these
// shapes (measured: [8, 896] x [4864, 896]^T 1.5-1.9 ms against a 0.54 ms floor). Here each weight row is
// read from memory once and dotted with the activation rows, which stay in L1/L2 (8 accumulators of 8
// lanes: one weight row against up to 8 activation rows, or a pair against 4 at a time). Threads split the
// weight rows.
// AVX2+FMA when the CPU has them (checked at run time), else a portable loop. The sums run in a different
// order than MKL's, so results agree with F.linear to fp32 round-off, not bit for bit.
#include <immintrin.h>

#include <cstdint>

#include "ops.h"

namespace rlhf_fast {
namespace {

constexpr int kRowsPerPass = 4;
constexpr int64_t kPrefetch = 1024;  // floats ahead (4 KiB): B >= 5 rows are too slow per weight row for the hardware prefetcher alone  // activation rows per pass over a weight-row pair

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Rows n0, n0 + 1 of w (n1 = 1 + n0 or just n0 when `pair` is false) against activation rows [b0, b0 + RB).
template <int RB>
__attribute__((target("avx2,fma"))) void pair_block_avx2(const float* x, int64_t b0, const float* w0,
                                                          const float* w1, bool pair, int64_t K, float* out0,
                                                          float* out1, int64_t ldy) {
  __m256 acc0[RB], acc1[RB];
  for (int r = 0; r < RB; ++r) {
    acc0[r] = _mm256_setzero_ps();
    acc1[r] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + k + kPrefetch), _MM_HINT_T0);
    if (pair) _mm_prefetch(reinterpret_cast<const char*>(w1 + k + kPrefetch), _MM_HINT_T0);
    const __m256 a = _mm256_loadu_ps(w0 + k);
    const __m256 b = pair ? _mm256_loadu_ps(w1 + k) : a;
    for (int r = 0; r < RB; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + (b0 + r) * K + k);
      acc0[r] = _mm256_fmadd_ps(a, xv, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(b, xv, acc1[r]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    float s0 = hsum(acc0[r]), s1 = hsum(acc1[r]);
    const float* xr = x + (b0 + r) * K;
    for (int64_t j = k; j < K; ++j) {
      s0 += w0[j] * xr[j];
      s1 += w1[j] * xr[j];
    }
    out0[(b0 + r) * ldy] = s0;
    if (pair) out1[(b0 + r) * ldy] = s1;
  }
}

// One weight row against activation rows [0, RB), RB <= 8: 8 accumulators, one pass over the row.
template <int RB>
__attribute__((target("avx2,fma"))) void row_block_avx2(const float* x, const float* wr, int64_t K, float* out,
                                                         int64_t ldy) {
  __m256 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(wr + k + kPrefetch), _MM_HINT_T0);
    const __m256 a = _mm256_loadu_ps(wr + k);
    for (int r = 0; r < RB; ++r) acc[r] = _mm256_fmadd_ps(a, _mm256_loadu_ps(x + r * K + k), acc[r]);
  }
  for (int r = 0; r < RB; ++r) {
    float s = hsum(acc[r]);
    const float* xr = x + r * K;
    for (int64_t j = k; j < K; ++j) s += wr[j] * xr[j];
    out[r * ldy] = s;
  }
}

__attribute__((target("avx2,fma"))) void few_rows_avx2_single(const float* x, const float* w, const float* bias,
                                                               float* y, int64_t B, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    switch (B) {
      case 8: row_block_avx2<8>(x, w + n * K, K, y + n, N); break;
      case 7: row_block_avx2<7>(x, w + n * K, K, y + n, N); break;
      case 6: row_block_avx2<6>(x, w + n * K, K, y + n, N); break;
      default: row_block_avx2<5>(x, w + n * K, K, y + n, N); break;
    }
    if (bias != nullptr)
      for (int64_t b = 0; b < B; ++b) y[b * N + n] += bias[n];
  }
}

__attribute__((target("avx2,fma"))) void few_rows_avx2(const float* x, const float* w, const float* bias,
                                                        float* y, int64_t B, int64_t N, int64_t K) {
  const int64_t pairs = (N + 1) / 2;
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t n = 2 * p;
    const bool pair = n + 1 < N;
    const float* w0 = w + n * K;
    const float* w1 = pair ? w0 + K : w0;
    float* out0 = y + n;
    float* out1 = pair ? y + n + 1 : y + n;
    for (int64_t b0 = 0; b0 < B; b0 += kRowsPerPass) {
      switch (B - b0 >= kRowsPerPass ? kRowsPerPass : B - b0) {
        case 4: pair_block_avx2<4>(x, b0, w0, w1, pair, K, out0, out1, N); break;
        case 3: pair_block_avx2<3>(x, b0, w0, w1, pair, K, out0, out1, N); break;
        case 2: pair_block_avx2<2>(x, b0, w0, w1, pair, K, out0, out1, N); break;
        default: pair_block_avx2<1>(x, b0, w0, w1, pair, K, out0, out1, N); break;
      }
    }
    if (bias != nullptr) {
      for (int64_t b = 0; b < B; ++b) {
        y[b * N + n] += bias[n];
        if (pair) y[b * N + n + 1] += bias[n + 1];
      }
    }
  }
}

void few_rows_portable(const float* x, const float* w, const float* bias, float* y, int64_t B, int64_t N,
                       int64_t K) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* wr = w + n * K;
    for (int64_t b = 0; b < B; ++b) {
      const float* xr = x + b * K;
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += wr[k] * xr[k];
      y[b * N + n] = s + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

}  // namespace

void few_rows_linear_f32(const float* x, const float* w, const float* bias, float* y, int64_t B, int64_t N,
                         int64_t K, bool portable) {
  if (!portable && cpu_has_avx2_fma()) {
    // 5-8 rows that fit in L1 together (32 KiB): one pass per weight row reading 8 activation rows; larger
    // rows (the MLP's down projection) go in pairs of weight rows against 4 activation rows at a time.
    if (B > kRowsPerPass && B * K * 4 <= (32 << 10)) few_rows_avx2_single(x, w, bias, y, B, N, K);
    else few_rows_avx2(x, w, bias, y, B, N, K);
  } else {
    few_rows_portable(x, w, bias, y, B, N, K);
  }
}

}  // namespace rlhf_fast
