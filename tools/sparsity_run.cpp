// sparsity_run: the C++ side of a pruned model's trip to LibTorch. It loads a
// TorchScript model whose pruned tensors go through
// torch.classes.sparsity.FakeSparsity (as `python -m torch_sparsity.convert`
// writes them), lists the pruned tensors, can change their masks, runs and
// times inference, squashes the masks into the weights and saves the result.
// `sparsity_run --help` describes the options; docs/end_to_end.md
// the layout it reads.

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
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr const char* kUsage = R"(usage: sparsity_run MODEL.pt [options]

Loads a TorchScript model pruned with torch.classes.sparsity.FakeSparsity,
applies the mask changes asked for, prints each pruned tensor's fqn, shape and
sparsity, runs inference if an input is given, squashes and saves if asked,
in that order.

masks:
  --set-mask FQN=FILE  set the mask of pruned tensor FQN (e.g. layer1.0.conv1.weight)
                       from FILE, a tensor saved by Python's torch.save; repeatable
  --prune LEVEL        re-prune every pruned tensor by magnitude: its mask zeroes the
                       round(LEVEL * numel) entries of smallest |value| (0 <= LEVEL <= 1)
  --squash             multiply each mask into its tensor (fake_sparsity_) and drop
                       the FakeSparsity objects: the model then holds no masks
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

// ---------------------------------------------------------------- pruned tensors

constexpr const char* kSparsitySuffix = "_sparsity";
constexpr const char* kOriginalSuffix = "_original";

// One pruned tensor: `owner.<name>_sparsity` is its FakeSparsity object, and
// the tensor the mask applies to is `owner.<name>_original` (the converter's
// layout) or else `owner.<name>` (a hand-written module that calls
// `self.<name>_sparsity.forward(self.<name>)`).
struct PrunedTensor {
  std::string fqn;
  torch::jit::Module owner;
  std::string name;
  at::Tensor tensor;
  c10::intrusive_ptr<sparsity::FakeSparsity> sparsity;
};

