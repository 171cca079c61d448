// pybind11 bindings for rlhf_fast._C: argument checks only, no math.
// Tensors cross as (data_ptr, sizes, strides) integers; the Python wrappers in rlhf_fast/ops
// guarantee dtype, contiguity and device, and these checks catch what would crash the process.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t p, const char* name) {
  if (p == 0) throw std::invalid_argument(std::string(name) + ": null data pointer");
  return reinterpret_cast<T*>(p);
}

void check_dims(int64_t rows, int64_t cols, int64_t ld, const char* name) {
  if (rows < 0 || cols < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  if (ld < cols) throw std::invalid_argument(std::string(name) + ": row stride smaller than row length");
}

int check_dtype(int code, const char* name) {
  if (code != rlhf_fast::kF32 && code != rlhf_fast::kBF16)
    throw std::invalid_argument(std::string(name) + ": dtype code must be 0 (fp32) or 1 (bf16)");
  return code;
}

// RMSNorm kernels: the row dtype and the output (or output-gradient) dtype, which is the same or fp32
// (bf16 rows, fp32 weight); rows of H >= 1 elements.
void check_rms_norm(int dtype, int other_dtype, int64_t R, int64_t H, const char* name) {
  check_dtype(dtype, name);
  check_dtype(other_dtype, name);
  if (dtype == rlhf_fast::kF32 && other_dtype != rlhf_fast::kF32)
    throw std::invalid_argument(std::string(name) + ": fp32 rows need fp32 outputs and output gradients");
  check_dims(R, H, H, name);
  if (H < 1) throw std::invalid_argument(std::string(name) + ": hidden size must be >= 1");
}

template <typename T>
T* optional_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlhf_fast CPU kernels (OpenMP); called through rlhf_fast.ops, never directly";

  m.def(
      "masked_row_sum_f32",
      [](std::uintptr_t x, std::uintptr_t mask, std::uintptr_t sum, std::uintptr_t count, int64_t R,
         int64_t C, int64_t ld, int64_t ld_mask) {
        check_dims(R, C, ld, "x");
        check_dims(R, C, ld_mask, "mask");
        if (R == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::masked_row_sum_f32(as_ptr<const float>(x, "x"), as_ptr<const uint8_t>(mask, "mask"),
                                      as_ptr<float>(sum, "sum"), as_ptr<float>(count, "count"), R, C, ld,
                                      ld_mask);
      },
      py::arg("x"), py::arg("mask"), py::arg("sum"), py::arg("count"), py::arg("R"), py::arg("C"),
      py::arg("ld"), py::arg("ld_mask"));

  // ppo_loss.cpp (issue 4B): fused PPO policy / value loss passes over contiguous [R, T].
  m.def(
      "ppo_policy_loss_fwd_f32",
      [](std::uintptr_t logp, std::uintptr_t old, std::uintptr_t adv, std::uintptr_t mask, std::uintptr_t partial,
         int64_t R, int64_t T, float clip_low, float clip_high, float dual_clip) {
        check_dims(R, T, T, "logp");
        if (R == 0 || T == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::ppo_policy_loss_fwd_f32(as_ptr<const float>(logp, "logp"), as_ptr<const float>(old, "old"),
                                           as_ptr<const float>(adv, "adv"), as_ptr<const uint8_t>(mask, "mask"),
                                           as_ptr<float>(partial, "partial"), R, T, clip_low, clip_high, dual_clip);
      },
      py::arg("logp"), py::arg("old"), py::arg("adv"), py::arg("mask"), py::arg("partial"), py::arg("R"),
      py::arg("T"), py::arg("clip_low"), py::arg("clip_high"), py::arg("dual_clip"));
  m.def(
      "ppo_policy_loss_bwd_f32",
      [](std::uintptr_t logp, std::uintptr_t old, std::uintptr_t adv, std::uintptr_t mask, std::uintptr_t row_weight,
         std::uintptr_t grad_loss, std::uintptr_t grad, int64_t R, int64_t T, float clip_low, float clip_high,
         float dual_clip) {
        check_dims(R, T, T, "logp");
        if (R == 0 || T == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::ppo_policy_loss_bwd_f32(as_ptr<const float>(logp, "logp"), as_ptr<const float>(old, "old"),
                                           as_ptr<const float>(adv, "adv"), as_ptr<const uint8_t>(mask, "mask"),
                                           as_ptr<const float>(row_weight, "row_weight"),
                                           as_ptr<const float>(grad_loss, "grad_loss"), as_ptr<float>(grad, "grad"),
                                           R, T, clip_low, clip_high, dual_clip);
      },
      py::arg("logp"), py::arg("old"), py::arg("adv"), py::arg("mask"), py::arg("row_weight"), py::arg("grad_loss"),
      py::arg("grad"), py::arg("R"), py::arg("T"), py::arg("clip_low"), py::arg("clip_high"), py::arg("dual_clip"));
  m.def(
      "value_loss_fwd_f32",
      [](std::uintptr_t values, std::uintptr_t old_values, std::uintptr_t returns, std::uintptr_t mask,
         std::uintptr_t partial, int64_t R, int64_t T, float clip) {
        check_dims(R, T, T, "values");
        if (R == 0 || T == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::value_loss_fwd_f32(as_ptr<const float>(values, "values"), as_ptr<const float>(old_values, "old_values"),
                                      as_ptr<const float>(returns, "returns"), as_ptr<const uint8_t>(mask, "mask"),
                                      as_ptr<float>(partial, "partial"), R, T, clip);
      },
      py::arg("values"), py::arg("old_values"), py::arg("returns"), py::arg("mask"), py::arg("partial"),
      py::arg("R"), py::arg("T"), py::arg("clip"));
  m.def(
      "value_loss_bwd_f32",
      [](std::uintptr_t values, std::uintptr_t old_values, std::uintptr_t returns, std::uintptr_t mask,
         std::uintptr_t row_weight, std::uintptr_t grad_loss, std::uintptr_t grad, int64_t R, int64_t T, float clip) {
        check_dims(R, T, T, "values");
        if (R == 0 || T == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::value_loss_bwd_f32(as_ptr<const float>(values, "values"), as_ptr<const float>(old_values, "old_values"),
                                      as_ptr<const float>(returns, "returns"), as_ptr<const uint8_t>(mask, "mask"),
                                      as_ptr<const float>(row_weight, "row_weight"),
                                      as_ptr<const float>(grad_loss, "grad_loss"), as_ptr<float>(grad, "grad"), R, T,
                                      clip);
      },
      py::arg("values"), py::arg("old_values"), py::arg("returns"), py::arg("mask"), py::arg("row_weight"),
      py::arg("grad_loss"), py::arg("grad"), py::arg("R"), py::arg("T"), py::arg("clip"));

  // policy_losses.cpp (issue 17): the policy-loss family. samp / mask / cu pointers may be 0 (absent).
  auto family_params = [](int loss, int seq, int is_level, int is_mask, float ratio_lo, float ratio_hi,
                          float dual_clip, float delta, float lr_lo, float lr_hi, float tau_pos, float tau_neg,
                          float is_lo, float is_hi) {
    if (loss < 0 || loss > 2) throw std::invalid_argument("policy family: loss id not in 0..2");
    if (seq < 0 || seq > 2) throw std::invalid_argument("policy family: ratio level id not in 0..2");
    if (is_level < 0 || is_level > 2) throw std::invalid_argument("policy family: IS level id not in 0..2");
    return rlhf_fast::PolicyFamilyParams{loss, seq, is_level, is_mask, ratio_lo, ratio_hi, dual_clip, delta,
                                         lr_lo, lr_hi, tau_pos, tau_neg, is_lo, is_hi};
  };
  auto check_family = [](std::uintptr_t samp, int64_t R, int64_t T, int is_level) {
    if (R < 0 || T < 0) throw std::invalid_argument("policy family: negative size");
    if (is_level != 0 && samp == 0) throw std::invalid_argument("policy family: IS needs sampling log-probs");
  };
  m.def(
      "policy_family_fwd_f32",
      [family_params, check_family](std::uintptr_t logp, std::uintptr_t old, std::uintptr_t adv, std::uintptr_t samp,
                                    std::uintptr_t mask, std::uintptr_t cu, std::uintptr_t partial, int64_t R,
                                    int64_t T, int loss, int seq, int is_level, int is_mask, float ratio_lo,
                                    float ratio_hi, float dual_clip, float delta, float lr_lo, float lr_hi,
                                    float tau_pos, float tau_neg, float is_lo, float is_hi) {
        check_family(samp, R, T, is_level);
        const auto p = family_params(loss, seq, is_level, is_mask, ratio_lo, ratio_hi, dual_clip, delta, lr_lo,
                                     lr_hi, tau_pos, tau_neg, is_lo, is_hi);
        if (R == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::policy_family_fwd_f32(as_ptr<const float>(logp, "logp"), as_ptr<const float>(old, "old"),
                                         as_ptr<const float>(adv, "adv"), reinterpret_cast<const float*>(samp),
                                         reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<const int64_t*>(cu),
                                         as_ptr<float>(partial, "partial"), R, T, p);
      },
      py::arg("logp"), py::arg("old"), py::arg("adv"), py::arg("samp"), py::arg("mask"), py::arg("cu"),
      py::arg("partial"), py::arg("R"), py::arg("T"), py::arg("loss"), py::arg("seq"), py::arg("is_level"),
      py::arg("is_mask"), py::arg("ratio_lo"), py::arg("ratio_hi"), py::arg("dual_clip"), py::arg("delta"),
      py::arg("lr_lo"), py::arg("lr_hi"), py::arg("tau_pos"), py::arg("tau_neg"), py::arg("is_lo"),
      py::arg("is_hi"));
  m.def(
      "policy_family_bwd_f32",
      [family_params, check_family](std::uintptr_t logp, std::uintptr_t old, std::uintptr_t adv, std::uintptr_t samp,
                                    std::uintptr_t mask, std::uintptr_t cu, std::uintptr_t row_values,
                                    std::uintptr_t grad, int64_t R, int64_t T, int loss, int seq, int is_level,
                                    int is_mask, float ratio_lo, float ratio_hi, float dual_clip, float delta,
                                    float lr_lo, float lr_hi, float tau_pos, float tau_neg, float is_lo,
                                    float is_hi) {
        check_family(samp, R, T, is_level);
        const auto p = family_params(loss, seq, is_level, is_mask, ratio_lo, ratio_hi, dual_clip, delta, lr_lo,
                                     lr_hi, tau_pos, tau_neg, is_lo, is_hi);
        if (R == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::policy_family_bwd_f32(as_ptr<const float>(logp, "logp"), as_ptr<const float>(old, "old"),
                                         as_ptr<const float>(adv, "adv"), reinterpret_cast<const float*>(samp),
                                         reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<const int64_t*>(cu),
                                         as_ptr<const float>(row_values, "row_values"), as_ptr<float>(grad, "grad"),
                                         R, T, p);
      },
      py::arg("logp"), py::arg("old"), py::arg("adv"), py::arg("samp"), py::arg("mask"), py::arg("cu"),
      py::arg("row_values"), py::arg("grad"), py::arg("R"), py::arg("T"), py::arg("loss"), py::arg("seq"),
      py::arg("is_level"), py::arg("is_mask"), py::arg("ratio_lo"), py::arg("ratio_hi"), py::arg("dual_clip"),
      py::arg("delta"), py::arg("lr_lo"), py::arg("lr_hi"), py::arg("tau_pos"), py::arg("tau_neg"),
      py::arg("is_lo"), py::arg("is_hi"));

  // logprobs.cpp (issue 3): fused LM-head log-prob row passes. Optional pointers are 0.
  m.def(
      "logprob_rows_fwd_f32",
      [](std::uintptr_t logits, std::uintptr_t labels, std::uintptr_t logp, std::uintptr_t entropy,
         std::uintptr_t lse, int64_t n, int64_t V, int64_t ld, float inv_temperature, int64_t ignore_index) {
        check_dims(n, V, ld, "logits");
        if (V < 1) throw std::invalid_argument("logits: V must be >= 1");
        if (!(inv_temperature > 0.0f)) throw std::invalid_argument("inv_temperature must be > 0");
        if (n == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::logprob_rows_fwd_f32(as_ptr<const float>(logits, "logits"), as_ptr<const int64_t>(labels, "labels"),
                                        as_ptr<float>(logp, "logp"), reinterpret_cast<float*>(entropy),
                                        as_ptr<float>(lse, "lse"), n, V, ld, inv_temperature, ignore_index);
      },
      py::arg("logits"), py::arg("labels"), py::arg("logp"), py::arg("entropy"), py::arg("lse"), py::arg("n"),
      py::arg("V"), py::arg("ld"), py::arg("inv_temperature"), py::arg("ignore_index"));
  m.def(
      "logprob_rows_bwd_f32",
      [](std::uintptr_t logits, std::uintptr_t labels, std::uintptr_t lse, std::uintptr_t entropy,
         std::uintptr_t grad_logp, std::uintptr_t grad_entropy, int64_t n, int64_t V, int64_t ld,
         float inv_temperature, int64_t ignore_index) {
        check_dims(n, V, ld, "logits");
        if (V < 1) throw std::invalid_argument("logits: V must be >= 1");
        if (!(inv_temperature > 0.0f)) throw std::invalid_argument("inv_temperature must be > 0");
        if (grad_entropy != 0 && entropy == 0) throw std::invalid_argument("grad_entropy needs entropy");
        if (n == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::logprob_rows_bwd_f32(as_ptr<float>(logits, "logits"), as_ptr<const int64_t>(labels, "labels"),
                                        as_ptr<const float>(lse, "lse"), reinterpret_cast<const float*>(entropy),
                                        reinterpret_cast<const float*>(grad_logp),
                                        reinterpret_cast<const float*>(grad_entropy), n, V, ld, inv_temperature,
                                        ignore_index);
      },
      py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"),
      py::arg("grad_entropy"), py::arg("n"), py::arg("V"), py::arg("ld"), py::arg("inv_temperature"),
      py::arg("ignore_index"));

  // ---- rl_scan.cpp (KL penalty, token rewards, GAE, whitening passes); contiguous fp32 / uint8.
  m.def(
      "kl_penalty_f32",
      [](std::uintptr_t logp, std::uintptr_t ref, std::uintptr_t out, int64_t n, int estimator, float clamp) {
        if (n < 0) throw std::invalid_argument("kl_penalty_f32: negative size");
        if (estimator < 0 || estimator > 3) throw std::invalid_argument("kl_penalty_f32: estimator id not in 0..3");
        if (n == 0) return int64_t{0};
        py::gil_scoped_release release;
        return rlhf_fast::kl_penalty_f32(as_ptr<const float>(logp, "logp"), as_ptr<const float>(ref, "ref"),
                                         as_ptr<float>(out, "out"), n, estimator, clamp);
      },
      py::arg("logp"), py::arg("ref"), py::arg("out"), py::arg("n"), py::arg("estimator"), py::arg("clamp"));
  m.def(
      "kl_penalty_backward_f32",
      [](std::uintptr_t logp, std::uintptr_t ref, std::uintptr_t grad_out, std::uintptr_t grad_logp,
         std::uintptr_t grad_ref, int64_t n, int estimator, float clamp) {
        if (n < 0) throw std::invalid_argument("kl_penalty_backward_f32: negative size");
        // 4: the straight-through gradient (rl_scan.cpp kStraightThrough)
        if (estimator < 0 || estimator > 4) throw std::invalid_argument("kl_penalty_backward_f32: bad estimator id");
        if (n == 0) return;
        py::gil_scoped_release release;
        // grad_logp / grad_ref: 0 means "not needed".
        rlhf_fast::kl_penalty_backward_f32(
            as_ptr<const float>(logp, "logp"), as_ptr<const float>(ref, "ref"),
            as_ptr<const float>(grad_out, "grad_out"), reinterpret_cast<float*>(grad_logp),
            reinterpret_cast<float*>(grad_ref), n, estimator, clamp);
      },
      py::arg("logp"), py::arg("ref"), py::arg("grad_out"), py::arg("grad_logp"), py::arg("grad_ref"), py::arg("n"),
      py::arg("estimator"), py::arg("clamp"));
  m.def(
      "token_rewards_f32",
      [](std::uintptr_t scores, std::uintptr_t kl, std::uintptr_t mask, std::uintptr_t out, int64_t B, int64_t T,
         float kl_coef) {
        check_dims(B, T, T, "kl");
        if (B == 0 || T == 0) return int64_t{0};
        py::gil_scoped_release release;
        return rlhf_fast::token_rewards_f32(as_ptr<const float>(scores, "scores"), as_ptr<const float>(kl, "kl"),
                                            as_ptr<const uint8_t>(mask, "mask"), as_ptr<float>(out, "out"), B, T,
                                            kl_coef);
      },
      py::arg("scores"), py::arg("kl"), py::arg("mask"), py::arg("out"), py::arg("B"), py::arg("T"),
      py::arg("kl_coef"));
  m.def(
      "gae_f32",
      [](std::uintptr_t rewards, std::uintptr_t values, std::uintptr_t mask, std::uintptr_t bootstrap,
         std::uintptr_t advantages, std::uintptr_t returns, int64_t B, int64_t T, float gamma, float lam) {
        check_dims(B, T, T, "rewards");
        if (B == 0 || T == 0) return int64_t{0};
        py::gil_scoped_release release;
        // bootstrap: 0 means terminal (no bootstrap values).
        return rlhf_fast::gae_f32(as_ptr<const float>(rewards, "rewards"), as_ptr<const float>(values, "values"),
                                  as_ptr<const uint8_t>(mask, "mask"), reinterpret_cast<const float*>(bootstrap),
                                  as_ptr<float>(advantages, "advantages"), as_ptr<float>(returns, "returns"), B, T,
                                  gamma, lam);
      },
      py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("bootstrap"), py::arg("advantages"),
      py::arg("returns"), py::arg("B"), py::arg("T"), py::arg("gamma"), py::arg("lam"));
  m.def(
      "masked_row_sqdev_f32",
      [](std::uintptr_t x, std::uintptr_t mask, float mean, std::uintptr_t sqdev, int64_t R, int64_t C) {
        check_dims(R, C, C, "x");
        if (R == 0) return int64_t{0};
        py::gil_scoped_release release;
        return rlhf_fast::masked_row_sqdev_f32(as_ptr<const float>(x, "x"), as_ptr<const uint8_t>(mask, "mask"), mean,
                                               as_ptr<float>(sqdev, "sqdev"), R, C);
      },
      py::arg("x"), py::arg("mask"), py::arg("mean"), py::arg("sqdev"), py::arg("R"), py::arg("C"));
  m.def(
      "masked_affine_f32",
      [](std::uintptr_t x, std::uintptr_t mask, std::uintptr_t out, int64_t n, float mean, float scale,
         float offset) {
        if (n < 0) throw std::invalid_argument("masked_affine_f32: negative size");
        if (n == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::masked_affine_f32(as_ptr<const float>(x, "x"), as_ptr<const uint8_t>(mask, "mask"),
                                     as_ptr<float>(out, "out"), n, mean, scale, offset);
      },
      py::arg("x"), py::arg("mask"), py::arg("out"), py::arg("n"), py::arg("mean"), py::arg("scale"),
      py::arg("offset"));

  // ---- backbone.cpp (RMSNorm + residual, SwiGLU, rotary); dtype codes 0 = fp32, 1 = bf16; optional pointers 0.
  m.def(
      "rms_norm_fwd",
      [](int dtype, int out_dtype, std::uintptr_t x, std::uintptr_t residual, std::uintptr_t w, std::uintptr_t out,
         std::uintptr_t h_out, std::uintptr_t rstd, int64_t R, int64_t H, float eps) {
        check_rms_norm(dtype, out_dtype, R, H, "rms_norm_fwd");
        if ((residual == 0) != (h_out == 0)) throw std::invalid_argument("rms_norm_fwd: residual needs h_out");
        if (R == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::rms_norm_fwd(dtype, out_dtype, as_ptr<const void>(x, "x"), optional_ptr<const void>(residual),
                                as_ptr<const float>(w, "weight"), as_ptr<void>(out, "out"), optional_ptr<void>(h_out),
                                as_ptr<float>(rstd, "rstd"), R, H, eps);
      },
      py::arg("dtype"), py::arg("out_dtype"), py::arg("x"), py::arg("residual"), py::arg("w"), py::arg("out"),
      py::arg("h_out"), py::arg("rstd"), py::arg("R"), py::arg("H"), py::arg("eps"));
  m.def(
      "rms_norm_bwd",
      [](int dtype, int grad_dtype, std::uintptr_t grad_out, std::uintptr_t grad_res, std::uintptr_t h,
         std::uintptr_t w, std::uintptr_t rstd, std::uintptr_t grad_h, std::uintptr_t grad_w, int64_t R, int64_t H) {
        check_rms_norm(dtype, grad_dtype, R, H, "rms_norm_bwd");
        if (R == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::rms_norm_bwd(dtype, grad_dtype, as_ptr<const void>(grad_out, "grad_out"),
                                optional_ptr<const void>(grad_res), as_ptr<const void>(h, "h"),
                                as_ptr<const float>(w, "weight"), as_ptr<const float>(rstd, "rstd"),
                                as_ptr<void>(grad_h, "grad_h"), optional_ptr<float>(grad_w), R, H);
      },
      py::arg("dtype"), py::arg("grad_dtype"), py::arg("grad_out"), py::arg("grad_res"), py::arg("h"), py::arg("w"),
      py::arg("rstd"), py::arg("grad_h"), py::arg("grad_w"), py::arg("R"), py::arg("H"));
  m.def(
      "swiglu_fwd",
      [](int dtype, std::uintptr_t gate, std::uintptr_t up, std::uintptr_t out, int64_t n) {
        check_dtype(dtype, "gate");
        if (n < 0) throw std::invalid_argument("swiglu_fwd: negative size");
        if (n == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::swiglu_fwd(dtype, as_ptr<const void>(gate, "gate"), as_ptr<const void>(up, "up"),
                              as_ptr<void>(out, "out"), n);
      },
      py::arg("dtype"), py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("n"));
  m.def(
      "swiglu_bwd",
      [](int dtype, std::uintptr_t grad, std::uintptr_t gate, std::uintptr_t up, std::uintptr_t grad_gate,
         std::uintptr_t grad_up, int64_t n) {
        check_dtype(dtype, "gate");
        if (n < 0) throw std::invalid_argument("swiglu_bwd: negative size");
        if (n == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::swiglu_bwd(dtype, as_ptr<const void>(grad, "grad"), as_ptr<const void>(gate, "gate"),
                              as_ptr<const void>(up, "up"), as_ptr<void>(grad_gate, "grad_gate"),
                              as_ptr<void>(grad_up, "grad_up"), n);
      },
      py::arg("dtype"), py::arg("grad"), py::arg("gate"), py::arg("up"), py::arg("grad_gate"), py::arg("grad_up"),
      py::arg("n"));
  m.def(
      "rotary",
      [](int in_dtype, int out_dtype, std::uintptr_t x, std::uintptr_t cos, std::uintptr_t sin, std::uintptr_t y,
         int64_t B, int64_t heads, int64_t T, int64_t D, int64_t x_b, int64_t x_h, int64_t x_t, int64_t y_b,
         int64_t y_h, int64_t y_t, int64_t cos_b, int64_t cos_t, bool backward) {
        check_dtype(in_dtype, "x");
        check_dtype(out_dtype, "y");
        if (B < 0 || heads < 0 || T < 0 || D < 0) throw std::invalid_argument("rotary: negative size");
        if (D % 2) throw std::invalid_argument("rotary: head_dim must be even");
        if (x_b < 0 || x_h < 0 || x_t < 0 || y_b < 0 || y_h < 0 || y_t < 0 || cos_b < 0 || cos_t < 0)
          throw std::invalid_argument("rotary: negative stride");
        if (B == 0 || heads == 0 || T == 0 || D == 0) return;
        const rlhf_fast::RotaryShape s{B, heads, T, D, x_b, x_h, x_t, y_b, y_h, y_t, cos_b, cos_t};
        py::gil_scoped_release release;
        rlhf_fast::rotary(in_dtype, out_dtype, as_ptr<const void>(x, "x"), as_ptr<const float>(cos, "cos"),
                          as_ptr<const float>(sin, "sin"), as_ptr<void>(y, "y"), s, backward);
      },
      py::arg("in_dtype"), py::arg("out_dtype"), py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("y"),
      py::arg("B"), py::arg("heads"), py::arg("T"), py::arg("D"), py::arg("x_b"), py::arg("x_h"), py::arg("x_t"),
      py::arg("y_b"), py::arg("y_h"), py::arg("y_t"), py::arg("cos_b"), py::arg("cos_t"), py::arg("backward"));
  m.def(
      "few_rows_linear_f32",
      [](std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t y, int64_t B, int64_t N, int64_t K,
         bool portable) {
        if (B < 0 || N < 0 || K < 0) throw std::invalid_argument("few_rows_linear: negative size");
        if (B == 0 || N == 0) return;
        py::gil_scoped_release release;
        rlhf_fast::few_rows_linear_f32(as_ptr<const float>(x, "x"), as_ptr<const float>(w, "weight"),
                                       optional_ptr<const float>(bias), as_ptr<float>(y, "y"), B, N, K, portable);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("B"), py::arg("N"), py::arg("K"),
      py::arg("portable") = false);
}
