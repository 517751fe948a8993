// Models scripted and saved by Python (tests/cpp/make_python_models.py),
// loaded with torch::jit::load: forward and backward equal what Python
// computed, and malformed FakeSparsity states are clear errors.

#include "classes/fake_sparsity_class.h"
#include "test_helpers.h"

#include <torch/script.h>
#include <torch/torch.h>

#include <fstream>
#include <map>
#include <string>

using sparsity_test::same_bits;
using sparsity_test::test_models_dir;

namespace {

std::map<std::string, at::Tensor> load_expected(const std::string& path) {
  std::map<std::string, at::Tensor> tensors;
  for (const auto& buffer : torch::jit::load(path).named_buffers()) {
    tensors[buffer.name] = buffer.value;
  }
  return tensors;
}

std::string grad_key(std::string fqn) {
  for (size_t i = fqn.find('.'); i != std::string::npos; i = fqn.find('.', i)) {
    fqn.replace(i, 1, "__");
  }
  return "grad__" + fqn;
}

// Loads the model named by the parameter and what Python computed on it.
class PythonModel : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const std::string dir = test_models_dir();
    if (dir.empty()) {
      GTEST_SKIP() << "TORCH_SPARSITY_TEST_MODELS is not set (run through ctest, which writes the models)";
    }
    model = torch::jit::load(dir + "/" + GetParam() + ".pt");
    expected = load_expected(dir + "/" + GetParam() + "_expected.pt");
  }

  torch::jit::Module model{"unloaded"};
  std::map<std::string, at::Tensor> expected;
};

} // namespace

TEST_P(PythonModel, ForwardAndBackwardEqualPython) {

  std::vector<at::Tensor> params;
  std::vector<std::string> names;
  for (const auto& p : model.named_parameters()) {
    names.push_back(p.name);
    params.push_back(p.value);
  }
  const at::Tensor output = model.forward({expected.at("input")}).toTensor();
  EXPECT_TRUE(same_bits(output, expected.at("output")));
  const auto grads = torch::autograd::grad({output.square().sum()}, params);
  ASSERT_EQ(grads.size(), names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    EXPECT_TRUE(same_bits(grads[i], expected.at(grad_key(names[i])))) << names[i];
  }
}

TEST_P(PythonModel, MasksAreLiveInCpp) {
  torch::NoGradGuard no_grad;
  int64_t masks = 0;
  for (const auto& sub : model.named_modules()) {
    if (!sub.value.hasattr("weight_sparsity")) {
      continue;
    }
    auto fs = sub.value.attr("weight_sparsity").toCustomClass<sparsity::FakeSparsity>();
    EXPECT_GT(fs->sparsity_level(), 0.3) << sub.name;
    EXPECT_LT(fs->sparsity_level(), 0.7) << sub.name;
    fs->update_mask(torch::ones_like(fs->mask()));
    ++masks;
  }
  EXPECT_GT(masks, 0);
  // With every mask all ones the output is the dense model's: not Python's.
  const at::Tensor output = model.forward({expected.at("input")}).toTensor();
  EXPECT_FALSE(at::allclose(output, expected.at("output")));
}

INSTANTIATE_TEST_SUITE_P(Models, PythonModel, ::testing::Values("small_net", "resnet18"));

TEST(PythonModelFiles, MalformedStatesAreClearErrors) {
  const std::string dir = test_models_dir();
  if (dir.empty()) {
    GTEST_SKIP() << "TORCH_SPARSITY_TEST_MODELS is not set (run through ctest, which writes the models)";
  }
  std::ifstream list(dir + "/bad_states.txt");
  ASSERT_TRUE(list.good());
  std::string file, expected_message;
  int cases = 0;
  while (std::getline(list, file, '\t') && std::getline(list, expected_message)) {
    ++cases;
    try {
      torch::jit::load(dir + "/" + file);
      ADD_FAILURE() << file << " loaded without error";
    } catch (const c10::Error& e) {
      const std::string message = e.what_without_backtrace();
      EXPECT_NE(message.find(expected_message), std::string::npos) << file << ": " << message;
    }
  }
  EXPECT_EQ(cases, 3);
  EXPECT_NO_THROW(torch::jit::load(dir + "/holds_fake_sparsity.pt"));
}
