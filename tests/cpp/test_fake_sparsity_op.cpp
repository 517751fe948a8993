// The operators through the C++ API (sparsity::ops), against mask * x.

#include "ops/fake_sparsity.h"
#include "test_helpers.h"

#include <torch/torch.h>

#include <vector>

using sparsity::ops::fake_sparsity;
using sparsity::ops::fake_sparsity_;
using sparsity_test::same_bits;

namespace {

const std::vector<at::ScalarType> kXDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
const std::vector<at::ScalarType> kMaskDtypes = {
    at::kBool, at::kByte, at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
const std::vector<std::vector<int64_t>> kShapes = {
    {}, {0}, {3, 0, 2}, {1}, {7}, {5, 3}, {2, 3, 4}, {2, 3, 4, 5}, {2, 1, 3, 4, 5}};

at::Tensor random_x(at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor x = torch::randn(shape, torch::kDouble) * 4;
  if (x.numel() > 2) {
    auto flat = x.view(-1);
    flat[0] = std::numeric_limits<double>::infinity();
    flat[1] = std::numeric_limits<double>::quiet_NaN();
    flat[2] = -0.0;
  }
  return x.to(dtype);
}

at::Tensor random_mask(at::IntArrayRef shape, at::ScalarType dtype) {
  return (torch::rand(shape) > 0.5).to(dtype);
}

} // namespace

TEST(FakeSparsityOp, MatchesMaskTimesXOverDtypesAndShapes) {
  torch::manual_seed(0);
  for (const auto& shape : kShapes) {
    for (auto x_dtype : kXDtypes) {
      for (auto mask_dtype : kMaskDtypes) {
        const at::Tensor x = random_x(shape, x_dtype);
        const at::Tensor mask = random_mask(shape, mask_dtype);
        EXPECT_TRUE(same_bits(fake_sparsity(x, mask), mask * x))
            << "x " << x_dtype << " mask " << mask_dtype << " shape " << at::IntArrayRef(shape);
      }
    }
  }
}

TEST(FakeSparsityOp, NonContiguousInputs) {
  torch::manual_seed(0);
  const at::Tensor x = random_x({6, 8, 10}, at::kFloat);
  const at::Tensor mask = random_mask({6, 8, 10}, at::kBool);
  const at::Tensor xt = x.transpose(0, 2), mt = mask.transpose(0, 2);
  EXPECT_TRUE(same_bits(fake_sparsity(xt, mt), mt * xt));
  const at::Tensor xs = x.slice(1, 1, 8, 3), ms = mask.slice(1, 0, 8, 3);
  EXPECT_TRUE(same_bits(fake_sparsity(xs, ms), ms * xs));
  const at::Tensor expanded = mask.slice(0, 0, 1).expand({6, 8, 10});
  EXPECT_TRUE(same_bits(fake_sparsity(x, expanded), expanded * x));
}

TEST(FakeSparsityOp, InPlaceMatchesMul) {
  torch::manual_seed(0);
  for (auto x_dtype : kXDtypes) {
    for (auto mask_dtype : kMaskDtypes) {
      at::Tensor x = random_x({4, 5}, x_dtype);
      const at::Tensor mask = random_mask({4, 5}, mask_dtype);
      const at::Tensor expected = x.clone().mul_(mask);
      at::Tensor& result = fake_sparsity_(x, mask);
      EXPECT_TRUE(result.is_same(x));
      EXPECT_TRUE(same_bits(x, expected));
    }
  }
}

TEST(FakeSparsityOp, BackwardMatchesMaskTimesX) {
  torch::manual_seed(0);
  const at::Tensor x = torch::randn({3, 4}, torch::requires_grad());
  const at::Tensor mask = torch::rand({3, 4}, torch::requires_grad());
  const at::Tensor grad = torch::randn({3, 4});
  const auto ours = torch::autograd::grad({fake_sparsity(x, mask)}, {x, mask}, {grad});
  const auto reference = torch::autograd::grad({mask * x}, {x, mask}, {grad});
  EXPECT_TRUE(same_bits(ours[0], reference[0]));
  EXPECT_TRUE(same_bits(ours[1], reference[1]));

  // A bool mask: only x gets a gradient, and it is grad where the mask holds.
  const at::Tensor bool_mask = torch::rand({3, 4}) > 0.5;
  const auto x_grad = torch::autograd::grad({fake_sparsity(x, bool_mask)}, {x}, {grad});
  EXPECT_TRUE(same_bits(x_grad[0], grad * bool_mask));
}

TEST(FakeSparsityOp, DoubleBackwardMatchesMaskTimesX) {
  torch::manual_seed(0);
  const at::Tensor x = torch::randn({3, 4}, torch::dtype(torch::kDouble).requires_grad(true));
  const at::Tensor mask = torch::rand({3, 4}, torch::dtype(torch::kDouble).requires_grad(true));
  std::vector<std::vector<at::Tensor>> results;
  for (int use_plugin = 0; use_plugin < 2; ++use_plugin) {
    const at::Tensor y = use_plugin ? fake_sparsity(x, mask) : mask * x;
    const auto gx = torch::autograd::grad({y.pow(2).sum()}, {x}, {}, true, true);
    results.push_back(torch::autograd::grad({gx[0].sum()}, {x, mask}));
  }
  EXPECT_TRUE(at::equal(results[0][0], results[1][0]));
  EXPECT_TRUE(at::equal(results[0][1], results[1][1]));
}

TEST(FakeSparsityOp, ShapeMismatchNamesBothShapes) {
  const at::Tensor x = torch::randn({3, 4});
  const at::Tensor mask = torch::ones({4, 3}, torch::kBool);
  try {
    fake_sparsity(x, mask);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    EXPECT_NE(message.find("[4, 3]"), std::string::npos) << message;
    EXPECT_NE(message.find("[3, 4]"), std::string::npos) << message;
  }
}

TEST(FakeSparsityOp, FailedInPlaceChangesNothing) {
  at::Tensor x = torch::randn({3, 4});
  const at::Tensor before = x.clone();
  EXPECT_THROW(fake_sparsity_(x, torch::ones({4, 3})), c10::Error);
  EXPECT_THROW(fake_sparsity_(x, torch::ones({3, 4}, torch::kInt)), c10::Error);
  EXPECT_THROW(fake_sparsity_(x, torch::ones({3, 4}, torch::device(torch::kMeta))), c10::Error);
  EXPECT_TRUE(at::equal(x, before));
  at::Tensor ints = torch::ones({3}, torch::kLong);
  EXPECT_THROW(fake_sparsity_(ints, torch::ones({3})), c10::Error);
}

// ---------------------------------------------------- fake_structured_sparsity

namespace {

at::Tensor row_reference(const at::Tensor& x, const at::Tensor& mask) {
  std::vector<int64_t> rows(x.dim(), 1);
  rows[0] = -1;
  return mask.reshape(rows) * x;
}

} // namespace

TEST(FakeStructuredSparsityOp, MatchesRowMaskTimesXOverDtypesAndShapes) {
  torch::manual_seed(0);
  for (const auto& shape : kShapes) {
    if (shape.empty()) {
      continue; // a row mask needs dim 0
    }
    for (auto x_dtype : kXDtypes) {
      for (auto mask_dtype : kMaskDtypes) {
        const at::Tensor x = random_x(shape, x_dtype);
        const at::Tensor mask = random_mask({shape[0]}, mask_dtype);
        EXPECT_TRUE(same_bits(sparsity::ops::fake_structured_sparsity(x, mask), row_reference(x, mask)))
            << "x " << x_dtype << " mask " << mask_dtype << " shape " << at::IntArrayRef(shape);
        const at::Tensor xt = x.dim() >= 2 ? x.transpose(0, 1).contiguous().transpose(0, 1) : x;
        EXPECT_TRUE(same_bits(sparsity::ops::fake_structured_sparsity(xt, mask), row_reference(xt, mask)));
      }
    }
  }
}

TEST(FakeStructuredSparsityOp, BackwardAndDoubleBackwardMatchTheReference) {
  torch::manual_seed(0);
  const at::Tensor x = torch::randn({4, 3, 2}, torch::dtype(torch::kDouble).requires_grad(true));
  const at::Tensor mask = torch::rand({4}, torch::dtype(torch::kDouble).requires_grad(true));
  const auto ours = torch::autograd::grad(
      {sparsity::ops::fake_structured_sparsity(x, mask).square().sum()}, {x, mask}, {}, true, true);
  const auto theirs = torch::autograd::grad({row_reference(x, mask).square().sum()}, {x, mask}, {}, true, true);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(at::allclose(ours[i], theirs[i], 1e-12, 1e-12)) << i;
  }
  const auto ours2 = torch::autograd::grad({ours[0].sum() + ours[1].sum()}, {x, mask});
  const auto theirs2 = torch::autograd::grad({theirs[0].sum() + theirs[1].sum()}, {x, mask});
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(at::allclose(ours2[i], theirs2[i], 1e-12, 1e-12)) << i;
  }
}

TEST(FakeStructuredSparsityOp, BadShapesNameBoth) {
  try {
    sparsity::ops::fake_structured_sparsity(torch::ones({3, 2}), torch::ones({2}));
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("mask shape [2] must be [x.size(0)] for x of shape [3, 2]"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(sparsity::ops::fake_structured_sparsity(torch::ones({}), torch::ones({1})), c10::Error);
}
