// Runs an AOTInductor package of a pruned model (torch_sparsity.aoti.compile)
// through sparsity::aoti::PrunedPackage, as a C++ deployment would: lists the
// masks, runs, replaces one mask with zeros, runs again, and checks that a
// mask of the wrong dtype is refused without changing anything.
//
//   run_pruned_package PACKAGE.pt2 EXPECTED.pt FQN
//
// EXPECTED.pt is a scripted module whose buffers are "input", "output" (the
// eager export-target model's) and "output_zeroed" (the same with the mask
// of FQN all zeros). Prints the largest differences relative to the
// output's size; exit status 0 only when all are within 1e-5 and the float
// mask was refused.

#include "aoti/pruned_package.h"

#include <torch/script.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <string>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " PACKAGE.pt2 EXPECTED.pt FQN\n";
    return 2;
  }
  try {
    std::map<std::string, at::Tensor> expected;
    for (const auto& buffer : torch::jit::load(argv[2]).named_buffers()) {
      expected[buffer.name] = buffer.value;
    }
    const std::string fqn = argv[3];
    sparsity::aoti::PrunedPackage package(argv[1]);
    const auto names = package.mask_names();
    std::cout << "masks: " << names.size() << "\n";
    const at::Tensor input = expected.at("input");
    const auto diff = [&](const at::Tensor& expect) {
      const at::Tensor output = package.run({input}).at(0);
      return (output - expect).abs().max().item<double>() / std::max(expect.abs().max().item<double>(), 1e-30);
    };
    const double before = diff(expected.at("output"));
    const at::Tensor mask = package.mask(fqn);
    bool refused = false;
    try {
      package.set_mask(fqn, mask.to(at::kFloat));
    } catch (const c10::Error& e) {
      refused = std::string(e.what_without_backtrace()).find("is Bool in this package") != std::string::npos;
    }
    const double after_refusal = diff(expected.at("output"));
    package.set_mask(fqn, at::zeros_like(mask));
    const double zeroed = diff(expected.at("output_zeroed"));
    std::cout << "relative max |C++ - Python|: before " << before << ", after a refused set_mask " << after_refusal
              << ", with " << fqn << " zeroed " << zeroed << "; float mask refused: " << (refused ? "yes" : "no")
              << "\n";
    const double tolerance = 1e-5;
    return before <= tolerance && after_refusal <= tolerance && zeroed <= tolerance && refused ? 0 : 1;
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
}
