// The module utilities from C++: the operators run inside scripted methods of
// models written by make_module_utils_models.py, and the C++ API of
// ops/module_utils.h, including a torch.ao.pruning-style convert pass.

#include "ops/module_utils.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/script.h>

#include <cstdlib>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

using sparsity::utils::fqn_to_module;
using sparsity::utils::get_arg_info_from_tensor_fqn;
using sparsity::utils::module_contains_param;
using sparsity::utils::module_to_fqn;
using sparsity::utils::set_submodule;
using sparsity::utils::swap_module;
using sparsity::utils::SwapMapping;
using sparsity::utils::type_before_parametrizations;
using torch::jit::Module;

Module load(const std::string& name) {
  const char* folder = std::getenv("TORCH_SPARSITY_MODULE_UTILS_MODELS");
  if (folder == nullptr) {
    throw std::runtime_error(
        "TORCH_SPARSITY_MODULE_UTILS_MODELS is not set; run through ctest, whose "
        "make_module_utils_models fixture writes the models");
  }
  return torch::jit::load(std::string(folder) + "/" + name);
}

Module submodule(const Module& model, const std::string& path) {
  const c10::IValue found = fqn_to_module(model, path);
  if (!found.isModule()) {
    throw std::runtime_error("no submodule " + path);
  }
  return Module(found.toObject());
}

std::string class_name(const Module& module) {
  return module.type()->name()->name();
}

bool same(const c10::IValue& a, const Module& b) {
  return a.isObject() && a.toObject() == b._ivalue();
}

// The message of the c10::Error that `call` throws ("" if none).
template <typename Call>
std::string error_of(Call&& call) {
  try {
    call();
  } catch (const c10::Error& error) {
    return error.what_without_backtrace();
  }
  return "";
}

// The same for errors raised inside scripted code, which the TorchScript
// interpreter rethrows as its own exception type.
template <typename Call>
std::string script_error_of(Call&& call) {
  try {
    call();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "";
}

c10::IValue call_op(const char* name, std::vector<c10::IValue> args) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  torch::jit::Stack stack(std::move(args));
  op.callBoxed(stack);
  return stack.empty() ? c10::IValue() : stack.back();
}

// torch.ao.pruning's convert on a TorchScript model: swap every module that
// carries FakeSparsity and whose class is mapped, and install the replacement
// in its parent. Returns the paths swapped.
std::vector<std::string> convert(const Module& model, const SwapMapping& mapping) {
  std::vector<std::pair<std::string, Module>> targets;
  for (const auto& item : model.named_modules()) {
    if (!item.name.empty() && module_contains_param(item.value, "FakeSparsity") &&
        mapping.count(type_before_parametrizations(item.value)) != 0) {
      targets.emplace_back(item.name, item.value);
    }
  }
  std::vector<std::string> swapped;
  for (const auto& [name, module] : targets) {
    set_submodule(model, name, swap_module(module, mapping));
    swapped.push_back(name);
  }
  return swapped;
}

at::Tensor run(const Module& module, const at::Tensor& x) {
  return const_cast<Module&>(module).forward({x}).toTensor();
}

// ---------------------------------------------------------------- ops in scripted methods

