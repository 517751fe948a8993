#pragma once

// The torch.ao.pruning module utilities (torch.ao.pruning.sparsifier.utils)
// for TorchScript modules. The same functions are the operators
// torch.ops.sparsity.{module_to_fqn, fqn_to_module,
// get_arg_info_from_tensor_fqn, module_contains_param, swap_module,
// set_submodule}, which take modules as `Any`.
//
// Identity: two torch::jit::Module handles are "the same module" when they wrap
// the same c10::ivalue::Object.

#include <ATen/core/ivalue.h>
#include <torch/csrc/jit/api/module.h>

#include <optional>
#include <string>
#include <unordered_map>

namespace sparsity {
namespace utils {

// "" when `module` is `model`; otherwise the path of the first match found by
// a depth-first search of the children (so a shared submodule gets its first
// path), with `prefix` pasted in front without a separator. nullopt when
// `module` is not in `model`.
std::optional<std::string> module_to_fqn(
    const torch::jit::Module& model,
    const torch::jit::Module& module,
    const std::string& prefix = "");

// What `path` names inside `model`: "" gives `model`; otherwise each
// dot-separated name is looked up in turn among the attributes of the object
// reached so far (in TorchScript submodules, parameters, buffers and other
// attributes share one namespace), then among its properties (so
// "sparsity.mask" reaches the mask of a FakeSparsity object). A missing name,
// an empty piece, or a path that goes on through a non-object (a tensor, a
// number) gives None.
c10::IValue fqn_to_module(
    const torch::jit::Module& model,
    const std::string& path);

struct TensorArgInfo {
  std::string module_fqn; // text before the last dot ("" for "weight")
  c10::IValue module; // fqn_to_module(model, module_fqn); None if missing
  std::string tensor_name; // text after the last dot
  std::string tensor_fqn; // the argument
};

TensorArgInfo get_arg_info_from_tensor_fqn(
    const torch::jit::Module& model,
    const std::string& tensor_fqn);

// Whether `module` carries a parametrization whose class is named
// `parametrization` (a class name such as "FakeSparsity", or a dotted suffix
// of the qualified name such as "torch.ao.pruning.sparsifier.utils.FakeSparsity").
// Two layouts count:
//  - PyTorch's parametrize layout, which torch.jit.trace keeps:
//    module.parametrizations.<tensor>.<0, 1, ...> are the parametrizations;
//  - objects of that class held directly as attributes of the module (e.g.
//    torch.classes.sparsity.FakeSparsity).
// Only the module's own tensors count, not its children's (as in PyTorch).
bool module_contains_param(
    const torch::jit::Module& module,
    const std::string& parametrization);

// The class name of `module` before parametrizations: the last component of
// its type's qualified name, without the "Parametrized" that
// torch.nn.utils.parametrize prepends (only when the module has a
// `parametrizations` submodule). A traced parametrized nn.Linear
// (__torch__.torch.nn.utils.parametrize.ParametrizedLinear) gives "Linear".
// These names are the keys of swap_module's mapping.
std::string type_before_parametrizations(const torch::jit::Module& module);

// Maps class names (see type_before_parametrizations) to prototype modules.
using SwapMapping = std::unordered_map<std::string, torch::jit::Module>;

// `mod` itself when its type_before_parametrizations is not a key of
// `mapping`. Otherwise the replacement: a deep copy of the prototype (same
// type, own tensors) on which the prototype's scripted method
// `from_dense(self, dense)` has been called with `mod`, then moved to the
// device of `mod`'s parameters and buffers. A module whose parameters and
// buffers are on several devices is refused before anything is built.
// TorchScript compiles forward hooks into a module's type, so `mod`'s hooks
// cannot move to a replacement of another type: the replacement keeps the
// hooks of its own type, and a warning says when `mod`'s hooks are left behind.
torch::jit::Module swap_module(
    const torch::jit::Module& mod,
    const SwapMapping& mapping);

// Installs `new_module` as the submodule `name` (a dotted path is allowed) of
// `parent`. The attribute must be declared either with a module interface type
// that `new_module` implements, or with exactly `new_module`'s type: the
// parent's compiled code calls the submodule through that type, so any other
// module would be run by the wrong code. Anything else is an error and leaves
// `parent` unchanged.
void set_submodule(
    const torch::jit::Module& parent,
    const std::string& name,
    const torch::jit::Module& new_module);

} // namespace utils
} // namespace sparsity