bool is_fake_sparsity(const c10::IValue& value) {
  return value.isCustomClass() &&
      value.type() == c10::getCustomClassType<c10::intrusive_ptr<sparsity::FakeSparsity>>();
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() > suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<PrunedTensor> find_pruned_tensors(const torch::jit::Module& model) {
  std::vector<PrunedTensor> found;
  for (const auto& module : model.named_modules()) {
    if (!sparsity::utils::module_contains_param(module.value, "FakeSparsity")) {
      continue;
    }
    for (const auto& attribute : module.value.named_attributes(/*recurse=*/false)) {
      if (!is_fake_sparsity(attribute.value) || !ends_with(attribute.name, kSparsitySuffix)) {
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
      pruned.sparsity = attribute.value.toCustomClass<sparsity::FakeSparsity>();
      found.push_back(std::move(pruned));
    }
  }
  return found;
}

PrunedTensor& find_by_fqn(std::vector<PrunedTensor>& pruned, const std::string& fqn) {
  for (auto& tensor : pruned) {
    if (tensor.fqn == fqn) {
      return tensor;
    }
  }
  std::string known;
  for (size_t i = 0; i < pruned.size() && i < 5; ++i) {
    known += (i ? ", " : "") + pruned[i].fqn;
  }
  if (pruned.size() > 5) {
    known += ", ...";
  }
  throw RunError(
      "--set-mask: the model has no pruned tensor '" + fqn + "'" +
      (pruned.empty() ? std::string(" (it has none)") : " (it has " + known + ")"));
}

void set_mask_from_file(PrunedTensor& pruned, const std::string& path) {
  at::Tensor mask = load_tensor(path, "mask file");
  const double before = pruned.sparsity->sparsity_level();
  try {
    pruned.sparsity->update_mask(mask); // in place: the held mask stays the same tensor
  } catch (const c10::Error& error) {
    throw RunError("--set-mask " + pruned.fqn + ": " + error.what_without_backtrace());
  }
  std::cout << "set the mask of " << pruned.fqn << " from " << path << ": sparsity " << std::fixed
            << std::setprecision(3) << before << " -> " << pruned.sparsity->sparsity_level() << "\n";
}

// Zeroes the mask at the round(level * numel) entries of smallest |tensor|
// (the tensor before masking, so a mask can grow back), ones elsewhere.
void prune_by_magnitude(PrunedTensor& pruned, double level) {
  c10::NoGradGuard no_grad;
  const at::Tensor magnitude = pruned.tensor.detach().abs().flatten();
  const int64_t numel = magnitude.numel();
  const auto zeros = static_cast<int64_t>(std::llround(level * static_cast<double>(numel)));
  at::Tensor mask = at::ones({numel}, magnitude.options().dtype(at::kBool));
  if (zeros > 0) {
    const at::Tensor smallest = std::get<1>(at::topk(magnitude, zeros, /*dim=*/0, /*largest=*/false));
    mask.index_fill_(0, smallest, false);
  }
  pruned.sparsity->update_mask(mask.view(pruned.tensor.sizes()));
}

void print_pruned_tensors(const std::vector<PrunedTensor>& pruned) {
  size_t width = 3;
  for (const auto& tensor : pruned) {
    width = std::max(width, tensor.fqn.size());
  }
  std::cout << "pruned tensors: " << pruned.size() << "\n";
  if (pruned.empty()) {
    return;
  }
  std::cout << "  " << std::left << std::setw(static_cast<int>(width)) << "fqn" << "  " << std::setw(18) << "shape"
            << std::setw(10) << "mask" << "sparsity\n";
  int64_t zeros = 0;
  int64_t total = 0;
  int64_t mask_bytes = 0;
  for (const auto& tensor : pruned) {
    const at::Tensor mask = tensor.sparsity->mask();
    const double level = tensor.sparsity->sparsity_level();
    zeros += mask.numel() - at::count_nonzero(mask).item<int64_t>();
    total += mask.numel();
    mask_bytes += static_cast<int64_t>(mask.nbytes());
    std::cout << "  " << std::left << std::setw(static_cast<int>(width)) << tensor.fqn << "  " << std::setw(18)
              << shape_string(tensor.tensor.sizes()) << std::setw(10) << dtype_name(mask.scalar_type())
              << std::fixed << std::setprecision(3) << level << "\n";
  }
  std::cout << "  all pruned tensors: " << zeros << " of " << total << " entries masked ("
            << std::fixed << std::setprecision(3) << (total ? static_cast<double>(zeros) / total : 0.0) << ")\n";
  std::cout << "  the masks take " << std::setprecision(1) << static_cast<double>(mask_bytes) / (1 << 20)
            << " MiB\n";
}

// fake_sparsity_ on each tensor, then the FakeSparsity object is dropped: the
// converter declares these attributes Optional, so they can become None, and
// the model's code then reads the tensor directly. Checked for every tensor
// before any is changed.
void squash(std::vector<PrunedTensor>& pruned) {
  for (const auto& tensor : pruned) {
    const std::string attribute = tensor.name + kSparsitySuffix;
    if (!c10::NoneType::get()->isSubtypeOf(*tensor.owner.type()->getAttribute(attribute))) {
      throw RunError(
          "--squash: cannot drop the mask of " + tensor.fqn + ": its attribute " + attribute +
          " is not declared Optional, so it cannot become None (models written by python -m torch_sparsity.convert "
          "declare it so)");
    }
  }
  for (auto& tensor : pruned) {
    {
      c10::NoGradGuard no_grad;
      at::Tensor target = tensor.tensor;
      sparsity::ops::fake_sparsity_(target, tensor.sparsity->mask());
    }
    tensor.owner.setattr(tensor.name + kSparsitySuffix, c10::IValue());
  }
  std::cout << "squashed " << pruned.size() << " masks into their tensors; the model holds no masks now\n";
  pruned.clear();
}

// ---------------------------------------------------------------- inference

at::Tensor forward(torch::jit::Module& model, const at::Tensor& input) {
  c10::IValue output;
  try {
    output = model.forward({input});
  } catch (const c10::Error& error) {
    throw RunError(
        "inference failed on an input of shape " + shape_string(input.sizes()) + ": " + error.what_without_backtrace());
  } catch (const std::exception& error) { // errors raised by TorchScript code
    throw RunError("inference failed on an input of shape " + shape_string(input.sizes()) + ": " + error.what());
  }
  if (!output.isTensor()) {
    throw RunError("the model's forward returned a " + std::string(output.tagKind()) + ", not a tensor");
  }
  return output.toTensor();
}

// Median milliseconds of `runs` calls after two warm-up calls (TorchScript's
// profiling executor optimizes the graph during the first runs).
double time_forward_ms(torch::jit::Module& model, const at::Tensor& input, int64_t runs) {
  forward(model, input);
  forward(model, input);
  std::vector<double> times;
  for (int64_t i = 0; i < runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    forward(model, input);
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
  torch::jit::Module model;
  try {
    model = torch::jit::load(options.model_path);
  } catch (const c10::Error& error) {
    throw RunError("cannot load the model '" + options.model_path + "': " + error.what_without_backtrace());
  }
  model.eval();
  std::vector<PrunedTensor> pruned = find_pruned_tensors(model);

  for (const auto& [fqn, path] : options.set_masks) {
    set_mask_from_file(find_by_fqn(pruned, fqn), path);
  }
  if (options.prune_level) {
    for (auto& tensor : pruned) {
      prune_by_magnitude(tensor, *options.prune_level);
    }
    std::cout << "re-pruned " << pruned.size() << " tensors by magnitude to sparsity " << *options.prune_level
              << "\n";
  }
  print_pruned_tensors(pruned);

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
    output = forward(model, input);
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
              << time_forward_ms(model, input, options.runs) << " ms\n";
  }

  if (options.squash) {
    squash(pruned);
    if (has_input) {
      c10::NoGradGuard no_grad;
      const double diff = max_abs_diff(forward(model, input), output, "the output before squashing");
      std::cout << "squashed model: max |output - output before squashing| = " << std::scientific
                << std::setprecision(3) << diff << std::defaultfloat << ", median inference time " << std::fixed
                << std::setprecision(2) << time_forward_ms(model, input, options.runs) << " ms\n";
    }
  }

  if (!options.save_path.empty()) {
    try {
      model.save(options.save_path);
    } catch (const c10::Error& error) {
      throw RunError("cannot save the model to '" + options.save_path + "': " + error.what_without_backtrace());
    }
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
