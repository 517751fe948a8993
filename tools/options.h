#pragma once

// sparsity_run's command line: what `sparsity_run --help` prints, and the
// options parsed and checked against each other.

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sparsity_run {

extern const char* const kUsage;

// Bad command-line arguments: exit status 2.
class UsageError : public std::runtime_error {
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

  bool has_input() const { return !input_path.empty() || !shape.empty(); }
};

// argv without --help (main answers that first); throws UsageError.
Options parse_options(int argc, char** argv);

} // namespace sparsity_run
