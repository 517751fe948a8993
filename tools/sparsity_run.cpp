// sparsity_run: the C++ side of a pruned model's trip to LibTorch. It loads a
// TorchScript model whose pruned tensors go through
// torch.classes.sparsity.FakeSparsity or FakeStructuredSparsity (as
// `python -m torch_sparsity.convert` writes them), or an AOTInductor package
// of a model converted with target="export" (torch_sparsity.aoti.compile),
// lists the pruned tensors,
// can change their masks, runs and times inference, and for TorchScript
// models squashes the masks into the weights and saves the result.
// `sparsity_run --help` describes the options; docs/end_to_end.md
// the layout it reads.

#include "aoti/pruned_package.h"
#include "classes/fake_sparsity_class.h"
#include "ops/fake_sparsity.h"
#include "ops/module_utils.h"

#include <ATen/ATen.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr const char* kUsage = R"(usage: sparsity_run MODEL.pt|PACKAGE.pt2 [options]

Loads a TorchScript model pruned with torch.classes.sparsity.FakeSparsity (or
FakeStructuredSparsity, row masks), or
an AOTInductor package (.pt2) written by torch_sparsity.aoti.compile, applies
the mask changes asked for, prints each pruned tensor's fqn, shape and
sparsity, runs inference if an input is given, squashes and saves if asked
(TorchScript models only), in that order. A package's masks change for this
run only.

masks:
  --set-mask FQN=FILE  set the mask of pruned tensor FQN (e.g. layer1.0.conv1.weight)
                       from FILE, a tensor saved by Python's torch.save; repeatable
  --prune LEVEL        re-prune every pruned tensor by magnitude: its mask zeroes the
                       round(LEVEL * numel) entries of smallest |value| (0 <= LEVEL <= 1);
                       a row mask zeroes the round(LEVEL * rows) rows of smallest L1 norm
  --squash             multiply each mask into its tensor (fake_sparsity_) and drop
                       the mask objects: the model then holds no masks
inference:
  --input FILE         input tensor saved by torch.save
  --shape N,C,H,W      or a random normal input of this shape (--seed, default 0)
  --runs N             time N inferences after 2 warm-up ones (default 10)
  --expect FILE        print the largest |output - expected| for a tensor saved by torch.save
  --atol X             and fail (exit 1) when it exceeds X
  --output FILE        save the output tensor (torch.load reads it)
output:
  --save FILE          save the model (torch.jit.save format), after the changes above
  --help               this text

Exit status: 0 on success, 1 when something fails (an unreadable file, a bad mask,
an output beyond --atol), 2 for bad arguments.
)";

// Bad command-line arguments: exit status 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Anything else that goes wrong: exit status 1.
class RunError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string model_path;
  std::vector<std::pair<std::string, std::string>> set_masks; // (fqn, file)
  std::optional<double> prune_level;
  bool squash = false;
  std::string input_path;
  std::vector<int64_t> shape;
  int64_t seed = 0;
  int64_t runs = 10;
  bool runs_given = false;
  std::string expect_path;
  std::optional<double> atol;
  std::string output_path;
  std::string save_path;
};

double parse_double(const std::string& option, const std::string& text) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || !std::isfinite(value)) {
    throw UsageError(option + " expects a number, got '" + text + "'");
  }
  return value;
}

int64_t parse_int(const std::string& option, const std::string& text) {
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size()) {
    throw UsageError(option + " expects an integer, got '" + text + "'");
  }
  return value;
}

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream pieces(text);
  std::string piece;
  while (std::getline(pieces, piece, ',')) {
    const int64_t size = parse_int("--shape", piece);
    if (size <= 0) {
      throw UsageError("--shape sizes must be positive, got '" + text + "'");
    }
    shape.push_back(size);
  }
  if (shape.empty() || text.back() == ',') {
    throw UsageError("--shape expects sizes separated by commas (e.g. 1,3,224,224), got '" + text + "'");
  }
  return shape;
}