TEST(ModuleUtilsScripted, EveryOperatorInsideScriptedMethods) {
  Module model = load("convertible_net.pt");
  const Module head_fc = submodule(model, "head.fc");

  EXPECT_EQ(model.get_method("fqn_of_head_fc")({std::string("")}).toStringRef(), "head.fc");
  EXPECT_EQ(model.get_method("fqn_of_head_fc")({std::string("net.")}).toStringRef(), "net.head.fc");
  EXPECT_TRUE(model.get_method("fqn_of_prototype_in_body")({}).isNone());

  EXPECT_TRUE(same(model.get_method("lookup")({std::string("body.1")}), submodule(model, "body.1")));
  EXPECT_TRUE(model.get_method("lookup")({std::string("body..1")}).isNone());
  const c10::IValue weight = model.get_method("lookup_tensor")({std::string("fc2.weight")});
  ASSERT_TRUE(weight.isTensor());
  EXPECT_TRUE(weight.toTensor().is_same(submodule(model, "fc2").attr("weight").toTensor()));
  EXPECT_TRUE(model.get_method("lookup_tensor")({std::string("fc2.weight.x")}).isNone());

  const auto info = model.get_method("tensor_info")({std::string("head.fc.bias")}).toGenericDict();
  EXPECT_EQ(info.at("module_fqn").toStringRef(), "head.fc");
  EXPECT_EQ(info.at("tensor_name").toStringRef(), "bias");
  EXPECT_EQ(info.at("tensor_fqn").toStringRef(), "head.fc.bias");
  EXPECT_TRUE(same(info.at("module"), head_fc));

  EXPECT_TRUE(model.get_method("has_fake_sparsity")({std::string("fc1")}).toBool());
  EXPECT_FALSE(model.get_method("has_fake_sparsity")({std::string("fc2")}).toBool());

  const c10::IValue swapped = model.get_method("swapped_fc1")({});
  ASSERT_TRUE(swapped.isModule());
  EXPECT_EQ(swapped.toObject()->type(), submodule(model, "sparse_prototype").type());
  EXPECT_TRUE(same(model.get_method("swapped_fc2")({}), submodule(model, "fc2")));

  const at::Tensor x = at::randn({5, 4});
  const at::Tensor before = run(model, x);
  model.get_method("convert")({});
  EXPECT_EQ(class_name(submodule(model, "fc1")), "SparseLinear");
  EXPECT_EQ(class_name(submodule(model, "head.fc")), "SparseLinear");
  EXPECT_EQ(class_name(submodule(model, "fc2")), "Linear");
  EXPECT_TRUE(at::allclose(run(model, x), before));
}

TEST(ModuleUtilsScripted, BadInputInsideScriptedMethodIsAnError) {
  Module model = load("convertible_net.pt");
  // fqn_to_module gives None for a missing path; module_contains_param refuses None.
  const std::string message =
      script_error_of([&] { model.get_method("has_fake_sparsity")({std::string("nope")}); });
  EXPECT_NE(message.find("argument 'module' must be a module"), std::string::npos) << message;
}

// ---------------------------------------------------------------- C++ API

TEST(ModuleUtilsApi, ModuleToFqnAndFqnToModuleForEverySubmodule) {
  const Module model = load("convertible_net.pt");
  size_t count = 0;
  for (const auto& item : model.named_modules()) {
    EXPECT_EQ(module_to_fqn(model, item.value), item.name);
    EXPECT_EQ(module_to_fqn(model, item.value, "net."), item.name.empty() ? "" : "net." + item.name);
    EXPECT_TRUE(same(fqn_to_module(model, item.name), item.value)) << item.name;
    ++count;
  }
  EXPECT_EQ(count, 9u); // "", fc1, body, body.0, body.1, fc2, head, head.fc, sparse_prototype
  for (const auto& item : model.named_parameters()) {
    EXPECT_TRUE(fqn_to_module(model, item.name).toTensor().is_same(item.value)) << item.name;
  }
  for (const auto& item : model.named_buffers()) {
    EXPECT_TRUE(fqn_to_module(model, item.name).toTensor().is_same(item.value)) << item.name;
  }
  // A property of a custom class counts as an attribute.
  const c10::IValue mask = fqn_to_module(model, "fc1.weight_sparsity.mask");
  ASSERT_TRUE(mask.isTensor());
  EXPECT_EQ(mask.toTensor().sizes(), (std::vector<int64_t>{8, 4}));

  // Another copy of the model is other objects: not found.
  const Module other = load("convertible_net.pt");
  EXPECT_EQ(module_to_fqn(model, submodule(other, "fc1")), std::nullopt);
  EXPECT_EQ(module_to_fqn(submodule(model, "head"), model), std::nullopt);
}

