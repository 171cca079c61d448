// Backbone element-wise kernels on CPU: RMSNorm (optionally fused with the residual add before it),
// SwiGLU and the rotary embedding, forward and backward. Formulas and dtype rules:
// rlhf_fast/ops/rms_norm.py, swiglu.py, rotary.py. Every kernel reads fp32 or bf16 (bits in
// uint16), computes in fp32 and rounds where the Hugging Face modules round, so fp32 results match
// them to the last bit or two. OpenMP over rows (or flat chunks); the inner loops are written
// branch-free so they vectorise (see the note at the top of rl_scan.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fast_math.h"
#include "ops.h"

// No fused multiply-add contraction in this file (GCC contracts by default in C++): HF's modules round
// each product before adding, and so do these kernels, e.g. the rotary embedding then equals HF's bits.
#pragma GCC optimize("fp-contract=off")

namespace rlhf_fast {
namespace {

constexpr int64_t kParallelMin = 32768;  // elements below which one thread is faster
// The weight gradient of RMSNorm is summed over rows in this many fixed row blocks (then the blocks
// in order), so the result depends on the shape only, never on the number of threads.
constexpr int64_t kWeightGradBlocks = 64;

// ------------------------------------------------------------------------------------------ RMSNorm
template <typename T, typename O>
RLHF_FAST_CLONES void rms_norm_fwd_impl(const T* x, const T* residual, const float* w, O* out, T* h_out,
                                        float* rstd, int64_t R, int64_t H, float eps) {
#pragma omp parallel for schedule(static) if (R * H > kParallelMin)
  for (int64_t i = 0; i < R; ++i) {
    const T* xr = x + i * H;
    const T* h = xr;
    float ss = 0.0f;
    if (residual != nullptr) {
      const T* rr = residual + i * H;
      T* hr = h_out + i * H;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < H; ++j) {
        const T hv = from_f32<T>(to_f32(rr[j]) + to_f32(xr[j]));  // residual + x, rounded to T as torch does
        hr[j] = hv;
        const float f = to_f32(hv);
        ss += f * f;
      }
      h = hr;
    } else {
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < H; ++j) {
        const float f = to_f32(xr[j]);
        ss += f * f;
      }
    }
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    rstd[i] = r;
    O* orow = out + i * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      orow[j] = from_f32<O>(w[j] * round_to<T>(to_f32(h[j]) * r));  // weight * normed.to(input dtype)
    }
  }
}

template <typename T, typename G>
RLHF_FAST_CLONES void rms_norm_bwd_impl(const G* grad_out, const T* grad_res, const T* h, const float* w,
                                        const float* rstd, T* grad_h, float* grad_w, int64_t R, int64_t H) {
  const int64_t blocks = std::min<int64_t>(R, kWeightGradBlocks);
  std::vector<float> partial(grad_w != nullptr ? static_cast<size_t>(blocks * H) : 0, 0.0f);
  const float inv_h = 1.0f / static_cast<float>(H);
#pragma omp parallel for schedule(static) if (R * H > kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    float* acc = grad_w != nullptr ? partial.data() + b * H : nullptr;
    for (int64_t i = b * R / blocks; i < (b + 1) * R / blocks; ++i) {
      const G* g = grad_out + i * H;
      const T* hr = h + i * H;
      const float r = rstd[i];
      // d/dh of w * (h * r): r * (g w - n * mean(g w n)), n = h * r.
      float c = 0.0f;
#pragma omp simd reduction(+ : c)
      for (int64_t j = 0; j < H; ++j) c += to_f32(g[j]) * w[j] * (to_f32(hr[j]) * r);
      c *= inv_h;
      T* dh = grad_h + i * H;
      const T* gr = grad_res != nullptr ? grad_res + i * H : nullptr;
      if (gr != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const float n = to_f32(hr[j]) * r;
          dh[j] = from_f32<T>(r * (to_f32(g[j]) * w[j] - n * c) + to_f32(gr[j]));
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const float n = to_f32(hr[j]) * r;
          dh[j] = from_f32<T>(r * (to_f32(g[j]) * w[j] - n * c));
        }
      }
      if (acc != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) acc[j] += to_f32(g[j]) * round_to<T>(to_f32(hr[j]) * r);
      }
    }
  }
  if (grad_w != nullptr) {
#pragma omp parallel for schedule(static) if (blocks * H > kParallelMin)
    for (int64_t j = 0; j < H; ++j) {
      float s = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) s += partial[b * H + j];
      grad_w[j] = s;
    }
  }
}

