#include "classes/fake_sparsity_class.h"

#include "ops/fake_sparsity.h"
#include "ops/fake_sparsity_common.h"

#include <ATen/ops/_lazy_clone.h>
#include <ATen/ops/count_nonzero.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/COW.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/library.h>

#include <limits>
#include <utility>

namespace sparsity {

namespace {

// A tensor's version counter, read directly: Tensor::_version() is a
// dispatcher call, which would be most of the cost of a cache hit.
uint32_t version_of(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->version_counter().current_version();
}

void check_mask(const char* where, const at::Tensor& mask) {
  TORCH_CHECK(mask.defined(), where, ": mask is an undefined tensor");
  TORCH_CHECK(
      mask.layout() == at::kStrided,
      where,
      ": mask must be a strided (dense) tensor, but got layout ",
      mask.layout());
  TORCH_CHECK(
      ops::detail::is_supported_mask_dtype(mask.scalar_type()),
      where,
      ": mask must be bool, uint8 or floating (float32, float64, float16, bfloat16), but got ",
      mask.scalar_type());
}

// Dispatch keys of something that must see every call: Python tensor
// subclasses and dispatch modes (FakeTensor, TorchDispatchMode),
// functionalization, functorch transforms. A cached answer would hide the
// call from them.
constexpr c10::DispatchKeySet kInterceptingKeys = c10::python_ks |
    c10::functorch_transforms_ks |
    c10::DispatchKeySet({
        c10::DispatchKey::PythonDispatcher,
        c10::DispatchKey::Functionalize,
        c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
        c10::DispatchKey::FuncTorchDynamicLayerBackMode,
        c10::DispatchKey::ZeroTensor,
    });

// A plain dense CPU tensor with a version counter (inference tensors have
// none, so a change to them could not be seen).
bool is_plain_cpu_tensor(const at::Tensor& t) {
  return t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage() &&
      !t.is_inference() && !t.key_set().has_any(kInterceptingKeys);
}

// Whether forward may answer from, or fill, the cache. Not when autograd must
// record the call (a cached tensor has no graph), nor while a tracer or a
// dispatch mode is active: they must see the operator call (torch.jit.trace
// records the class's forward as a call today; this keeps a cached tensor
// from ever being recorded as a constant).
bool may_cache(const at::Tensor& x, const at::Tensor& mask) {
  if (at::GradMode::is_enabled() && (x.requires_grad() || mask.requires_grad())) {
    return false;
  }
  return is_plain_cpu_tensor(x) && is_plain_cpu_tensor(mask) && x.numel() > 0 &&
      !torch::jit::tracer::isTracing() &&
      !c10::impl::tls_local_dispatch_key_set().included_.has_any(kInterceptingKeys);
}

// What a caller gets from the cache: a copy-on-write clone, O(1). Reads share
// the kept memory; the first write through the clone (any mutable access to
// its data, .data and .numpy() included) gives it its own copy, so a caller
// can change neither the cache nor another caller's result.
at::Tensor copy_on_write_clone(const at::Tensor& t) {
  at::AutoDispatchBelowADInplaceOrView no_graph_needed;
  return at::_lazy_clone(t);
}

bool can_copy_on_write(const at::Tensor& t) {
  const c10::StorageImpl& storage = *t.storage().unsafeGetStorageImpl();
  return c10::impl::cow::has_simple_data_ptr(storage) ||
      c10::impl::cow::is_cow_data_ptr(storage.data_ptr());
}

} // namespace

FakeSparsity::Stamp::Stamp(const at::Tensor& t)
    : impl(t.getIntrusivePtr()),
      storage(t.storage().getWeakStorageImpl()),
      storage_offset(t.storage_offset()),
      sizes(t.sizes().begin(), t.sizes().end()),
      strides(t.strides().begin(), t.strides().end()),
      dtype(t.scalar_type()),
      device(t.device()),
      version(version_of(t)) {}

bool FakeSparsity::Stamp::matches(const at::Tensor& t) const {
  // The weak references keep both addresses from being reused, so equal
  // pointers mean the same live objects.
  return impl._unsafe_get_target() == t.unsafeGetTensorImpl() &&
      storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
      storage_offset == t.storage_offset() && t.sizes() == c10::IntArrayRef(sizes) &&
      t.strides() == c10::IntArrayRef(strides) && dtype == t.scalar_type() &&
      device == t.device() && version == version_of(t);
}

FakeSparsity::FakeSparsity(at::Tensor mask) {
  check_mask("FakeSparsity", mask);
  mask_ = std::move(mask);
}

void FakeSparsity::move_mask_to(const c10::Device& device) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (mask_.device() == device) {
    return;
  }
  // set_data swaps the storage under the same TensorImpl, as nn.Module.to
  // does for parameters: whoever holds the mask keeps holding it.
  c10::AutoGradMode no_grad(false);
  mask_.set_data(mask_.to(device));
  cache_.reset();
}

