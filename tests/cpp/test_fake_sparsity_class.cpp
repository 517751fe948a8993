// The FakeSparsity custom class from C++: used directly, and held by a
// module built in C++, saved and loaded.

#include "classes/fake_sparsity_class.h"
#include "test_helpers.h"

#include <torch/script.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>

using sparsity::FakeSparsity;
using sparsity_test::same_bits;

TEST(FakeSparsityClass, ForwardMaskAndUpdate) {
  torch::manual_seed(0);
  const at::Tensor mask = torch::rand({4, 5}) > 0.5;
  auto fs = c10::make_intrusive<FakeSparsity>(mask);
  const at::Tensor x = torch::randn({4, 5});
  EXPECT_TRUE(same_bits(fs->forward(x), mask * x));
  EXPECT_TRUE(fs->mask().is_same(mask));

  fs->update_mask(torch::zeros({4, 5}));
  EXPECT_TRUE(fs->mask().is_same(mask));
  EXPECT_FALSE(mask.any().item<bool>());
  EXPECT_DOUBLE_EQ(fs->sparsity_level(), 1.0);
  EXPECT_TRUE(fs->state_dict().empty());
}

TEST(FakeSparsityClass, BadUpdateChangesNothing) {
  const at::Tensor mask = torch::ones({2, 3}, torch::kBool);
  auto fs = c10::make_intrusive<FakeSparsity>(mask);
  EXPECT_THROW(fs->update_mask(torch::zeros({3, 2})), c10::Error);
  EXPECT_THROW(fs->update_mask(torch::zeros({2, 3}, torch::kInt)), c10::Error);
  EXPECT_TRUE(mask.all().item<bool>());
  EXPECT_THROW(c10::make_intrusive<FakeSparsity>(torch::ones({2}, torch::kLong)), c10::Error);
}

TEST(FakeSparsityClass, ModuleBuiltInCppSavesAndLoads) {
  torch::manual_seed(0);
  const at::Tensor mask = torch::rand({3, 4}) > 0.5;
  const at::Tensor weight = torch::randn({3, 4}, torch::requires_grad());

  torch::jit::Module module("SparseWeight");
  module.register_parameter("weight", weight, /*is_buffer=*/false);
  module.register_attribute(
      "weight_sparsity",
      c10::getCustomClassType<c10::intrusive_ptr<FakeSparsity>>(),
      c10::IValue(c10::make_intrusive<FakeSparsity>(mask)));
  module.define(R"(
    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight_sparsity.forward(self.weight)
  )");

  const std::string path = ::testing::TempDir() + "sparse_weight_built_in_cpp.pt";
  module.save(path);
  torch::jit::Module loaded = torch::jit::load(path);
  std::remove(path.c_str());

  const at::Tensor x = torch::randn({3, 4});
  const at::Tensor expected = x * (mask * weight.detach());
  EXPECT_TRUE(same_bits(loaded.forward({x}).toTensor(), expected));
  EXPECT_TRUE(loaded.named_buffers().size() == 0);

  auto held = loaded.attr("weight_sparsity").toCustomClass<FakeSparsity>();
  EXPECT_TRUE(at::equal(held->mask(), mask));
  EXPECT_FALSE(held->mask().is_same(mask)); // loaded from the file

  // Backward through the loaded module.
  at::Tensor loaded_weight = loaded.attr("weight").toTensor();
  const auto grads = torch::autograd::grad({loaded.forward({x}).toTensor().sum()}, {loaded_weight});
  EXPECT_TRUE(same_bits(grads[0], x * mask));
}
