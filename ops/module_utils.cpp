// The module utilities (see module_utils.h) and their TorchScript operators.

#include "ops/module_utils.h"
#include "ops/registration.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/_has_compatible_shallow_copy_type.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

namespace sparsity {
namespace utils {

namespace {

using torch::jit::Module;

constexpr std::string_view kParametrizedPrefix = "Parametrized";
constexpr std::string_view kMangleMarker = "___torch_mangle_";

bool is_module_value(const c10::IValue& value) {
  return value.isObject() && value.toObjectRef().type()->is_module();
}

// A type's name for messages: the qualified name, without the address of the
// compilation unit that repr_str() appends to class types.
std::string type_name(const c10::Type& type) {
  if (const auto* named = type.castRaw<c10::NamedType>(); named && named->name()) {
    return named->name()->qualifiedName();
  }
  return type.repr_str();
}

// What a value is, for error messages.
std::string describe(const c10::IValue& value) {
  if (value.isNone()) {
    return "None";
  }
  if (value.isObject()) {
    const auto& type = *value.toObjectRef().type();
    return std::string(type.is_module() ? "a module of type " : "an object of type ") + type_name(type);
  }
  return "a value of type " + type_name(*value.type());
}

Module as_module(const c10::IValue& value, const char* op, const char* arg) {
  TORCH_CHECK(
      is_module_value(value),
      op,
      ": argument '",
      arg,
      "' must be a module (a ScriptModule; from Python pass a ScriptModule or its ._c), but got ",
      describe(value));
  return Module(value.toObject());
}

// The qualified name without the ___torch_mangle_N components that
// TorchScript inserts to tell apart types compiled from the same class.
std::string demangled_name(const c10::ClassType& type) {
  const auto& name = type.name();
  if (!name) {
    return "";
  }
  std::string result;
  for (const auto& atom : name->atoms()) {
    if (std::string_view(atom).substr(0, kMangleMarker.size()) == kMangleMarker) {
      continue;
    }
    if (!result.empty()) {
      result += '.';
    }
    result += atom;
  }
  return result;
}

std::string class_name(const c10::ClassType& type) {
  const auto& name = type.name();
  return name ? name->name() : "";
}

// `parametrization` names `type` when it is the class name, the demangled
// qualified name, or a dotted suffix of it.
bool class_is_named(const c10::ClassType& type, const std::string& parametrization) {
  if (parametrization.empty()) {
    return false;
  }
  const std::string qualified = demangled_name(type);
  if (qualified == parametrization) {
    return true;
  }
  return qualified.size() > parametrization.size() &&
      qualified.compare(qualified.size() - parametrization.size(), parametrization.size(), parametrization) == 0 &&
      qualified[qualified.size() - parametrization.size() - 1] == '.';
}

// The submodule `name` of `module`, if it has one.
std::optional<Module> child_module(const Module& module, const std::string& name) {
  const auto slot = module.type()->findAttributeSlot(name);
  if (!slot) {
    return std::nullopt;
  }
  c10::IValue value = module._ivalue()->getSlot(*slot);
  if (!is_module_value(value)) {
    return std::nullopt;
  }
  return Module(value.toObject());
}

torch::jit::Function* property_getter(const c10::ClassType& type, const std::string& name) {
  for (const auto& property : type.properties()) {
    if (property.name == name) {
      return property.getter;
    }
  }
  return nullptr;
}

// Walks `path` from `root`; see fqn_to_module in the header.
c10::IValue walk_path(const c10::IValue& root, const std::string& path) {
  if (path.empty()) {
    return root;
  }
  c10::IValue current = root;
  size_t begin = 0;
  while (true) {
    const size_t dot = path.find('.', begin);
    const size_t end = dot == std::string::npos ? path.size() : dot;
    if (!current.isObject()) {
      return c10::IValue();
    }
    const auto& object = current.toObjectRef();
    const std::string name = path.substr(begin, end - begin);
    // An empty piece is never an attribute or property name: it gives None.
    const auto slot = object.type()->findAttributeSlot(name);
    if (slot && object.type()->getAttribute(*slot)->kind() != c10::TypeKind::CapsuleType) {
      current = object.getSlot(*slot);
    } else if (torch::jit::Function* getter = property_getter(*object.type(), name)) {
      // Properties count as attributes, as for Python's getattr (e.g. the
      // `mask` of a torch.classes.sparsity.FakeSparsity).
      c10::IValue self = current;
      try {
        current = (*getter)({std::move(self)});
      } catch (const std::exception& e) {
        // The interpreter's own exception type is no RuntimeError in Python.
        TORCH_CHECK(false, "the property '", name, "' of an object of type ", type_name(*object.type()),
            " raised an error while reading the path '", path, "': ", e.what());
      }
    } else {
      // Includes a custom class's internal `capsule` slot (the C++ object,
      // which must never come out: Python cannot use it safely).
      return c10::IValue();
    }
    if (dot == std::string::npos) {
      return current;
    }
    begin = dot + 1;
  }
}

// The path of `target` below `node`: depth-first over the submodules in
// attribute order, checking each child before descending into it, as
// PyTorch's module_to_fqn does. Walks the slots directly (no named_children()
// lists, no names built until found): the search visits every submodule.
std::optional<std::string> path_below(const c10::ivalue::Object& node, const c10::ivalue::Object& target,
    std::unordered_set<const c10::ivalue::Object*>& visited) {
  // A module reached twice (shared, or a cycle built by hand) is searched once.
  if (!visited.insert(&node).second) {
    return std::nullopt;
  }
  const auto& type = node.type();
  for (size_t slot = 0; slot < type->numAttributes(); ++slot) {
    if (!type->getAttribute(slot)->is_module()) {
      continue;
    }
    const c10::IValue& child = node.getSlot(slot);
    if (!child.isObject()) {
      continue;
    }
    if (&child.toObjectRef() == &target) {
      return type->getAttributeName(slot);
    }
    if (auto rest = path_below(child.toObjectRef(), target, visited)) {
      return type->getAttributeName(slot) + "." + *rest;
    }
  }
  return std::nullopt;
}

// Python's repr of a torch.device: device(type='cuda', index=0).
std::string device_repr(const c10::Device& device) {
  std::ostringstream out;
  out << "device(type='" << c10::DeviceTypeName(device.type(), /*lower_case=*/true) << "'";
  if (device.has_index()) {
    out << ", index=" << static_cast<int>(device.index());
  }
  out << ")";
  return out.str();
}

// Devices of the parameters and buffers of `module` and its submodules, in
// the order first seen.
std::optional<std::string> path_below(const c10::ivalue::Object& node, const c10::ivalue::Object& target) {
  std::unordered_set<const c10::ivalue::Object*> visited;
  return path_below(node, target, visited);
}

std::vector<c10::Device> tensor_devices(const Module& module) {
  std::vector<c10::Device> devices;
  auto note = [&devices](const at::Tensor& tensor) {
    if (std::find(devices.begin(), devices.end(), tensor.device()) == devices.end()) {
      devices.push_back(tensor.device());
    }
  };
  for (const at::Tensor& parameter : module.parameters(/*recurse=*/true)) {
    note(parameter);
  }
  for (const at::Tensor& buffer : module.buffers(/*recurse=*/true)) {
    note(buffer);
  }
  return devices;
}

// Moves the parameters and buffers of `module` and its submodules to
// `device`, as nn.Module.to does: in place (set_data, so holders of a tensor
// keep it) where the tensor types allow it, else by putting the moved tensor
// in the slot (cpu <-> meta). torch::jit::Module::to only does the former.
void move_to(const Module& module, const c10::Device& device) {
  c10::AutoGradMode no_grad(false);
  for (const Module& submodule : module.modules()) {
    const auto& type = submodule.type();
    for (size_t slot = 0; slot < type->numAttributes(); ++slot) {
      if (!type->is_parameter(slot) && !type->is_buffer(slot)) {
        continue;
      }
      const c10::IValue value = submodule._ivalue()->getSlot(slot);
      if (!value.isTensor() || value.toTensor().device() == device) {
        continue;
      }
      at::Tensor tensor = value.toTensor();
      at::Tensor moved = tensor.to(device);
      if (at::_has_compatible_shallow_copy_type(tensor, moved)) {
        tensor.set_data(moved);
      } else {
        moved.set_requires_grad(tensor.requires_grad());
        submodule._ivalue()->setSlot(slot, moved);
      }
    }
  }
}

std::string devices_repr(const std::vector<c10::Device>& devices) {
  std::string out = "{";
  for (size_t i = 0; i < devices.size(); ++i) {
    out += (i == 0 ? "" : ", ") + device_repr(devices[i]);
  }
  return out + "}";
}

} // namespace

std::optional<std::string> module_to_fqn(
    const Module& model,
    const Module& module,
    const std::string& prefix) {
  if (model._ivalue() == module._ivalue()) {
    return std::string();
  }
  if (auto path = path_below(*model._ivalue(), *module._ivalue())) {
    return prefix + *path;
  }
  return std::nullopt;
}

c10::IValue fqn_to_module(const Module& model, const std::string& path) {
  return walk_path(model._ivalue(), path);
}

TensorArgInfo get_arg_info_from_tensor_fqn(const Module& model, const std::string& tensor_fqn) {
  TensorArgInfo info;
  const size_t dot = tensor_fqn.rfind('.');
  info.tensor_name = dot == std::string::npos ? tensor_fqn : tensor_fqn.substr(dot + 1);
  info.module_fqn = dot == std::string::npos ? "" : tensor_fqn.substr(0, dot);
  info.module = fqn_to_module(model, info.module_fqn);
  info.tensor_fqn = tensor_fqn;
  return info;
}

bool module_contains_param(const Module& module, const std::string& parametrization) {
  // Parametrize layout: parametrizations.<tensor> is a ParametrizationList
  // whose children are the parametrizations applied to that tensor.
  if (auto parametrizations = child_module(module, "parametrizations")) {
    for (const Module& tensor_parametrizations : parametrizations->children()) {
      for (const Module& applied : tensor_parametrizations.children()) {
        if (class_is_named(*applied.type(), parametrization)) {
          return true;
        }
      }
    }
  }
  // Parametrization objects held as attributes (non-module objects only:
  // a submodule is a child, not a parametrization of this module's tensors).
  const auto& type = module.type();
  for (size_t slot = 0; slot < type->numAttributes(); ++slot) {
    const c10::IValue value = module._ivalue()->getSlot(slot);
    if (value.isObject() && !value.toObjectRef().type()->is_module() &&
        class_is_named(*value.toObjectRef().type(), parametrization)) {
      return true;
    }
  }
  return false;
}

std::string type_before_parametrizations(const Module& module) {
  std::string name = class_name(*module.type());
  if (child_module(module, "parametrizations") && name.size() > kParametrizedPrefix.size() &&
      std::string_view(name).substr(0, kParametrizedPrefix.size()) == kParametrizedPrefix) {
    name.erase(0, kParametrizedPrefix.size());
  }
  return name;
}

Module swap_module(const Module& mod, const SwapMapping& mapping) {
  const std::string key = type_before_parametrizations(mod);
  const auto entry = mapping.find(key);
  if (entry == mapping.end()) {
    return mod;
  }
  // Checked first so that a refused module costs nothing and changes nothing.
  const std::vector<c10::Device> devices = tensor_devices(mod);
  TORCH_CHECK(
      devices.size() <= 1,
      "swap_module only works with cpu or single-device CUDA modules, but got devices ",
      devices_repr(devices));

  const Module& prototype = entry->second;
  TORCH_CHECK(
      prototype.find_method("from_dense").has_value(),
      "swap_module: the prototype mapped to '",
      key,
      "' (a module of type ",
      type_name(*prototype.type()),
      ") has no scripted method from_dense; define `@torch.jit.export def from_dense(self, dense: Any) -> None` "
      "that fills self from the dense module");
  // TorchScript cannot construct modules: the replacement is a copy of the
  // prototype (same type, so it fits where the prototype's type is expected)
  // that from_dense fills in. The prototype itself is never changed.
  Module replacement = prototype.deepcopy();
  // Errors raised by scripted code arrive as torch::jit::JITException, which
  // Python does not see as a RuntimeError: report every failure as this op's
  // c10::Error, with the context.
  const auto from_dense_failed = [&](const char* what) {
    TORCH_CHECK(
        false,
        "swap_module: from_dense of the prototype mapped to '",
        key,
        "' (type ",
        type_name(*prototype.type()),
        ") failed for a module of type ",
        type_name(*mod.type()),
        ": ",
        what);
  };
  try {
    replacement.get_method("from_dense")({mod._ivalue()});
  } catch (const c10::Error& error) {
    from_dense_failed(error.what_without_backtrace());
  } catch (const std::exception& error) {
    from_dense_failed(error.what());
  }
  if (devices.size() == 1) {
    move_to(replacement, devices.front());
  }

  const auto& dense_type = mod.type();
  if (dense_type != replacement.type() &&
      (!dense_type->getForwardHooks().empty() || !dense_type->getForwardPreHooks().empty())) {
    TORCH_WARN(
        "swap_module: the forward hooks of the dense module (type ",
        type_name(*dense_type),
        ") are compiled into its type and cannot move to the replacement (type ",
        type_name(*replacement.type()),
        "); the replacement keeps only the hooks of its own type");
  }
  return replacement;
}

void set_submodule(const Module& parent, const std::string& name, const Module& new_module) {
  const size_t dot = name.rfind('.');
  const std::string owner_path = dot == std::string::npos ? "" : name.substr(0, dot);
  const std::string attribute = dot == std::string::npos ? name : name.substr(dot + 1);
  // walk_path reads "" as the parent itself, so ".x" would pass for "x";
  // fqn_to_module gives None for it, as for any empty piece.
  TORCH_CHECK(
      dot != 0,
      "set_submodule: '",
      name,
      "' starts with an empty piece, so it names no submodule of the parent (type ",
      type_name(*parent.type()),
      ")");

  const c10::IValue owner_value = walk_path(parent._ivalue(), owner_path);
  TORCH_CHECK(
      is_module_value(owner_value),
      "set_submodule: '",
      owner_path,
      "' does not name a submodule of the parent (type ",
      type_name(*parent.type()),
      "), so '",
      name,
      "' cannot be set");
  const Module owner(owner_value.toObject());
  const auto slot = owner.type()->findAttributeSlot(attribute);
  TORCH_CHECK(
      slot.has_value(),
      "set_submodule: module of type ",
      type_name(*owner.type()),
      " has no attribute '",
      attribute,
      "'; only an existing submodule can be replaced");

  const c10::TypePtr declared = owner.type()->getAttribute(*slot);
  if (auto interface = declared->cast<c10::InterfaceType>(); interface && interface->is_module()) {
    std::ostringstream why_not;
    TORCH_CHECK(
        new_module.type()->isSubtypeOfExt(*interface, &why_not),
        "set_submodule: '",
        name,
        "' is declared with the module interface ",
        type_name(*interface),
        ", which the new module (type ",
        type_name(*new_module.type()),
        ") does not implement: ",
        why_not.str());
  } else if (declared->castRaw<c10::ClassType>() && declared->is_module()) {
    // Pointer identity: a type of the same name from another compilation unit
    // may have other methods.
    TORCH_CHECK(
        declared == new_module.type(),
        "set_submodule: '",
        name,
        "' is declared with the module type ",
        type_name(*declared),
        ", and the parent's compiled code calls it through that type, so it cannot hold a module of type ",
        type_name(*new_module.type()),
        "; declare the attribute with a module interface type (@torch.jit.interface) that both implement");
  } else {
    TORCH_CHECK(
        false,
        "set_submodule: '",
        name,
        "' is an attribute of type ",
        type_name(*declared),
        ", not a submodule");
  }
  // A module inside itself would send every walk over submodules round in
  // circles (module_to_fqn, swap_module, named_modules).
  TORCH_CHECK(
      new_module._ivalue().get() != owner._ivalue().get() &&
          !path_below(*new_module._ivalue(), *owner._ivalue()).has_value(),
      "set_submodule: the new module (type ",
      type_name(*new_module.type()),
      ") is '",
      owner_path.empty() ? std::string("the parent") : owner_path,
      "' itself or contains it, so setting '",
      name,
      "' would make a module its own submodule");
  owner._ivalue()->setSlot(*slot, new_module._ivalue());
}

namespace {

// ---- Boxed operator kernels: these ops take modules as `Any`. ----

void module_to_fqn_kernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::pop(*stack, 3);
  const Module model = as_module(args[0], "sparsity::module_to_fqn", "model");
  const Module module = as_module(args[1], "sparsity::module_to_fqn", "module");
  auto fqn = module_to_fqn(model, module, args[2].toStringRef());
  torch::jit::push(*stack, fqn ? c10::IValue(std::move(*fqn)) : c10::IValue());
}

void fqn_to_module_kernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::pop(*stack, 2);
  const std::string& path = args[1].toStringRef();
  if (args[0].isNone()) {
    // As in PyTorch: no model, nothing found.
    torch::jit::push(*stack, c10::IValue());
    return;
  }
  const Module model = as_module(args[0], "sparsity::fqn_to_module", "model");
  torch::jit::push(*stack, fqn_to_module(model, path));
}

void get_arg_info_from_tensor_fqn_kernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::pop(*stack, 2);
  const Module model = as_module(args[0], "sparsity::get_arg_info_from_tensor_fqn", "model");
  TensorArgInfo info = get_arg_info_from_tensor_fqn(model, args[1].toStringRef());
  c10::impl::GenericDict result(c10::StringType::get(), c10::AnyType::get());
  result.insert("module_fqn", std::move(info.module_fqn));
  result.insert("module", std::move(info.module));
  result.insert("tensor_name", std::move(info.tensor_name));
  result.insert("tensor_fqn", std::move(info.tensor_fqn));
  torch::jit::push(*stack, std::move(result));
}