Options parse_options(int argc, char** argv) {
  Options options;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    const auto value = [&]() -> const std::string& {
      if (i + 1 >= args.size()) {
        throw UsageError(arg + " needs a value");
      }
      return args[++i];
    };
    if (arg == "--set-mask") {
      const std::string& spec = value();
      const size_t equals = spec.find('=');
      if (equals == std::string::npos || equals == 0 || equals + 1 == spec.size()) {
        throw UsageError("--set-mask expects FQN=FILE, got '" + spec + "'");
      }
      options.set_masks.emplace_back(spec.substr(0, equals), spec.substr(equals + 1));
    } else if (arg == "--prune") {
      const double level = parse_double(arg, value());
      if (level < 0 || level > 1) {
        throw UsageError("--prune expects a sparsity level between 0 and 1, got " + args[i]);
      }
      options.prune_level = level;
    } else if (arg == "--squash") {
      options.squash = true;
    } else if (arg == "--input") {
      options.input_path = value();
    } else if (arg == "--shape") {
      options.shape = parse_shape(value());
    } else if (arg == "--seed") {
      options.seed = parse_int(arg, value());
    } else if (arg == "--runs") {
      options.runs = parse_int(arg, value());
      options.runs_given = true;
      if (options.runs < 1) {
        throw UsageError("--runs expects a positive number of runs, got " + args[i]);
      }
    } else if (arg == "--expect") {
      options.expect_path = value();
    } else if (arg == "--atol") {
      options.atol = parse_double(arg, value());
      if (*options.atol < 0) {
        throw UsageError("--atol expects a tolerance >= 0, got " + args[i]);
      }
    } else if (arg == "--output") {
      options.output_path = value();
    } else if (arg == "--save") {
      options.save_path = value();
    } else if (arg.size() > 1 && arg[0] == '-') {
      throw UsageError("unknown option '" + arg + "'");
    } else if (options.model_path.empty()) {
      options.model_path = arg;
    } else {
      throw UsageError("more than one model given: '" + options.model_path + "' and '" + arg + "'");
    }
  }
  if (options.model_path.empty()) {
    throw UsageError("no model given");
  }
  const bool has_input = !options.input_path.empty() || !options.shape.empty();
  if (!options.input_path.empty() && !options.shape.empty()) {
    throw UsageError("give either --input or --shape, not both");
  }
  if (!has_input && (options.runs_given || !options.expect_path.empty() || !options.output_path.empty())) {
    throw UsageError("--runs, --expect and --output need an input (--input or --shape)");
  }
  if (options.atol && options.expect_path.empty()) {
    throw UsageError("--atol needs --expect");
  }
  return options;
}

std::vector<char> read_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw RunError("cannot read " + what + " '" + path + "'");
  }
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A tensor saved by Python's torch.save (or torch::pickle_save).
at::Tensor load_tensor(const std::string& path, const std::string& what) {
  const std::vector<char> bytes = read_file(path, what);
  c10::IValue value;
  try {
    value = torch::pickle_load(bytes);
  } catch (const c10::Error& error) {
    throw RunError(
        "cannot load " + what + " '" + path + "' (expected a tensor saved with torch.save): " +
        error.what_without_backtrace());
  }
  if (!value.isTensor()) {
    throw RunError(what + " '" + path + "' holds a " + value.tagKind() + ", not a tensor");
  }
  return value.toTensor();
}

void save_tensor(const at::Tensor& tensor, const std::string& path) {
  const std::vector<char> bytes = torch::pickle_save(tensor);
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    throw RunError("cannot write '" + path + "'");
  }
}

// The dtype as Python spells it.
std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBool:
      return "bool";
    case at::kByte:
      return "uint8";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    default:
      return c10::toString(dtype);
  }
}

std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream text;
  text << sizes;
  return text.str();
}

// ------------------------------------------------------------------ models

constexpr const char* kSparsitySuffix = "_sparsity";
constexpr const char* kOriginalSuffix = "_original";

// What the commands need of a pruned model, a TorchScript module or an
// AOTInductor package: its pruned tensors by index, their masks, and forward.
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

