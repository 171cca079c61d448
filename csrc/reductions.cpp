// Masked reductions on CPU: OpenMP over rows, the inner loop left to the compiler's vectoriser.
#include "ops.h"

namespace rlhf_fast {

void masked_row_sum_f32(const float* x, const uint8_t* mask, float* sum, float* count, int64_t R,
                        int64_t C, int64_t ld, int64_t ld_mask) {
#pragma omp parallel for schedule(static) if (R * C > 32768)
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * ld;
    const uint8_t* mr = mask + r * ld_mask;
    // Blocks of float partial sums folded into double: vectorisable and still exact enough
    // for rows of millions of elements. A masked-out NaN must not leak: select, don't multiply.
    double s = 0.0;
    int64_t n = 0;
    constexpr int64_t kBlock = 1024;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t c1 = c0 + kBlock < C ? c0 + kBlock : C;
      float bs = 0.0f;
      int64_t bn = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const bool on = mr[c] != 0;
        bs += on ? xr[c] : 0.0f;
        bn += on;
      }
      s += bs;
      n += bn;
    }
    sum[r] = static_cast<float>(s);
    count[r] = static_cast<float>(n);
  }
}

}  // namespace rlhf_fast