// ------------------------------------------------------------------------------------------ SwiGLU
// sigmoid(x) from exp(-|x|) <= 1: no overflow, and both branches computed (then selected) so the
// loop vectorises.
inline float sigmoid(float x) {
  const float e = exp_nonpos(-std::fabs(x));
  const float inv = 1.0f / (1.0f + e);
  return x >= 0.0f ? inv : e * inv;
}

template <typename T>
RLHF_FAST_CLONES void swiglu_fwd_impl(const T* gate, const T* up, T* out, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_f32(gate[i]);
    out[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
  }
}

template <typename T>
RLHF_FAST_CLONES void swiglu_bwd_impl(const T* grad, const T* gate, const T* up, T* grad_gate, T* grad_up,
                                      int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_f32(gate[i]);
    const float u = to_f32(up[i]);
    const float d = to_f32(grad[i]);
    const float s = sigmoid(g);
    grad_up[i] = from_f32<T>(d * g * s);
    grad_gate[i] = from_f32<T>(d * u * s * (1.0f + g * (1.0f - s)));  // silu'(g) = s (1 + g (1 - s))
  }
}

// ------------------------------------------------------------------------------------------ rotary
// y = x * cos + rotate_half(x) * sin over the last dim (D = 2 * half), x1 / x2 its halves:
//   forward:  y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
//   backward: dx1 = g1 c1 + g2 s2,  dx2 = g2 c2 - g1 s1   (the transpose, for any cos / sin)
// Operation order as in HF (two products, then one add), so fp32 results equal HF's bits.
template <typename I, typename O>
RLHF_FAST_CLONES void rotary_impl(const I* x, const float* cos, const float* sin, O* y, const RotaryShape& s,
                                  bool backward) {
  const int64_t half = s.D / 2;
#pragma omp parallel for collapse(2) schedule(static) if (s.B * s.T * s.heads * s.D > kParallelMin)
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t t = 0; t < s.T; ++t) {
      const float* c = cos + b * s.cos_b + t * s.cos_t;
      const float* sn = sin + b * s.cos_b + t * s.cos_t;
      for (int64_t h = 0; h < s.heads; ++h) {
        const I* xr = x + b * s.x_b + h * s.x_h + t * s.x_t;
        O* yr = y + b * s.y_b + h * s.y_h + t * s.y_t;
        if (!backward) {
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = to_f32(xr[i]), x2 = to_f32(xr[i + half]);
            yr[i] = from_f32<O>(x1 * c[i] - x2 * sn[i]);
            yr[i + half] = from_f32<O>(x2 * c[i + half] + x1 * sn[i + half]);
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float g1 = to_f32(xr[i]), g2 = to_f32(xr[i + half]);
            yr[i] = from_f32<O>(g1 * c[i] + g2 * sn[i + half]);
            yr[i + half] = from_f32<O>(g2 * c[i + half] - g1 * sn[i]);
          }
        }
      }
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------ entry points
void rms_norm_fwd(int dtype, int out_dtype, const void* x, const void* residual, const float* w, void* out,
                  void* h_out, float* rstd, int64_t R, int64_t H, float eps) {
  if (dtype == kF32) {
    rms_norm_fwd_impl<float, float>(static_cast<const float*>(x), static_cast<const float*>(residual), w,
                                    static_cast<float*>(out), static_cast<float*>(h_out), rstd, R, H, eps);
  } else if (out_dtype == kBF16) {
    rms_norm_fwd_impl<bf16_t, bf16_t>(static_cast<const bf16_t*>(x), static_cast<const bf16_t*>(residual), w,
                                      static_cast<bf16_t*>(out), static_cast<bf16_t*>(h_out), rstd, R, H, eps);
  } else {
    rms_norm_fwd_impl<bf16_t, float>(static_cast<const bf16_t*>(x), static_cast<const bf16_t*>(residual), w,
                                     static_cast<float*>(out), static_cast<bf16_t*>(h_out), rstd, R, H, eps);
  }
}