// A FakeSparsity or FakeStructuredSparsity object.
bool is_mask_holder(const c10::IValue& value) {
  return value.isCustomClass() &&
      (value.type() == c10::getCustomClassType<c10::intrusive_ptr<sparsity::FakeSparsity>>() ||
       value.type() == c10::getCustomClassType<c10::intrusive_ptr<sparsity::FakeStructuredSparsity>>());
}

c10::intrusive_ptr<sparsity::MaskHolder> as_mask_holder(const c10::IValue& value) {
  if (value.type() == c10::getCustomClassType<c10::intrusive_ptr<sparsity::FakeSparsity>>()) {
    return value.toCustomClass<sparsity::FakeSparsity>();
  }
  return value.toCustomClass<sparsity::FakeStructuredSparsity>();
}

// A row mask (FakeStructuredSparsity, or a structured mask of an
// AOTInductor package): one entry per slice of the tensor along dim 0.
bool is_row_mask(const at::Tensor& mask, c10::IntArrayRef tensor_shape) {
  return mask.sizes() != tensor_shape;
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

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() > suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
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
    for (const auto& tensor : pruned_) {
      const std::string attribute = tensor.name + kSparsitySuffix;
      if (!c10::NoneType::get()->isSubtypeOf(*tensor.owner.type()->getAttribute(attribute))) {
        throw RunError(
            "--squash: cannot drop the mask of " + tensor.fqn + ": its attribute " + attribute +
            " is not declared Optional, so it cannot become None (models written by python -m torch_sparsity.convert "
            "declare it so)");
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
  // FakeStructuredSparsity) object,
  // and the tensor the mask applies to is `owner.<name>_original` (the
  // converter's layout) or else `owner.<name>` (a hand-written module that
  // calls `self.<name>_sparsity.forward(self.<name>)`).
  struct PrunedTensor {
    std::string fqn;
    torch::jit::Module owner;
    std::string name;
    at::Tensor tensor;
    c10::intrusive_ptr<sparsity::MaskHolder> sparsity;
  };

  void find_pruned_tensors() {
    for (const auto& module : model_.named_modules()) {
      if (!sparsity::utils::module_contains_param(module.value, "FakeSparsity") &&
          !sparsity::utils::module_contains_param(module.value, "FakeStructuredSparsity")) {
        continue;
      }
      for (const auto& attribute : module.value.named_attributes(/*recurse=*/false)) {
        if (!is_mask_holder(attribute.value) || !ends_with(attribute.name, kSparsitySuffix)) {
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
        PrunedTensor pruned;
        pruned.fqn = module.name.empty() ? name : module.name + "." + name;
        pruned.owner = module.value;
        pruned.name = name;
        pruned.tensor = tensor.toTensor();
        pruned.sparsity = as_mask_holder(attribute.value);
        fqns_.push_back(pruned.fqn);
        pruned_.push_back(std::move(pruned));
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

  void squash() override { throw RunError(kFixedPackage("--squash")); }
  void save(const std::string&) override { throw RunError(kFixedPackage("--save")); }

  static std::string kFixedPackage(const std::string& option) {
    return option + " works on TorchScript models only: an AOTInductor package's tensors are compiled in (squash "
        "the model in Python with torch_sparsity.convert.squash and compile it again)";
  }

 private:
  std::unique_ptr<sparsity::aoti::PrunedPackage> package_;
};

// ------------------------------------------------------------------- masks

size_t find_by_fqn(const PrunedModel& model, const std::string& fqn) {
  const auto& fqns = model.fqns();
  for (size_t i = 0; i < fqns.size(); ++i) {
    if (fqns[i] == fqn) {
      return i;
    }
  }
  std::string known;
  for (size_t i = 0; i < fqns.size() && i < 5; ++i) {
    known += (i ? ", " : "") + fqns[i];
  }
  if (fqns.size() > 5) {
    known += ", ...";
  }
  throw RunError(
      "--set-mask: the model has no pruned tensor '" + fqn + "'" +
      (fqns.empty() ? std::string(" (it has none)") : " (it has " + known + ")"));
}

// Fraction of mask entries equal to zero (NaN for an empty mask).
double sparsity_level(const at::Tensor& mask) {
  if (mask.numel() == 0) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  const int64_t nonzero = at::count_nonzero(mask).item<int64_t>();
  return static_cast<double>(mask.numel() - nonzero) / static_cast<double>(mask.numel());
}

void set_mask_from_file(PrunedModel& model, size_t i, const std::string& path) {
  at::Tensor mask = load_tensor(path, "mask file");
  const double before = sparsity_level(model.mask(i));
  try {
    model.set_mask(i, mask);
  } catch (const c10::Error& error) {
    throw RunError("--set-mask " + model.fqns()[i] + ": " + error.what_without_backtrace());
  }
  std::cout << "set the mask of " << model.fqns()[i] << " from " << path << ": sparsity " << std::fixed
            << std::setprecision(3) << before << " -> " << sparsity_level(model.mask(i)) << "\n";
}

// Zeroes the mask at the round(level * numel) entries of smallest |tensor|
// (the tensor before masking, so a mask can grow back), ones elsewhere. A row
// mask zeroes whole rows: those of smallest L1 norm, as torch.ao.pruning's
// SaliencyPruner ranks them.
void prune_by_magnitude(PrunedModel& model, size_t i, double level) {
  c10::NoGradGuard no_grad;
  const at::Tensor tensor = model.values(i);
  const bool rows = is_row_mask(model.mask(i), tensor.sizes());
  const at::Tensor magnitude =
      rows ? tensor.detach().abs().reshape({tensor.size(0), -1}).sum(1) : tensor.detach().abs().flatten();
  const int64_t numel = magnitude.numel();
  const auto zeros = static_cast<int64_t>(std::llround(level * static_cast<double>(numel)));
  at::Tensor mask = at::ones({numel}, magnitude.options().dtype(at::kBool));
  if (zeros > 0) {
    const at::Tensor smallest = std::get<1>(at::topk(magnitude, zeros, /*dim=*/0, /*largest=*/false));
    mask.index_fill_(0, smallest, false);
  }
  model.set_mask(i, rows ? mask : mask.view(tensor.sizes()));
}

void print_pruned_tensors(const PrunedModel& model) {
  const auto& fqns = model.fqns();
  size_t width = 3;
  for (const auto& fqn : fqns) {
    width = std::max(width, fqn.size());
  }
  std::cout << "pruned tensors: " << fqns.size() << "\n";
  if (fqns.empty()) {
    return;
  }
  std::cout << "  " << std::left << std::setw(static_cast<int>(width)) << "fqn" << "  " << std::setw(18) << "shape"
            << std::setw(10) << "mask" << "sparsity\n";
  int64_t zeros = 0;
  int64_t total = 0;
  int64_t mask_bytes = 0;
  for (size_t i = 0; i < fqns.size(); ++i) {
    const at::Tensor mask = model.mask(i);
    zeros += mask.numel() - at::count_nonzero(mask).item<int64_t>();
    total += mask.numel();
    mask_bytes += static_cast<int64_t>(mask.nbytes());
    std::cout << "  " << std::left << std::setw(static_cast<int>(width)) << fqns[i] << "  " << std::setw(18)
              << shape_string(model.shape(i)) << std::setw(10) << dtype_name(mask.scalar_type())
              << std::fixed << std::setprecision(3) << sparsity_level(mask) << "\n";
  }
  std::cout << "  all pruned tensors: " << zeros << " of " << total << " entries masked ("
            << std::fixed << std::setprecision(3) << (total ? static_cast<double>(zeros) / total : 0.0) << ")\n";
  std::cout << "  the masks take " << std::setprecision(1) << static_cast<double>(mask_bytes) / (1 << 20)
            << " MiB\n";
}

// ---------------------------------------------------------------- inference

// Median milliseconds of `runs` calls after two warm-up calls (TorchScript's
// profiling executor optimizes the graph during the first runs).
double time_forward_ms(PrunedModel& model, const at::Tensor& input, int64_t runs) {
  model.forward(input);
  model.forward(input);
  std::vector<double> times;
  for (int64_t i = 0; i < runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    model.forward(input);
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

double max_abs_diff(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  if (actual.sizes() != expected.sizes()) {
    throw RunError(
        "the output has shape " + shape_string(actual.sizes()) + " but " + what + " has " +
        shape_string(expected.sizes()));
  }
  if (actual.numel() == 0) {
    return 0;
  }
  return (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
}

std::unique_ptr<PrunedModel> load_model(const Options& options) {
  if (ends_with(options.model_path, ".pt2")) {
    if (options.squash || !options.save_path.empty()) {
      throw RunError(PackageModel::kFixedPackage(options.squash ? "--squash" : "--save"));
    }
    return std::make_unique<PackageModel>(options.model_path);
  }
  return std::make_unique<ScriptedModel>(options.model_path);
}

int run(const Options& options) {
  std::unique_ptr<PrunedModel> model = load_model(options);

  for (const auto& [fqn, path] : options.set_masks) {
    set_mask_from_file(*model, find_by_fqn(*model, fqn), path);
  }
  if (options.prune_level) {
    for (size_t i = 0; i < model->fqns().size(); ++i) {
      prune_by_magnitude(*model, i, *options.prune_level);
    }
    std::cout << "re-pruned " << model->fqns().size() << " tensors by magnitude to sparsity " << *options.prune_level
              << "\n";
  }
  print_pruned_tensors(*model);

  bool within_tolerance = true;
  const bool has_input = !options.input_path.empty() || !options.shape.empty();
  at::Tensor input;
  at::Tensor output;
  if (has_input) {
    if (!options.input_path.empty()) {
      input = load_tensor(options.input_path, "input file");
    } else {
      at::manual_seed(static_cast<uint64_t>(options.seed));
      input = at::randn(options.shape);
    }
    c10::NoGradGuard no_grad;
    output = model->forward(input);
    std::cout << "output " << shape_string(output.sizes()) << " for input " << shape_string(input.sizes()) << "\n";
    if (!options.expect_path.empty()) {
      const double diff = max_abs_diff(output, load_tensor(options.expect_path, "expected output file"), options.expect_path);
      std::cout << "max |output - expected| = " << std::scientific << std::setprecision(3) << diff << std::defaultfloat
                << "\n";
      if (options.atol && !(diff <= *options.atol)) {
        std::cout << "FAILED: beyond --atol " << *options.atol << "\n";
        within_tolerance = false;
      }
    }
    if (!options.output_path.empty()) {
      save_tensor(output, options.output_path);
    }
    std::cout << "median inference time over " << options.runs << " runs: " << std::fixed << std::setprecision(2)
              << time_forward_ms(*model, input, options.runs) << " ms\n";
  }

  if (options.squash) {
    model->squash();
    if (has_input) {
      c10::NoGradGuard no_grad;
      const double diff = max_abs_diff(model->forward(input), output, "the output before squashing");
      std::cout << "squashed model: max |output - output before squashing| = " << std::scientific
                << std::setprecision(3) << diff << std::defaultfloat << ", median inference time " << std::fixed
                << std::setprecision(2) << time_forward_ms(*model, input, options.runs) << " ms\n";
    }
  }

  if (!options.save_path.empty()) {
    model->save(options.save_path);
    std::cout << "saved the model to " << options.save_path << "\n";
  }
  return within_tolerance ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::cout << kUsage;
      return 0;
    }
  }
  try {
    return run(parse_options(argc, argv));
  } catch (const UsageError& error) {
    std::cerr << "sparsity_run: " << error.what() << "\n(sparsity_run --help describes the options)\n";
    return 2;
  } catch (const RunError& error) {
    std::cerr << "sparsity_run: " << error.what() << "\n";
    return 1;
  } catch (const c10::Error& error) {
    std::cerr << "sparsity_run: " << error.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "sparsity_run: " << error.what() << "\n";
    return 1;
  }
}