at::Tensor FakeSparsity::forward(const at::Tensor& x) {
  TORCH_CHECK(x.defined(), "FakeSparsity.forward: x is an undefined tensor");
  if (x.device() != mask_.device()) {
    if (x.is_meta()) {
      // Shape propagation only: never give up the real mask for a meta one.
      return ops::fake_sparsity(x, mask_.to(x.device()));
    }
    move_mask_to(x.device());
  }
  if (!may_cache(x, mask_)) {
    // Training, another device, a tracer: drop the kept result rather than
    // hold its memory through calls that cannot use it.
    clear_cache();
    return ops::fake_sparsity(x, mask_);
  }
  bool enabled = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (cache_ && cache_->x.matches(x) && cache_->mask.matches(mask_)) {
      ++cache_hits_;
      return copy_on_write_clone(cache_->result);
    }
    enabled = cache_enabled_;
  }
  if (!enabled) {
    return ops::fake_sparsity(x, mask_);
  }
  // Stamped before computing: a write racing with the computation then
  // shows as a newer version at the next lookup, never as a stale hit.
  Stamp x_stamp(x), mask_stamp(mask_);
  at::Tensor result = ops::fake_sparsity(x, mask_);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!cache_enabled_ || !can_copy_on_write(result)) {
    return result;
  }
  cache_.emplace(CacheEntry{std::move(x_stamp), std::move(mask_stamp), result});
  return copy_on_write_clone(result);
}

at::Tensor FakeSparsity::mask() const {
  return mask_;
}

void FakeSparsity::update_mask(const at::Tensor& m) {
  check_mask("FakeSparsity.update_mask", m);
  TORCH_CHECK(
      m.sizes() == mask_.sizes(),
      "FakeSparsity.update_mask: new mask shape ",
      m.sizes(),
      " must equal the held mask shape ",
      mask_.sizes());
  c10::AutoGradMode no_grad(false);
  mask_.copy_(m);
  clear_cache(); // the version bump of copy_ would do; this frees the memory now
}

void FakeSparsity::set_cache_enabled(bool enabled) {
  std::lock_guard<std::mutex> lock(mutex_);
  cache_enabled_ = enabled;
  if (!enabled) {
    cache_.reset();
  }
}

bool FakeSparsity::cache_enabled() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cache_enabled_;
}

void FakeSparsity::clear_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  cache_.reset();
}

int64_t FakeSparsity::cache_hits() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cache_hits_;
}

c10::Dict<std::string, at::Tensor> FakeSparsity::state_dict() const {
  return c10::Dict<std::string, at::Tensor>();
}

double FakeSparsity::sparsity_level() const {
  const int64_t numel = mask_.numel();
  if (numel == 0) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  const int64_t nonzero = at::count_nonzero(mask_).item<int64_t>();
  return static_cast<double>(numel - nonzero) / static_cast<double>(numel);
}

std::tuple<std::tuple<std::string, at::Tensor>> FakeSparsity::obj_flatten() const {
  return {{"mask", mask_}};
}

FakeSparsity::State FakeSparsity::get_state() const {
  // A copy, not the held tensor: TorchScript's deepcopy passes this state
  // straight to __setstate__, and a deep copy must not share its mask.
  at::Tensor mask_copy;
  {
    c10::AutoGradMode no_grad(false);
    mask_copy = mask_.clone();
  }
  mask_copy.set_requires_grad(mask_.requires_grad());
  c10::Dict<std::string, at::Tensor> tensors;
  tensors.insert("mask", std::move(mask_copy));
  return State(kStateVersion, std::move(tensors));
}

c10::intrusive_ptr<FakeSparsity> FakeSparsity::from_state(State state) {
  const int64_t version = std::get<0>(state);
  TORCH_CHECK(
      version == kStateVersion,
      "FakeSparsity: cannot load a pickled state of format version ",
      version,
      "; this build reads version ",
      kStateVersion,
      " (was the model saved by a newer torch-sparsity?)");
  const auto& tensors = std::get<1>(state);
  TORCH_CHECK(
      tensors.contains("mask"),
      "FakeSparsity: malformed pickled state: version 1 needs a 'mask' entry");
  TORCH_CHECK(
      tensors.size() == 1,
      "FakeSparsity: malformed pickled state: version 1 holds only 'mask', but got ",
      tensors.size(),
      " entries");
  return c10::make_intrusive<FakeSparsity>(tensors.at("mask"));
}

TORCH_LIBRARY_FRAGMENT(sparsity, m) {
  m.class_<FakeSparsity>("FakeSparsity")
      .def(torch::init<at::Tensor>())
      .def("forward", &FakeSparsity::forward)
      .def("update_mask", &FakeSparsity::update_mask)
      .def("state_dict", &FakeSparsity::state_dict)
      .def("sparsity_level", &FakeSparsity::sparsity_level)
      .def("get_mask", &FakeSparsity::mask)
      .def("set_cache_enabled", &FakeSparsity::set_cache_enabled)
      .def("cache_enabled", &FakeSparsity::cache_enabled)
      .def("clear_cache", &FakeSparsity::clear_cache)
      .def("cache_hits", &FakeSparsity::cache_hits)
      .def_property("mask", &FakeSparsity::mask)
      .def("__obj_flatten__", &FakeSparsity::obj_flatten)
      .def_pickle(
          [](const c10::intrusive_ptr<FakeSparsity>& self) {
            return self->get_state();
          },
          [](FakeSparsity::State state) {
            return FakeSparsity::from_state(std::move(state));
          });
}

} // namespace sparsity
