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

}  // namespace rlhf_fast
