#pragma once

// Comparison helpers for the C++ tests.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

namespace sparsity_test {

// Same dtype and shape, NaN in the same places, every other element with the
// same bits (as the Python tests' assert_bitwise_equal).
inline ::testing::AssertionResult same_bits(const at::Tensor& actual, const at::Tensor& expected) {
  if (actual.scalar_type() != expected.scalar_type()) {
    return ::testing::AssertionFailure()
        << "dtype " << actual.scalar_type() << " vs " << expected.scalar_type();
  }
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " vs " << expected.sizes();
  }
  const at::Tensor a_nan = at::isnan(actual), e_nan = at::isnan(expected);
  if (!at::equal(a_nan, e_nan)) {
    return ::testing::AssertionFailure() << "NaN in different places";
  }
  const auto bits = [](const at::Tensor& t, const at::Tensor& nan) {
    const at::Tensor clean = t.detach().masked_fill(nan, 0).contiguous();
    switch (t.element_size()) {
      case 8:
        return clean.view(at::kLong);
      case 4:
        return clean.view(at::kInt);
      default:
        return clean.view(at::kShort);
    }
  };
  const at::Tensor both_nan = a_nan & e_nan;
  if (!at::equal(bits(actual, both_nan), bits(expected, both_nan))) {
    return ::testing::AssertionFailure() << "values differ:\n" << actual << "\nvs\n" << expected;
  }
  return ::testing::AssertionSuccess();
}

// Directory of the models written by tests/cpp/make_python_models.py.
inline std::string test_models_dir() {
  const char* dir = std::getenv("TORCH_SPARSITY_TEST_MODELS");
  return dir == nullptr ? std::string() : std::string(dir);
}

} // namespace sparsity_test