TEST(ModuleUtilsApi, FqnToModuleMalformedPathsGiveNone) {
  const Module model = load("convertible_net.pt");
  std::string deep;
  for (int i = 0; i < 10000; ++i) {
    deep += i == 0 ? "head" : ".head";
  }
  const std::vector<std::string> paths = {
      ".", "..", "nope", "fc1.", ".fc1", "fc1..weight", "fc1.weight.x", "fc1.weight.x.y",
      "training.x", std::string(100000, 'a'), deep, "\xd1\x81\xd0\xbb\xd0\xbe\xd0\xb9.\xf0\x9f\x98\x80",
      std::string("fc1\0", 4), "\xff\xfe", " "};
  for (const auto& path : paths) {
    EXPECT_TRUE(fqn_to_module(model, path).isNone()) << path.substr(0, 40);
  }
  EXPECT_TRUE(same(fqn_to_module(model, ""), model));
  EXPECT_TRUE(call_op("sparsity::fqn_to_module", {c10::IValue(), std::string("a.b")}).isNone());
}

TEST(ModuleUtilsApi, GetArgInfoFromTensorFqn) {
  const Module model = load("convertible_net.pt");
  auto info = get_arg_info_from_tensor_fqn(model, "head.fc.weight");
  EXPECT_EQ(info.module_fqn, "head.fc");
  EXPECT_EQ(info.tensor_name, "weight");
  EXPECT_EQ(info.tensor_fqn, "head.fc.weight");
  EXPECT_TRUE(same(info.module, submodule(model, "head.fc")));

  info = get_arg_info_from_tensor_fqn(model, "weight");
  EXPECT_EQ(info.module_fqn, "");
  EXPECT_EQ(info.tensor_name, "weight");
  EXPECT_TRUE(same(info.module, model));

  info = get_arg_info_from_tensor_fqn(model, "nope.weight");
  EXPECT_EQ(info.module_fqn, "nope");
  EXPECT_TRUE(info.module.isNone());

  info = get_arg_info_from_tensor_fqn(model, "fc1.");
  EXPECT_EQ(info.module_fqn, "fc1");
  EXPECT_EQ(info.tensor_name, "");
}

TEST(ModuleUtilsApi, ModuleContainsParamBothLayouts) {
  // Parametrize layout, kept by torch.jit.trace.
  const Module mlp = load("pruned_mlp.pt");
  EXPECT_TRUE(module_contains_param(submodule(mlp, "0"), "FakeSparsity"));
  EXPECT_TRUE(module_contains_param(submodule(mlp, "2"), "torch.ao.pruning.sparsifier.utils.FakeSparsity"));
  EXPECT_FALSE(module_contains_param(submodule(mlp, "2"), "Sparsity"));
  EXPECT_FALSE(module_contains_param(submodule(mlp, "1"), "FakeSparsity"));
  EXPECT_FALSE(module_contains_param(mlp, "FakeSparsity"));
  EXPECT_EQ(type_before_parametrizations(submodule(mlp, "0")), "Linear");
  EXPECT_EQ(class_name(submodule(mlp, "0")), "ParametrizedLinear");
  EXPECT_EQ(type_before_parametrizations(submodule(mlp, "1")), "ReLU");

  // FakeSparsity objects held by the module.
  const Module model = load("convertible_net.pt");
  EXPECT_TRUE(module_contains_param(submodule(model, "fc1"), "FakeSparsity"));
  EXPECT_TRUE(module_contains_param(submodule(model, "head.fc"), "sparsity.FakeSparsity"));
  EXPECT_FALSE(module_contains_param(submodule(model, "head"), "FakeSparsity"));
  EXPECT_FALSE(module_contains_param(submodule(model, "fc2"), "FakeSparsity"));
}

