// Loads a scripted model that uses torch.classes.sparsity.FakeSparsity and
// the tensors Python computed on it (see tests/cpp/make_python_models.py),
// runs forward and backward, and prints how far the results are from
// Python's. Exit status 0 only when every one is equal.

#include <torch/script.h>
#include <torch/torch.h>

#include <iostream>
#include <map>
#include <string>

namespace {

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

std::string grad_key(std::string fqn) {
  for (size_t i = fqn.find('.'); i != std::string::npos; i = fqn.find('.', i)) {
    fqn.replace(i, 1, "__");
  }
  return "grad__" + fqn;
}

} // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt EXPECTED.pt\n";
    return 2;
  }
  try {
    torch::jit::Module model = torch::jit::load(argv[1]);
    std::map<std::string, at::Tensor> expected;
    for (const auto& buffer : torch::jit::load(argv[2]).named_buffers()) {
      expected[buffer.name] = buffer.value;
    }
    std::vector<at::Tensor> params;
    std::vector<std::string> names;
    for (const auto& p : model.named_parameters()) {
      names.push_back(p.name);
      params.push_back(p.value);
    }
    const at::Tensor output = model.forward({expected.at("input")}).toTensor();
    const auto grads = torch::autograd::grad({output.square().sum()}, params);

    const double output_diff = max_abs_diff(output, expected.at("output"));
    double grad_diff = 0;
    for (size_t i = 0; i < names.size(); ++i) {
      grad_diff = std::max(grad_diff, max_abs_diff(grads[i], expected.at(grad_key(names[i]))));
    }
    std::cout << "output shape " << output.sizes() << ", max |C++ - Python| output " << output_diff
              << ", weight gradients (" << names.size() << " tensors) " << grad_diff << "\n";
    return output_diff == 0 && grad_diff == 0 ? 0 : 1;
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  }
}
