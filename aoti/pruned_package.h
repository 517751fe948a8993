#pragma once

// sparsity::aoti::PrunedPackage: an AOTInductor package (.pt2) of a model
// converted with torch_sparsity.convert(model, target="export"), run with its
// masks still live. AOTInductor keeps each mask buffer as a constant of the
// compiled model; this class finds them (package metadata
// naming::kMasksMetadataKey, else the "<T>_mask" / "<T>_original" naming of
// convert, classes/naming.h), names them by the pruned tensor's fqn ("layer1.0.conv1.weight")
// and replaces one for the next runs after checking it.
//
// Also registered as torch.classes.sparsity.PrunedPackage, which
// torch_sparsity.aoti.load wraps for Python.

#include "classes/naming.h"

#include <ATen/core/Tensor.h>
#include <torch/custom_class.h>

#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

namespace torch::inductor {
class AOTIModelPackageLoader;
} // namespace torch::inductor

namespace sparsity::aoti {

class PrunedPackage : public torch::CustomClassHolder {
 public:
  // Metadata key under which torch_sparsity.aoti.compile records the masks:
  // "fqn=mask constant,original constant;..." (packages of earlier versions:
  // "fqn=mask constant;...").
  static constexpr const char* kMasksMetadataKey = naming::kMasksMetadataKey;

  // Loads the package's model `model_name` ("model" unless the package was
  // written with another). Throws c10::Error when the package cannot be
  // loaded or a mask it names is not among its constants.
  explicit PrunedPackage(const std::string& package_path, const std::string& model_name = "model");
  ~PrunedPackage() override;

  // The compiled model's forward on flat tensor inputs; flat outputs.
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs);

  // The pruned tensors' fqns, sorted.
  std::vector<std::string> mask_names() const;

  // A copy of the mask of `fqn` as the next run uses it.
  at::Tensor mask(const std::string& fqn) const;

  // Replaces the mask of `fqn` for the next runs (it waits for runs under
  // way in other threads; runs may go on in parallel with each other). The fqn must be one of
  // mask_names(), and the mask's shape, dtype and device those of the
  // package's mask (AOTInductor's own constant loading does not check the
  // dtype: a float tensor in a bool constant gives wrong results and writes
  // out of bounds). On any error nothing changes.
  void set_mask(const std::string& fqn, const at::Tensor& mask);

  // A copy of the tensor the mask of `fqn` applies to, as compiled into the
  // package (the constant the metadata names, else "<fqn>_original": a
  // tensor tied between modules is compiled under one of its names), for
  // re-pruning by magnitude; nullopt when the package has no such constant.
  std::optional<at::Tensor> original(const std::string& fqn) const;

  // The package's input and output tree specs (torch.utils._pytree), for
  // Python callers that pass nested structures.
  std::vector<std::string> call_spec();

 private:
  struct Mask {
    std::string constant;  // the constant's fqn in the package
    std::string original;  // the fqn of the constant the mask applies to
    at::Tensor value;      // what the package holds, as loaded or last set
  };
  const Mask& find(const std::string& fqn, const char* caller) const;

  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
  std::map<std::string, Mask> masks_;
  mutable std::shared_mutex mutex_;
};

} // namespace sparsity::aoti
