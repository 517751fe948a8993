// sparsity_run: the C++ side of a pruned model's trip to LibTorch. It loads a
// TorchScript model whose pruned tensors go through
// torch.classes.sparsity.FakeSparsity or FakeStructuredSparsity (as
// `python -m torch_sparsity.convert` writes them), or an AOTInductor package
// of a model converted with target="export" (torch_sparsity.aoti.compile),
// lists the pruned tensors, can change their masks, runs and times
// inference, and for TorchScript models squashes the masks into the weights
// and saves the result. `sparsity_run --help` describes the options
// (tools/options.cpp); docs/end_to_end.md the layout it reads; the models
// are tools/pruned_model.cpp.

#include "tools/options.h"
#include "tools/pruned_model.h"

#include <ATen/ATen.h>
#include <torch/serialize.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace sparsity_run {
namespace {

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

int run(const Options& options) {
  if (is_package(options.model_path) && (options.squash || !options.save_path.empty())) {
    throw RunError(package_cannot(options.squash ? "--squash" : "--save"));
  }
  std::unique_ptr<PrunedModel> model = load_pruned_model(options.model_path);

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
  const bool has_input = options.has_input();
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
} // namespace sparsity_run

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::cout << sparsity_run::kUsage;
      return 0;
    }
  }
  try {
    return sparsity_run::run(sparsity_run::parse_options(argc, argv));
  } catch (const sparsity_run::UsageError& error) {
    std::cerr << "sparsity_run: " << error.what() << "\n(sparsity_run --help describes the options)\n";
    return 2;
  } catch (const sparsity_run::RunError& error) {
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