void module_contains_param_kernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::pop(*stack, 2);
  const Module module = as_module(args[0], "sparsity::module_contains_param", "module");
  torch::jit::push(*stack, module_contains_param(module, args[1].toStringRef()));
}

void swap_module_kernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::pop(*stack, 2);
  const Module mod = as_module(args[0], "sparsity::swap_module", "mod");
  SwapMapping mapping;
  for (const auto& entry : args[1].toGenericDict()) {
    const std::string& key = entry.key().toStringRef();
    TORCH_CHECK(
        is_module_value(entry.value()),
        "sparsity::swap_module: mapping['",
        key,
        "'] must be a prototype module with a from_dense method, but got ",
        describe(entry.value()));
    mapping.emplace(key, Module(entry.value().toObject()));
  }
  torch::jit::push(*stack, swap_module(mod, mapping)._ivalue());
}

void set_submodule_kernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  auto args = torch::jit::pop(*stack, 3);
  const Module parent = as_module(args[0], "sparsity::set_submodule", "parent");
  const Module new_module = as_module(args[2], "sparsity::set_submodule", "new_module");
  set_submodule(parent, args[1].toStringRef(), new_module);
}

template <c10::BoxedKernel::BoxedKernelFunction* kernel>
torch::CppFunction boxed() {
  // No Tensor argument means an empty dispatch key set, which the dispatcher
  // serves from the CompositeExplicitAutograd kernel.
  return torch::dispatch(
      c10::DispatchKey::CompositeExplicitAutograd, torch::CppFunction::makeFromBoxedFunction<kernel>());
}

} // namespace

