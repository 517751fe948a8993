// The FakeSparsity custom class from C++: used directly, and held by a
// module built in C++, saved and loaded.

#include "classes/fake_sparsity_class.h"
#include "test_helpers.h"

#include <torch/script.h>
#include <torch/torch.h>

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

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

// The inference cache from C++: a server's threads calling forward on one
// object while another thread updates the mask. Every result must be made of
// elements of mask_i * w for the masks used (a forward racing with an update
// may read a mix, as without the cache), and once the updates are done the
// next forward must give the last mask's result, never a stale kept one.
TEST(FakeSparsityClass, CacheUnderConcurrentForwardsAndUpdates) {
  torch::manual_seed(0);
  const at::Tensor weight = torch::randn({64, 64}, torch::requires_grad());
  std::vector<at::Tensor> masks;
  std::vector<at::Tensor> allowed;
  for (int i = 0; i < 4; ++i) {
    masks.push_back(torch::rand({64, 64}) > 0.5);
    allowed.push_back(masks.back() * weight.detach());
  }
  const at::Tensor stacked = torch::stack(allowed);
  auto fs = c10::make_intrusive<FakeSparsity>(masks[0].clone());

  std::atomic<bool> bad{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&] {
      c10::InferenceMode inference; // as a C++ server runs a model
      for (int i = 0; i < 500; ++i) {
        const at::Tensor out = fs->forward(weight);
        if (!(out.unsqueeze(0) == stacked).any(0).all().item<bool>()) {
          bad = true;
        }
      }
    });
  }
  for (int i = 0; i < 50; ++i) {
    fs->update_mask(masks[i % 4]);
  }
  for (auto& t : threads) {
    t.join();
  }
  EXPECT_FALSE(bad);
  EXPECT_GT(fs->cache_hits(), 0);
  fs->update_mask(masks[3]);
  {
    c10::InferenceMode inference;
    EXPECT_TRUE(same_bits(fs->forward(weight), allowed[3]));
    const int64_t hits = fs->cache_hits();
    const at::Tensor again = fs->forward(weight);
    EXPECT_EQ(fs->cache_hits(), hits + 1);
    EXPECT_TRUE(same_bits(again, allowed[3]));
  }
  // Outside inference mode the weight needs a graph: no cache, a grad_fn.
  EXPECT_TRUE(fs->forward(weight).requires_grad());
  fs->set_cache_enabled(false);
  EXPECT_FALSE(fs->cache_enabled());
}

TEST(FakeStructuredSparsityClass, ForwardUpdateAndSaveLoadInAModule) {
  using sparsity::FakeStructuredSparsity;
  torch::manual_seed(0);
  const at::Tensor mask = torch::tensor({true, false, true});
  auto holder = c10::make_intrusive<FakeStructuredSparsity>(mask);
  const at::Tensor weight = torch::randn({3, 4});
  EXPECT_TRUE(same_bits(holder->forward(weight), mask.reshape({-1, 1}) * weight));
  EXPECT_NEAR(holder->sparsity_level(), 1.0 / 3.0, 1e-12);
  EXPECT_THROW(holder->update_mask(torch::ones({3, 1})), c10::Error); // 2-d: not a row mask
  EXPECT_THROW(c10::make_intrusive<FakeStructuredSparsity>(torch::ones({2, 2})), c10::Error);
  EXPECT_TRUE(holder->mask().is_same(mask));

  torch::jit::Module module("RowPrunedWeight");
  module.register_parameter("weight", weight, /*is_buffer=*/false);
  module.register_attribute("weight_sparsity", c10::getCustomClassType<c10::intrusive_ptr<FakeStructuredSparsity>>(),
      c10::IValue(holder));
  module.define(R"(
    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight_sparsity.forward(self.weight)
  )");
  const std::string path = ::testing::TempDir() + "row_pruned_weight_built_in_cpp.pt";
  module.save(path);
  torch::jit::Module loaded = torch::jit::load(path);
  std::remove(path.c_str());
  const at::Tensor x = torch::randn({3, 4});
  EXPECT_TRUE(same_bits(loaded.forward({x}).toTensor(), x * (mask.reshape({-1, 1}) * weight)));
  auto held = loaded.attr("weight_sparsity").toCustomClass<FakeStructuredSparsity>();
  held->update_mask(torch::tensor({true, true, true}));
  EXPECT_TRUE(same_bits(loaded.forward({x}).toTensor(), x * weight));
}
