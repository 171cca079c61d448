// Small numeric helpers shared by the CPU kernels, written in plain float / integer arithmetic so
// the loops that use them vectorise (no libm calls, no branches): a polynomial expf for x <= 0,
// bf16 <-> fp32 conversions with torch's rounding, and the target_clones attribute that builds
// AVX-512 / AVX2 / portable versions of a function and picks one at load time.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RLHF_FAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define RLHF_FAST_CLONES
#endif

namespace rlhf_fast {

// bf16 travels as its raw bits.
using bf16_t = uint16_t;

// expf for x <= 0, |rel err| < 2e-7 on [-87, 0].
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

// Element loads and stores in float: fp32 as is, bf16 by its bits. The bf16 store rounds to nearest
// even and writes NaN as 0x7FC0, exactly as c10::BFloat16 does, so a kernel that rounds where torch
// rounds gives torch's bits.
inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_f32(float v);
template <>
inline float from_f32<float>(float v) {
  return v;
}
template <>
inline bf16_t from_f32<bf16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<bf16_t>(nan ? 0x7FC0u : rounded);
}

// Round a float to T and back: the value torch holds after casting an fp32 result to T.
template <typename T>
inline float round_to(float v) {
  return to_f32(from_f32<T>(v));
}

}  // namespace rlhf_fast
