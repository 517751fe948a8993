#include "tools/options.h"

#include <cmath>
#include <exception>
#include <sstream>

namespace sparsity_run {

const char* const kUsage = R"(usage: sparsity_run MODEL.pt|PACKAGE.pt2 [options]

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

namespace {

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

// Combinations of options that mean nothing.
void check_combinations(const Options& options) {
  if (options.model_path.empty()) {
    throw UsageError("no model given");
  }
  if (!options.input_path.empty() && !options.shape.empty()) {
    throw UsageError("give either --input or --shape, not both");
  }
  if (!options.has_input() && (options.runs_given || !options.expect_path.empty() || !options.output_path.empty())) {
    throw UsageError("--runs, --expect and --output need an input (--input or --shape)");
  }
  if (options.atol && options.expect_path.empty()) {
    throw UsageError("--atol needs --expect");
  }
}

} // namespace

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
  check_combinations(options);
  return options;
}

} // namespace sparsity_run
