#pragma once

// SPARSITY_LIBRARY_FRAGMENT(m) and SPARSITY_LIBRARY_IMPL(k, m): torch's
// TORCH_LIBRARY_FRAGMENT(sparsity, m) and TORCH_LIBRARY_IMPL(sparsity, k, m),
// for every registration block of this library. A process may load two
// copies of the library (torch.ops.load_library of a build, then the Python
// package's own file), and torch aborts when the second registers the same
// operators again: so only the first copy registers, and a later one
// registers nothing (its callers reach the first copy's operators and
// classes through the dispatcher).

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <memory>
#include <optional>

namespace sparsity::registration {

// Whether this copy of the library registers. Hidden, so that each copy has
// its own function and its own static; computed at the copy's first
// registration, when an earlier copy has registered all of its blocks.
__attribute__((visibility("hidden"))) inline bool this_copy_registers() {
  static const bool registers = !c10::Dispatcher::singleton().findSchema({"sparsity::fake_sparsity", ""});
  return registers;
}

// One block, registered (and kept for the process, as torch's own
// TorchLibraryInit keeps it) by the first copy only.
class __attribute__((visibility("hidden"))) Block {
 public:
  Block(torch::Library::Kind kind, std::optional<c10::DispatchKey> key, void (*init)(torch::Library&),
      const char* file, uint32_t line) {
    if (this_copy_registers()) {
      library_ = std::make_unique<torch::Library>(kind, "sparsity", key, file, line);
      init(*library_);
    }
  }

 private:
  std::unique_ptr<torch::Library> library_;
};

} // namespace sparsity::registration

#define SPARSITY_LIBRARY_FRAGMENT(m) \
  SPARSITY_REGISTRATION_BLOCK(torch::Library::FRAGMENT, std::nullopt, m, C10_UID)
#define SPARSITY_LIBRARY_IMPL(k, m) \
  SPARSITY_REGISTRATION_BLOCK(torch::Library::IMPL, std::make_optional(c10::DispatchKey::k), m, C10_UID)

#define SPARSITY_REGISTRATION_BLOCK(kind, key, m, uid)                                             \
  static void C10_CONCATENATE(sparsity_registration_init_, uid)(torch::Library&);                  \
  static const sparsity::registration::Block C10_CONCATENATE(sparsity_registration_block_, uid)(  \
      kind, key, &C10_CONCATENATE(sparsity_registration_init_, uid), __FILE__, __LINE__);          \
  void C10_CONCATENATE(sparsity_registration_init_, uid)(torch::Library & m)