SPARSITY_LIBRARY_FRAGMENT(m) {
  // CONSERVATIVE: these ops read (and set_submodule writes) module state that
  // the JIT's alias analysis cannot see through `Any`, and fqn_to_module hands
  // back the model's own tensors and modules. So the JIT must neither drop,
  // reorder nor merge the calls.
  const auto conservative = [](const char* schema) {
    return torch::schema(schema, c10::AliasAnalysisKind::CONSERVATIVE);
  };
  m.def(conservative("sparsity::module_to_fqn(Any model, Any module, str prefix=\"\") -> str?"));
  m.def(conservative("sparsity::fqn_to_module(Any? model, str path) -> Any?"));
  m.def(conservative("sparsity::get_arg_info_from_tensor_fqn(Any model, str tensor_fqn) -> Dict(str, Any)"));
  m.def(conservative("sparsity::module_contains_param(Any module, str parametrization) -> bool"));
  m.def(conservative("sparsity::swap_module(Any mod, Dict(str, Any) mapping) -> Any"));
  m.def(conservative("sparsity::set_submodule(Any parent, str name, Any new_module) -> ()"));

  m.impl("module_to_fqn", boxed<module_to_fqn_kernel>());
  m.impl("fqn_to_module", boxed<fqn_to_module_kernel>());
  m.impl("get_arg_info_from_tensor_fqn", boxed<get_arg_info_from_tensor_fqn_kernel>());
  m.impl("module_contains_param", boxed<module_contains_param_kernel>());
  m.impl("swap_module", boxed<swap_module_kernel>());
  m.impl("set_submodule", boxed<set_submodule_kernel>());
}

} // namespace utils
} // namespace sparsity
