#pragma once

// What sparsity_run's actions need of a pruned model, a TorchScript module
// or an AOTInductor package: its pruned tensors by index, their masks, and
// forward.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace sparsity_run {

// Anything that goes wrong past the command line: exit status 1.
class RunError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class PrunedModel {
 public:
  virtual ~PrunedModel() = default;
  const std::vector<std::string>& fqns() const { return fqns_; }
  virtual std::vector<int64_t> shape(size_t i) const = 0;
  // The mask in use.
  virtual at::Tensor mask(size_t i) const = 0;
  // Replaces the mask's values (in the mask's own dtype, as copy_ converts);
  // throws c10::Error and changes nothing when it does not fit.
  virtual void set_mask(size_t i, const at::Tensor& mask) = 0;
  // The tensor the mask applies to, before masking.
  virtual at::Tensor values(size_t i) const = 0;
  virtual at::Tensor forward(const at::Tensor& input) = 0;
  // Multiplies each mask into its tensor and drops the masks.
  virtual void squash() = 0;
  virtual void save(const std::string& path) = 0;

 protected:
  std::vector<std::string> fqns_;
};

// A .pt2 file: an AOTInductor package, else a TorchScript model.
bool is_package(const std::string& path);

// Loads either kind; throws RunError when it cannot.
std::unique_ptr<PrunedModel> load_pruned_model(const std::string& path);

// What --squash and --save say about a package, whose tensors are compiled in.
std::string package_cannot(const std::string& option);

// A row mask (FakeStructuredSparsity, or a structured mask of an
// AOTInductor package): one entry per slice of the tensor along dim 0.
bool is_row_mask(const at::Tensor& mask, c10::IntArrayRef tensor_shape);

std::string shape_string(c10::IntArrayRef sizes);

} // namespace sparsity_run
