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
}
