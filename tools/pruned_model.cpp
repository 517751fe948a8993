#include "tools/pruned_model.h"

#include "aoti/pruned_package.h"
#include "classes/fake_sparsity_class.h"
#include "classes/naming.h"
#include "ops/fake_sparsity.h"
#include "ops/module_utils.h"

#include <torch/script.h>

#include <iostream>
#include <set>
#include <sstream>
#include <unordered_map>
#include <utility>

namespace sparsity_run {

using sparsity::naming::kOriginalSuffix;
using sparsity::naming::kSparsitySuffix;

bool is_row_mask(const at::Tensor& mask, c10::IntArrayRef tensor_shape) {
  return mask.sizes() != tensor_shape;
}

std::string shape_string(c10::IntArrayRef sizes) {
  std::ostringstream text;
  text << sizes;
  return text.str();
}

std::string package_cannot(const std::string& option) {
  return option + " works on TorchScript models only: an AOTInductor package's tensors are compiled in (squash "
      "the model in Python with torch_sparsity.convert.squash and compile it again)";
}

namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() > suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The FakeSparsity or FakeStructuredSparsity object `value` holds; null for
// anything else.
c10::intrusive_ptr<sparsity::MaskHolder> mask_holder(const c10::IValue& value) {
  if (!value.isCustomClass()) {
    return nullptr;
  }
  if (value.type() == c10::getCustomClassType<c10::intrusive_ptr<sparsity::FakeSparsity>>()) {
    return value.toCustomClass<sparsity::FakeSparsity>();
  }
  if (value.type() == c10::getCustomClassType<c10::intrusive_ptr<sparsity::FakeStructuredSparsity>>()) {
    return value.toCustomClass<sparsity::FakeStructuredSparsity>();
  }
  return nullptr;
}

// A structured pruner's bias (the converted BiasHook, with prune_bias): the
// hook zeroes the rows the weight's mask prunes on each forward; squashed,
// the mask is gone, so the bias holds those zeros itself (as Python's squash
// makes it).
void zero_pruned_bias_rows(const torch::jit::Module& owner, const at::Tensor& row_mask) {
  if (!owner.hasattr("_bias") || !owner.hasattr("prune_bias")) {
    return;
  }
  const c10::IValue bias = owner.attr("_bias");
  const c10::IValue prune_bias = owner.attr("prune_bias");
  if (bias.isTensor() && prune_bias.isBool() && prune_bias.toBool()) {
    bias.toTensor().masked_fill_(row_mask.eq(0), 0);
  }
}

std::string inference_error(const at::Tensor& input, const std::string& what) {
  return "inference failed on an input of shape " + shape_string(input.sizes()) + ": " + what;
}

// A TorchScript model: each pruned tensor is a FakeSparsity object held next
// to its tensor, found with the module utilities' C++ API.
class ScriptedModel : public PrunedModel {
 public:
  explicit ScriptedModel(const std::string& path) {
    try {
      model_ = torch::jit::load(path);
    } catch (const c10::Error& error) {
      throw RunError("cannot load the model '" + path + "': " + error.what_without_backtrace());
    }
    model_.eval();
    find_pruned_tensors();
  }

  std::vector<int64_t> shape(size_t i) const override { return pruned_[i].tensor.sizes().vec(); }
  at::Tensor mask(size_t i) const override { return pruned_[i].sparsity->mask(); }
  void set_mask(size_t i, const at::Tensor& mask) override {
    pruned_[i].sparsity->update_mask(mask); // in place: the held mask stays the same tensor
  }
  at::Tensor values(size_t i) const override { return pruned_[i].tensor; }

  at::Tensor forward(const at::Tensor& input) override {
    c10::IValue output;
    try {
      output = model_.forward({input});
    } catch (const c10::Error& error) {
      throw RunError(inference_error(input, error.what_without_backtrace()));
    } catch (const std::exception& error) { // errors raised by TorchScript code
      throw RunError(inference_error(input, error.what()));
    }
    if (!output.isTensor()) {
      throw RunError("the model's forward returned a " + std::string(output.tagKind()) + ", not a tensor");
    }
    return output.toTensor();
  }