void rms_norm_bwd(int dtype, int grad_dtype, const void* grad_out, const void* grad_res, const void* h,
                  const float* w, const float* rstd, void* grad_h, float* grad_w, int64_t R, int64_t H) {
  if (dtype == kF32) {
    rms_norm_bwd_impl<float, float>(static_cast<const float*>(grad_out), static_cast<const float*>(grad_res),
                                    static_cast<const float*>(h), w, rstd, static_cast<float*>(grad_h), grad_w, R, H);
  } else if (grad_dtype == kBF16) {
    rms_norm_bwd_impl<bf16_t, bf16_t>(static_cast<const bf16_t*>(grad_out), static_cast<const bf16_t*>(grad_res),
                                      static_cast<const bf16_t*>(h), w, rstd, static_cast<bf16_t*>(grad_h), grad_w,
                                      R, H);
  } else {
    rms_norm_bwd_impl<bf16_t, float>(static_cast<const float*>(grad_out), static_cast<const bf16_t*>(grad_res),
                                     static_cast<const bf16_t*>(h), w, rstd, static_cast<bf16_t*>(grad_h), grad_w,
                                     R, H);
  }
}

void swiglu_fwd(int dtype, const void* gate, const void* up, void* out, int64_t n) {
  if (dtype == kF32) {
    swiglu_fwd_impl<float>(static_cast<const float*>(gate), static_cast<const float*>(up), static_cast<float*>(out), n);
  } else {
    swiglu_fwd_impl<bf16_t>(static_cast<const bf16_t*>(gate), static_cast<const bf16_t*>(up),
                            static_cast<bf16_t*>(out), n);
  }
}

void swiglu_bwd(int dtype, const void* grad, const void* gate, const void* up, void* grad_gate, void* grad_up,
                int64_t n) {
  if (dtype == kF32) {
    swiglu_bwd_impl<float>(static_cast<const float*>(grad), static_cast<const float*>(gate),
                           static_cast<const float*>(up), static_cast<float*>(grad_gate),
                           static_cast<float*>(grad_up), n);
  } else {
    swiglu_bwd_impl<bf16_t>(static_cast<const bf16_t*>(grad), static_cast<const bf16_t*>(gate),
                            static_cast<const bf16_t*>(up), static_cast<bf16_t*>(grad_gate),
                            static_cast<bf16_t*>(grad_up), n);
  }
}

void rotary(int in_dtype, int out_dtype, const void* x, const float* cos, const float* sin, void* y,
            const RotaryShape& s, bool backward) {
  if (in_dtype == kF32 && out_dtype == kF32) {
    rotary_impl<float, float>(static_cast<const float*>(x), cos, sin, static_cast<float*>(y), s, backward);
  } else if (in_dtype == kBF16 && out_dtype == kBF16) {
    rotary_impl<bf16_t, bf16_t>(static_cast<const bf16_t*>(x), cos, sin, static_cast<bf16_t*>(y), s, backward);
  } else if (in_dtype == kBF16) {
    rotary_impl<bf16_t, float>(static_cast<const bf16_t*>(x), cos, sin, static_cast<float*>(y), s, backward);
  } else {
    rotary_impl<float, bf16_t>(static_cast<const float*>(x), cos, sin, static_cast<bf16_t*>(y), s, backward);
  }
}

}  // namespace rlhf_fast
