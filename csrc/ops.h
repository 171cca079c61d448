// Declarations of the CPU kernels in csrc/*.cpp. Kernels take raw pointers and sizes (no torch
// headers); bindings.cpp checks arguments and exposes them to Python.
#pragma once
#include <cstdint>

namespace rlhf_fast {

// reductions.cpp -- masked row sums: x [R, C] float32 row-major (row stride ld), mask [R, C] uint8
// (0/1, row stride ld_mask). Writes sum[r] = sum_c x[r,c]*mask[r,c] and count[r] = sum_c mask[r,c],
// both float32, accumulated in double per row so long rows stay exact.
void masked_row_sum_f32(const float* x, const uint8_t* mask, float* sum, float* count, int64_t R,
                        int64_t C, int64_t ld, int64_t ld_mask);

// ppo_loss.cpp -- PPO clipped policy loss and clipped value loss (formulas: rlhf_fast/ops/ppo_loss.py).
// Inputs float32 / uint8 (0/1 mask), contiguous [R, T]. Forwards write per-row partial sums
// partial[k * R + r] over valid tokens: policy k = loss, count, clip count, 0.5 * log_ratio^2,
// ratio, dual-clip count, non-finite count (dual_clip = +inf disables the dual clip); value k = loss,
// count, clip count, non-finite count. Backwards write grad [R, T] = grad_loss[0] * row_weight[r] *
// d(per-token loss)/d(input), 0 on masked positions.
void ppo_policy_loss_fwd_f32(const float* logp, const float* old, const float* adv, const uint8_t* mask,
                             float* partial, int64_t R, int64_t T, float clip_low, float clip_high,
                             float dual_clip);
void ppo_policy_loss_bwd_f32(const float* logp, const float* old, const float* adv, const uint8_t* mask,
                             const float* row_weight, const float* grad_loss, float* grad, int64_t R,
                             int64_t T, float clip_low, float clip_high, float dual_clip);
void value_loss_fwd_f32(const float* values, const float* old_values, const float* returns,
                        const uint8_t* mask, float* partial, int64_t R, int64_t T, float clip);
void value_loss_bwd_f32(const float* values, const float* old_values, const float* returns,
                        const uint8_t* mask, const float* row_weight, const float* grad_loss, float* grad,
                        int64_t R, int64_t T, float clip);

// policy_losses.cpp -- the policy-loss family (formulas: rlhf_fast/ops/policy_losses.py). Inputs float32,
// contiguous; padded rows [R, T] (cu null) or packed segments of cu [R + 1] (int64) over [N]. samp (sampling
// log-probs) null unless is_level != 0; mask null = every token valid. The forward writes partial[k * R + r]
// for the module's 14 rows; the backward reads row_values [4, R] (scale, sequence log-ratio, sequence IS
// log-ratio, sequence gradient coefficient) and writes grad over every token of the R sequences.
struct PolicyFamilyParams {
  int loss;      // 0 clip, 1 cispo, 2 sapo
  int seq;       // 0 token ratio, 1 sequence ratio (gradient through the mean), 2 sequence-token
  int is_level;  // 0 none, 1 token, 2 sequence
  int is_mask;   // 0 truncate, 1 mask
  float ratio_lo, ratio_hi, dual_clip, delta, lr_lo, lr_hi, tau_pos, tau_neg, is_lo, is_hi;
};
void policy_family_fwd_f32(const float* logp, const float* old, const float* adv, const float* samp,
                           const uint8_t* mask, const int64_t* cu, float* partial, int64_t R, int64_t T,
                           const PolicyFamilyParams& p);
void policy_family_bwd_f32(const float* logp, const float* old, const float* adv, const float* samp,
                           const uint8_t* mask, const int64_t* cu, const float* row_values, float* grad, int64_t R,
                           int64_t T, const PolicyFamilyParams& p);

// rl_scan.cpp -- RL element-wise ops and scans. All tensors float32 / uint8 (0/1 mask), contiguous
// row-major [B, T] (or flat [n]). Functions returning int64_t return how many non-finite inputs
// they met on positions that matter (valid positions only), so the caller's finite check is free.
// estimator: 0 = k1, 1 = k2, 2 = k3, 3 = abs (rlhf_fast.ops.kl.KL_ESTIMATORS order); the backward also
// takes 4 = straight-through (grad_logp = grad_out * r, no clamp: veRL's "+" estimators).
int64_t kl_penalty_f32(const float* logp, const float* ref, float* out, int64_t n, int estimator, float clamp);
// grad_logp / grad_ref may be null (that gradient is not needed).
void kl_penalty_backward_f32(const float* logp, const float* ref, const float* grad_out, float* grad_logp,
                             float* grad_ref, int64_t n, int estimator, float clamp);
int64_t token_rewards_f32(const float* scores, const float* kl, const uint8_t* mask, float* out, int64_t B,
                          int64_t T, float kl_coef);
// bootstrap: [B] or null (terminal: next value 0 after the last valid token).
int64_t gae_f32(const float* rewards, const float* values, const uint8_t* mask, const float* bootstrap,
                float* advantages, float* returns, int64_t B, int64_t T, float gamma, float lam);
// sqdev[r] = sum_c mask[r,c] * (x[r,c] - mean)^2, accumulated in double per row.
int64_t masked_row_sqdev_f32(const float* x, const uint8_t* mask, float mean, float* sqdev, int64_t R, int64_t C);
// out[i] = mask[i] ? (x[i] - mean) * scale + offset : 0.
void masked_affine_f32(const float* x, const uint8_t* mask, float* out, int64_t n, float mean, float scale,
                       float offset);

// logprobs.cpp -- row passes of the fused LM-head log-prob op over an fp32 logits chunk [n, V] (row
// stride ld), z = logits * inv_temperature. Forward writes logp[i] = z[y_i] - lse_i, entropy[i]
// (skipped when entropy is null) and lse[i]; rows with labels[i] == ignore_index get logp = entropy
// = 0. Backward overwrites the chunk in place with d(sum_i gl_i logp_i + ge_i H_i)/d logits (the
// 1/T included); grad_logp / grad_entropy may be null (zero upstream); ignored rows become 0.
void logprob_rows_fwd_f32(const float* logits, const int64_t* labels, float* logp, float* entropy, float* lse,
                          int64_t n, int64_t V, int64_t ld, float inv_temperature, int64_t ignore_index);
void logprob_rows_bwd_f32(float* logits, const int64_t* labels, const float* lse, const float* entropy,
                          const float* grad_logp, const float* grad_entropy, int64_t n, int64_t V, int64_t ld,
                          float inv_temperature, int64_t ignore_index);

// backbone.cpp -- RMSNorm (+ residual add), SwiGLU, rotary embedding (formulas: rlhf_fast/ops/rms_norm.py,
// swiglu.py, rotary.py). Tensors are fp32 or bf16 (raw bits), named by a dtype code; all math in fp32.
constexpr int kF32 = 0;
constexpr int kBF16 = 1;

// x, residual (may be null), out, h_out: contiguous [R, H]; w: fp32 [H]; rstd: fp32 [R] (written).
// h = residual + x (rounded to dtype, written to h_out) or x; out = w * round_dtype(h * rstd), stored in
// out_dtype (dtype, or fp32 when dtype is bf16 and the weight promotes the output).
void rms_norm_fwd(int dtype, int out_dtype, const void* x, const void* residual, const float* w, void* out,
                  void* h_out, float* rstd, int64_t R, int64_t H, float eps);
// grad_out: [R, H] in grad_dtype (the forward's out_dtype); grad_res: [R, H] in dtype or null (the
// gradient reaching the fused residual output); grad_h: [R, H] in dtype; grad_w: fp32 [H] or null (not
// needed), summed over rows in fixed blocks (deterministic whatever the thread count).
void rms_norm_bwd(int dtype, int grad_dtype, const void* grad_out, const void* grad_res, const void* h,
                  const float* w, const float* rstd, void* grad_h, float* grad_w, int64_t R, int64_t H);
// Contiguous [n] in dtype: out = silu(gate) * up; backward writes grad_gate, grad_up from grad.
void swiglu_fwd(int dtype, const void* gate, const void* up, void* out, int64_t n);
void swiglu_bwd(int dtype, const void* grad, const void* gate, const void* up, void* grad_gate, void* grad_up,
                int64_t n);
// x, y: [B, heads, T, D] with element strides (the last dim contiguous); cos, sin: fp32 [B or 1, T, D]
// with strides cos_b (0 to broadcast over the batch) and cos_t, the last dim contiguous.
struct RotaryShape {
  int64_t B, heads, T, D;
  int64_t x_b, x_h, x_t;
  int64_t y_b, y_h, y_t;
  int64_t cos_b, cos_t;
};
// Forward y = x cos + rotate_half(x) sin; backward (x = the incoming gradient) its transpose.
// (in_dtype, out_dtype): (fp32, fp32), (bf16, bf16), (bf16, fp32) or (fp32, bf16).
void rotary(int in_dtype, int out_dtype, const void* x, const float* cos, const float* sin, void* y,
            const RotaryShape& s, bool backward);

// few_rows.cpp -- y [B, N] = x [B, K] @ w [N, K]^T (+ bias [N]), all float32 contiguous, for a few rows
// (the decode step's matmuls); portable forces the scalar loop (tests), else AVX2+FMA when the CPU has it.
void few_rows_linear_f32(const float* x, const float* w, const float* bias, float* y, int64_t B, int64_t N,
                         int64_t K, bool portable);

}  // namespace rlhf_fast