TEST(ModuleUtilsApi, SwapTracedParametrizedLinears) {
  const Module mlp = load("pruned_mlp.pt");
  const Module inputs = load("pruned_mlp_input.pt");
  const Module prototype = load("sparse_linear.pt");
  const at::Tensor prototype_weight = prototype.attr("weight").toTensor().clone();
  const SwapMapping mapping = {{"Linear", prototype}};

  const Module relu = submodule(mlp, "1");
  EXPECT_EQ(swap_module(relu, mapping)._ivalue(), relu._ivalue());
  const Module sparse0 = swap_module(submodule(mlp, "0"), mapping);
  const Module sparse2 = swap_module(submodule(mlp, "2"), mapping);
  EXPECT_EQ(sparse0.type(), prototype.type());
  EXPECT_NE(sparse0._ivalue(), prototype._ivalue());

  const at::Tensor original = fqn_to_module(mlp, "0.parametrizations.weight.original").toTensor();
  const at::Tensor mask = fqn_to_module(mlp, "0.parametrizations.weight.0.mask").toTensor();
  EXPECT_GT((mask == 0).sum().item<int64_t>(), 0); // a real mask
  EXPECT_TRUE(at::equal(sparse0.attr("weight").toTensor(), original * mask));

  // The swapped layers compute what the pruned model computes.
  const at::Tensor x = inputs.attr("x").toTensor();
  const at::Tensor y = run(sparse2, run(relu, run(sparse0, x)));
  EXPECT_TRUE(at::allclose(y, inputs.attr("y").toTensor(), 1e-5, 1e-6));
  EXPECT_TRUE(at::equal(prototype.attr("weight").toTensor(), prototype_weight));

  // A traced parent calls its children through their concrete types.
  const std::string message = error_of([&] { set_submodule(mlp, "0", sparse0); });
  EXPECT_NE(message.find("declare the attribute with a module interface type"), std::string::npos) << message;
  EXPECT_EQ(submodule(mlp, "0").type()->name()->name(), "ParametrizedLinear");
}

TEST(ModuleUtilsApi, SwapModuleMovesReplacementToTheDenseDevice) {
  // No GPU needed: 'meta' is another device. The prototype stays on the CPU.
  const Module dense = submodule(load("pruned_mlp.pt"), "0").deepcopy(at::Device(at::kMeta));
  const Module prototype = load("sparse_linear.pt");
  const Module sparse = swap_module(dense, {{"Linear", prototype}});
  for (const at::Tensor& tensor : sparse.parameters()) {
    EXPECT_TRUE(tensor.is_meta());
  }
  for (const at::Tensor& tensor : sparse.buffers()) {
    EXPECT_TRUE(tensor.is_meta());
  }
  EXPECT_FALSE(prototype.attr("weight").toTensor().is_meta());
}

TEST(ModuleUtilsApi, SwapModuleRefusesSeveralDevices) {
  Module dense(c10::QualifiedName("Dense"));
  dense.register_parameter("weight", at::ones({2, 2}), /*is_buffer=*/false);
  dense.register_buffer("on_meta", at::zeros({1}, at::device(at::kMeta)));
  EXPECT_EQ(type_before_parametrizations(dense), "Dense");
  const std::string message = error_of([&] { swap_module(dense, {{"Dense", load("sparse_linear.pt")}}); });
  EXPECT_EQ(
      message,
      "swap_module only works with cpu or single-device CUDA modules, but got devices "
      "{device(type='cpu'), device(type='meta')}");
}

TEST(ModuleUtilsApi, SetSubmoduleChecksTheDeclaredType) {
  const Module model = load("convertible_net.pt");
  // Interface-typed: any module whose methods match, from any compilation unit.
  const Module prototype = load("sparse_linear.pt");
  set_submodule(model, "fc2", prototype);
  EXPECT_TRUE(same(fqn_to_module(model, "fc2"), prototype));
  // Same-typed: exactly the declared type.
  const Module copy = submodule(model, "body.1").deepcopy();
  set_submodule(model, "body.1", copy);
  EXPECT_TRUE(same(fqn_to_module(model, "body.1"), copy));

  const Module fc1 = submodule(model, "fc1");
  const Module head = submodule(model, "head");
  const auto expect_error = [&](const std::string& name, const Module& module, const std::string& expected) {
    const std::string message = error_of([&] { set_submodule(model, name, module); });
    EXPECT_NE(message.find(expected), std::string::npos) << name << ": " << message;
  };
  // A Linear of the same class but from another compilation unit.
  expect_error("body.1", submodule(load("convertible_net.pt"), "body.1"), "is declared with the module type");
  expect_error("fc1", head, "does not implement"); // Head.forward(x), not forward(input)
  expect_error("fc1.weight", head, "is an attribute of type Tensor, not a submodule");
  expect_error("nope", head, "has no attribute 'nope'");
  expect_error("missing.fc", head, "'missing' does not name a submodule");
  EXPECT_TRUE(same(fqn_to_module(model, "fc1"), fc1));
  EXPECT_TRUE(same(fqn_to_module(model, "body.1"), copy));
}

