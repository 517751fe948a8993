#include "aoti/pruned_package.h"
#include "ops/registration.h"

#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <exception>
#include <set>
#include <sstream>
#include <unordered_map>
#include <utility>

namespace sparsity::aoti {
namespace {

// The constants of one pruned tensor: its mask and the tensor it applies to.
struct Constants {
  std::string mask;
  std::string original;
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// tensor fqn -> its constants, from "fqn=mask,original;..." (",original"
// may be missing: packages of earlier versions have none).
std::map<std::string, Constants> parse_masks_metadata(const std::string& text) {
  std::map<std::string, Constants> result;
  std::stringstream entries(text);
  std::string entry;
  while (std::getline(entries, entry, ';')) {
    if (entry.empty()) {
      continue;
    }
    const auto eq = entry.find('=');
    const auto comma = entry.find(',', eq == std::string::npos ? 0 : eq);
    const auto mask_end = comma == std::string::npos ? entry.size() : comma;
    TORCH_CHECK(eq != std::string::npos && eq > 0 && eq + 1 < mask_end && mask_end + 1 != entry.size(),
        "PrunedPackage: malformed metadata entry '", entry, "' under ", naming::kMasksMetadataKey);
    const std::string fqn = entry.substr(0, eq);
    const std::string original =
        comma == std::string::npos ? fqn + naming::kOriginalSuffix : entry.substr(comma + 1);
    result.emplace(fqn, Constants{entry.substr(eq + 1, mask_end - eq - 1), original});
  }
  return result;
}

// Without metadata: convert's naming, "<T>_mask" next to "<T>_original".
std::map<std::string, Constants> masks_by_naming(const std::vector<std::string>& constants) {
  const std::set<std::string> names(constants.begin(), constants.end());
  std::map<std::string, Constants> result;
  for (const auto& constant : constants) {
    if (!ends_with(constant, naming::kMaskSuffix)) {
      continue;
    }
    const std::string fqn = constant.substr(0, constant.size() - std::string(naming::kMaskSuffix).size());
    if (names.count(fqn + naming::kOriginalSuffix)) {
      result.emplace(fqn, Constants{constant, fqn + naming::kOriginalSuffix});
    }
  }
  return result;
}

} // namespace

PrunedPackage::PrunedPackage(const std::string& package_path, const std::string& model_name) {
  try {
    loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package_path, model_name);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "PrunedPackage: cannot load '", package_path, "': ", e.what_without_backtrace());
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "PrunedPackage: cannot load '", package_path, "': ", e.what());
  }
  const auto metadata = loader_->get_metadata();
  const auto recorded = metadata.find(naming::kMasksMetadataKey);
  const auto constants = loader_->get_constant_fqns();
  const auto by_fqn = recorded != metadata.end() ? parse_masks_metadata(recorded->second) : masks_by_naming(constants);
  // The values the compiled model starts with, by constant fqn.
  const auto values = loader_->get_runner()->extract_constants_map(/*use_inactive=*/false);
  for (const auto& [fqn, constants] : by_fqn) {
    const auto value = values.find(constants.mask);
    TORCH_CHECK(value != values.end(), "PrunedPackage: '", package_path, "' names '", constants.mask,
        "' as the mask of ", fqn, ", but the compiled model has no such constant (AOTInductor inlines tensors of "
        "8 or fewer elements unless compiled with always_keep_tensor_constants, as torch_sparsity.aoti.compile does)");
    masks_.emplace(fqn, Mask{constants.mask, constants.original, value->second.clone()});
  }
}

PrunedPackage::~PrunedPackage() = default;

std::vector<at::Tensor> PrunedPackage::run(const std::vector<at::Tensor>& inputs) {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return loader_->run(inputs);
}

std::vector<std::string> PrunedPackage::mask_names() const {
  std::vector<std::string> names;
  names.reserve(masks_.size());
  for (const auto& entry : masks_) {
    names.push_back(entry.first);
  }
  return names;
}

const PrunedPackage::Mask& PrunedPackage::find(const std::string& fqn, const char* caller) const {
  const auto it = masks_.find(fqn);
  if (it == masks_.end()) {
    std::string names;
    size_t shown = 0;
    for (const auto& entry : masks_) {
      if (shown == 8) {
        names += ", ... (" + std::to_string(masks_.size()) + " in all)";
        break;
      }
      names += (shown++ ? ", " : "") + entry.first;
    }
    TORCH_CHECK(false, "PrunedPackage.", caller, ": no pruned tensor '", fqn, "' in this package; its pruned tensors: ",
        names.empty() ? "none" : names);
  }
  return it->second;
}

at::Tensor PrunedPackage::mask(const std::string& fqn) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  return find(fqn, "mask").value.clone();
}

void PrunedPackage::set_mask(const std::string& fqn, const at::Tensor& mask) {
  // Not while a run reads the constants.
  std::unique_lock<std::shared_mutex> lock(mutex_);
  const Mask& held = find(fqn, "set_mask");
  const at::Tensor& current = held.value;
  TORCH_CHECK(mask.defined(), "PrunedPackage.set_mask: the mask of ", fqn, " is an undefined tensor");
  TORCH_CHECK(mask.layout() == c10::kStrided, "PrunedPackage.set_mask: the mask of ", fqn,
      " must be a strided (dense) tensor, got layout ", mask.layout());
  TORCH_CHECK(mask.sizes() == current.sizes(), "PrunedPackage.set_mask: the mask of ", fqn, " has shape ",
      current.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == current.scalar_type(), "PrunedPackage.set_mask: the mask of ", fqn, " is ",
      current.scalar_type(), " in this package (AOTInductor compiled its kernels for that dtype), got ",
      mask.scalar_type());
  TORCH_CHECK(mask.device() == current.device(), "PrunedPackage.set_mask: the mask of ", fqn, " is on ",
      current.device(), ", got a mask on ", mask.device());
  // The package's own layout, filled with the new values: AOTInductor reads
  // its constants with the strides it compiled for.
  at::Tensor staged = at::empty_strided(current.sizes(), current.strides(), current.options());
  staged.copy_(mask);
  std::unordered_map<std::string, at::Tensor> update{{held.constant, staged}};
  loader_->load_constants(update, /*use_inactive=*/false, /*check_full_update=*/false, /*user_managed=*/false);
  masks_.at(fqn).value = std::move(staged);
}

std::optional<at::Tensor> PrunedPackage::original(const std::string& fqn) const {
  std::shared_lock<std::shared_mutex> lock(mutex_);
  const Mask& held = find(fqn, "original");
  const auto values = loader_->get_runner()->extract_constants_map(/*use_inactive=*/false);
  const auto it = values.find(held.original);
  if (it == values.end()) {
    return std::nullopt;
  }
  return it->second.clone();
}

std::vector<std::string> PrunedPackage::call_spec() {
  return loader_->get_call_spec();
}

SPARSITY_LIBRARY_FRAGMENT(m) {
  m.class_<PrunedPackage>("PrunedPackage")
      .def(torch::init<std::string, std::string>(), "", {torch::arg("package_path"), torch::arg("model_name") = "model"})
      .def("run", &PrunedPackage::run)
      .def("mask_names", &PrunedPackage::mask_names)
      .def("mask", &PrunedPackage::mask)
      .def("set_mask", &PrunedPackage::set_mask)
      .def("call_spec", &PrunedPackage::call_spec);
}

} // namespace sparsity::aoti