  // fake_sparsity_ on each tensor, then the FakeSparsity object is dropped:
  // the converter declares these attributes Optional, so they can become
  // None, and the model's code then reads the tensor directly. Checked for
  // every tensor before any is changed.
  void squash() override {
    check_untied();
    for (const auto& tensor : pruned_) {
      const std::string attribute = tensor.name + kSparsitySuffix;
      std::vector<torch::jit::Module> owners = tensor.other_owners;
      owners.push_back(tensor.owner);
      for (const auto& owner : owners) {
        if (!c10::NoneType::get()->isSubtypeOf(*owner.type()->getAttribute(attribute))) {
          throw RunError(
              "--squash: cannot drop the mask of " + tensor.fqn + ": its attribute " + attribute +
              " is not declared Optional, so it cannot become None (models written by python -m "
              "torch_sparsity.convert declare it so)");
        }
      }
    }
    for (auto& tensor : pruned_) {
      {
        c10::NoGradGuard no_grad;
        at::Tensor target = tensor.tensor;
        const at::Tensor mask = tensor.sparsity->mask();
        if (is_row_mask(mask, target.sizes())) {
          std::vector<int64_t> rows(target.dim(), 1);
          rows[0] = -1;
          target.mul_(mask.reshape(rows)); // what fake_structured_sparsity computes
          if (tensor.name == "weight") {
            zero_pruned_bias_rows(tensor.owner, mask);
          }
        } else {
          sparsity::ops::fake_sparsity_(target, mask);
        }
      }
      tensor.owner.setattr(tensor.name + kSparsitySuffix, c10::IValue());
      for (auto& owner : tensor.other_owners) {
        owner.setattr(tensor.name + kSparsitySuffix, c10::IValue());
      }
    }
    std::cout << "squashed " << pruned_.size() << " masks into their tensors; the model holds no masks now\n";
    pruned_.clear();
    fqns_.clear();
  }

  void save(const std::string& path) override {
    try {
      model_.save(path);
    } catch (const c10::Error& error) {
      throw RunError("cannot save the model to '" + path + "': " + error.what_without_backtrace());
    }
  }

 private:
  // One pruned tensor: `owner.<name>_sparsity` is its FakeSparsity (or
  // FakeStructuredSparsity) object, and the tensor the mask applies to is
  // `owner.<name>_original` (the converter's layout) or else `owner.<name>`
  // (a hand-written module that calls
  // `self.<name>_sparsity.forward(self.<name>)`).
  struct PrunedTensor {
    std::string fqn;
    torch::jit::Module owner;
    std::string name;
    at::Tensor tensor;
    c10::intrusive_ptr<sparsity::MaskHolder> sparsity;
    std::vector<torch::jit::Module> other_owners;  // the same module under later paths
  };

  // A module reached by several paths holds one mask: a scripted model holds
  // a copy of the module under each path, all with the same FakeSparsity
  // object, and the mask goes by the first path, as in Python.
  // --squash multiplies each mask into its tensor: refused where that tensor
  // is also read under another mask or none (a tied weight), as in Python.
  void check_untied() const {
    std::unordered_map<const c10::TensorImpl*, std::set<const c10::TensorImpl*>> masks_reading;
    for (const auto& tensor : pruned_) {
      masks_reading[tensor.tensor.unsafeGetTensorImpl()];
    }
    for (const auto& module : model_.named_modules()) {
      const auto read = [&](const std::string& name, const at::Tensor& value) {
        const auto it = masks_reading.find(value.unsafeGetTensorImpl());
        if (it == masks_reading.end()) {
          return;
        }
        const std::string base = ends_with(name, kOriginalSuffix)
            ? name.substr(0, name.size() - std::string(kOriginalSuffix).size()) : name;
        const auto holder = module.value.hasattr(base + kSparsitySuffix)
            ? mask_holder(module.value.attr(base + kSparsitySuffix)) : nullptr;
        it->second.insert(holder ? holder->mask().unsafeGetTensorImpl() : nullptr);
      };
      for (const auto& parameter : module.value.named_parameters(/*recurse=*/false)) {
        read(parameter.name, parameter.value);
      }
      for (const auto& buffer : module.value.named_buffers(/*recurse=*/false)) {
        read(buffer.name, buffer.value);
      }
    }
    for (const auto& tensor : pruned_) {
      if (masks_reading.at(tensor.tensor.unsafeGetTensorImpl()).size() > 1) {
        throw RunError("--squash: the tensor of " + tensor.fqn + " is tied to another module's (one tensor read "
            "under different masks or none); squashing its mask into it would change the other's results: untie "
            "them first");
      }
    }
  }