TEST(ModuleUtilsApi, ConvertFlow) {
  const Module model = load("convertible_net.pt");
  // A prototype saved on its own: another compilation unit than the model's.
  const SwapMapping mapping = {{"MaskedLinear", load("sparse_linear.pt")}};
  const at::Tensor x = at::randn({6, 4});
  const at::Tensor before = run(model, x);

  EXPECT_EQ(convert(model, mapping), (std::vector<std::string>{"fc1", "head.fc"}));
  EXPECT_EQ(class_name(submodule(model, "fc1")), "SparseLinear");
  EXPECT_EQ(class_name(submodule(model, "head.fc")), "SparseLinear");
  for (const auto& item : model.named_modules()) {
    EXPECT_FALSE(module_contains_param(item.value, "FakeSparsity")) << item.name;
  }
  EXPECT_TRUE(at::allclose(run(model, x), before));
  EXPECT_TRUE(convert(model, mapping).empty());

  // The converted model saves and loads.
  std::stringstream stream;
  model.save(stream);
  const Module loaded = torch::jit::load(stream);
  EXPECT_TRUE(at::allclose(run(loaded, x), before));
}

TEST(ModuleUtilsOps, BadInputIsAnErrorNotACrash) {
  const Module model = load("convertible_net.pt");
  const c10::IValue module = model._ivalue();
  const auto message_of = [](const char* op, std::vector<c10::IValue> args) {
    return error_of([&] { call_op(op, std::move(args)); });
  };
  EXPECT_NE(
      message_of("sparsity::module_to_fqn", {c10::IValue(), module, std::string("")})
          .find("argument 'model' must be a module (a ScriptModule; from Python pass a ScriptModule or its ._c), "
                "but got None"),
      std::string::npos);
  EXPECT_NE(
      message_of("sparsity::module_to_fqn", {module, at::ones({1}), std::string("")})
          .find("argument 'module' must be a module"),
      std::string::npos);
  EXPECT_NE(
      message_of("sparsity::fqn_to_module", {int64_t{3}, std::string("")}).find("but got a value of type int"),
      std::string::npos);
  EXPECT_NE(
      message_of("sparsity::get_arg_info_from_tensor_fqn", {c10::IValue(), std::string("w")})
          .find("argument 'model' must be a module"),
      std::string::npos);
  EXPECT_NE(
      message_of("sparsity::module_contains_param", {at::ones({1}), std::string("FakeSparsity")})
          .find("argument 'module' must be a module"),
      std::string::npos);

  c10::impl::GenericDict mapping(c10::StringType::get(), c10::AnyType::get());
  mapping.insert("MaskedLinear", int64_t{1});
  const c10::IValue fc1 = fqn_to_module(model, "fc1");
  EXPECT_NE(
      message_of("sparsity::swap_module", {fc1, mapping}).find("mapping['MaskedLinear'] must be a prototype module"),
      std::string::npos);
  mapping.insert_or_assign("MaskedLinear", fqn_to_module(model, "body"));
  EXPECT_NE(
      message_of("sparsity::swap_module", {fc1, mapping}).find("has no scripted method from_dense"),
      std::string::npos);
  EXPECT_NE(
      message_of("sparsity::set_submodule", {module, std::string("fc1"), std::string("x")})
          .find("argument 'new_module' must be a module"),
      std::string::npos);
  EXPECT_TRUE(same(fqn_to_module(model, "fc1"), submodule(model, "fc1")));
}

} // namespace