  void find_pruned_tensors() {
    std::unordered_map<const c10::TensorImpl*, size_t> seen;
    for (const auto& module : model_.named_modules()) {
      for (const auto& attribute : module.value.named_attributes(/*recurse=*/false)) {
        auto holder = mask_holder(attribute.value);
        if (!holder || !ends_with(attribute.name, kSparsitySuffix)) {
          continue;
        }
        const auto first = seen.emplace(holder->mask().unsafeGetTensorImpl(), pruned_.size());
        if (!first.second) {
          pruned_[first.first->second].other_owners.push_back(module.value);
          continue;
        }
        const std::string name = attribute.name.substr(0, attribute.name.size() - std::string(kSparsitySuffix).size());
        c10::IValue tensor = sparsity::utils::fqn_to_module(module.value, name + kOriginalSuffix);
        if (!tensor.isTensor()) {
          tensor = sparsity::utils::fqn_to_module(module.value, name);
        }
        if (!tensor.isTensor()) {
          std::cerr << "warning: " << (module.name.empty() ? "" : module.name + ".") << attribute.name
                    << " has no tensor " << name << kOriginalSuffix << " or " << name << " to apply to; skipped\n";
          continue;
        }
        const std::string fqn = module.name.empty() ? name : module.name + "." + name;
        fqns_.push_back(fqn);
        pruned_.push_back({fqn, module.value, name, tensor.toTensor(), std::move(holder), {}});
      }
    }
  }

  torch::jit::Module model_;
  std::vector<PrunedTensor> pruned_;
};

// An AOTInductor package: the masks are constants of the compiled model,
// replaced through sparsity::aoti::PrunedPackage (for this run only).
class PackageModel : public PrunedModel {
 public:
  explicit PackageModel(const std::string& path) {
    try {
      package_ = std::make_unique<sparsity::aoti::PrunedPackage>(path);
    } catch (const c10::Error& error) {
      throw RunError("cannot load the package '" + path + "': " + error.what_without_backtrace());
    }
    fqns_ = package_->mask_names();
  }

  std::vector<int64_t> shape(size_t i) const override { return mask(i).sizes().vec(); }
  at::Tensor mask(size_t i) const override { return package_->mask(fqns_[i]); }
  void set_mask(size_t i, const at::Tensor& mask) override {
    // The package checks the dtype strictly; a file's mask converts to it as
    // FakeSparsity.update_mask converts (nonzero is True for a bool mask).
    const at::Tensor held = package_->mask(fqns_[i]);
    package_->set_mask(fqns_[i], mask.sizes() == held.sizes() ? mask.to(held.scalar_type()) : mask);
  }
  at::Tensor values(size_t i) const override {
    auto original = package_->original(fqns_[i]);
    if (!original) {
      throw RunError("--prune: the package has no constant " + fqns_[i] + kOriginalSuffix + " to prune by");
    }
    return *original;
  }

  at::Tensor forward(const at::Tensor& input) override {
    std::vector<at::Tensor> outputs;
    try {
      outputs = package_->run({input});
    } catch (const c10::Error& error) {
      throw RunError(inference_error(input, error.what_without_backtrace()));
    } catch (const std::exception& error) {
      throw RunError(inference_error(input, error.what()));
    }
    if (outputs.size() != 1) {
      throw RunError("the package's model returned " + std::to_string(outputs.size()) + " tensors, not one");
    }
    return outputs[0];
  }

  void squash() override { throw RunError(package_cannot("--squash")); }
  void save(const std::string&) override { throw RunError(package_cannot("--save")); }

 private:
  std::unique_ptr<sparsity::aoti::PrunedPackage> package_;
};

} // namespace

bool is_package(const std::string& path) {
  return ends_with(path, ".pt2");
}

std::unique_ptr<PrunedModel> load_pruned_model(const std::string& path) {
  if (is_package(path)) {
    return std::make_unique<PackageModel>(path);
  }
  return std::make_unique<ScriptedModel>(path);
}

} // namespace sparsity_run
