#include "classes/fake_sparsity_class.h"

#include "ops/fake_sparsity.h"
#include "ops/fake_sparsity_common.h"
#include "ops/registration.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/count_nonzero.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
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

} // namespace

MaskHolder::Stamp::Stamp(const at::Tensor& t)
    : impl(t.getIntrusivePtr()),
      storage(t.storage().getWeakStorageImpl()),
      storage_offset(t.storage_offset()),
      sizes(t.sizes().begin(), t.sizes().end()),
      strides(t.strides().begin(), t.strides().end()),
      dtype(t.scalar_type()),
      device(t.device()),
      version(version_of(t)) {}

bool MaskHolder::Stamp::matches(const at::Tensor& t) const {
  // The weak references keep both addresses from being reused, so equal
  // pointers mean the same live objects.
  return impl._unsafe_get_target() == t.unsafeGetTensorImpl() &&
      storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
      storage_offset == t.storage_offset() && t.sizes() == c10::IntArrayRef(sizes) &&
      t.strides() == c10::IntArrayRef(strides) && dtype == t.scalar_type() &&
      device == t.device() && version == version_of(t);
}

void MaskHolder::check_mask(const char* where, const at::Tensor& mask) const {
  TORCH_CHECK(mask.defined(), kind_.class_name, where, ": mask is an undefined tensor");
  TORCH_CHECK(
      mask.layout() == at::kStrided,
      kind_.class_name,
      where,
      ": mask must be a strided (dense) tensor, but got layout ",
      mask.layout());
  TORCH_CHECK(
      ops::detail::is_supported_mask_dtype(mask.scalar_type()),
      kind_.class_name,
      where,
      ": mask must be bool, uint8 or floating (float32, float64, float16, bfloat16), but got ",
      mask.scalar_type());
  TORCH_CHECK(
      !kind_.row_mask || mask.dim() == 1,
      kind_.class_name,
      where,
      ": mask must be 1-d, one entry per slice along dim 0, but got shape ",
      mask.sizes());
}

MaskHolder::MaskHolder(const Kind& kind, at::Tensor mask) : kind_(kind) {
  check_mask("", mask);
  // update_mask writes the held mask in place, which torch refuses for a
  // tensor whose elements share memory (an expanded one): refused here,
  // rather than accepted and then never updatable.
  TORCH_CHECK(
      mask.numel() == 0 || at::has_internal_overlap(mask) != at::MemOverlap::Yes,
      kind_.class_name,
      ": mask has elements that share memory (an expanded tensor, stride 0, sizes ",
      mask.sizes(),
      ", strides ",
      mask.strides(),
      "), so update_mask could not write it in place; pass mask.clone()");
  mask_ = std::move(mask);
}

std::shared_lock<std::shared_mutex> MaskHolder::lock_mask_for_reading() const {
  { std::lock_guard<std::mutex> wait_for_writers(writer_turnstile_); }
  return std::shared_lock<std::shared_mutex>(mask_mutex_);
}

std::unique_lock<std::shared_mutex> MaskHolder::lock_mask_for_writing() {
  std::lock_guard<std::mutex> hold_off_new_readers(writer_turnstile_);
  return std::unique_lock<std::shared_mutex>(mask_mutex_);
}

void MaskHolder::convert_mask(std::optional<c10::Device> to_device, std::optional<at::ScalarType> to_dtype) {
  auto writing = lock_mask_for_writing();
  const c10::Device device = to_device.value_or(mask_.device());
  const at::ScalarType dtype = to_dtype.value_or(mask_.scalar_type());
  if (mask_.device() == device && mask_.scalar_type() == dtype) {
    return;
  }
  // set_data swaps the storage under the same TensorImpl, as nn.Module.to
  // does for parameters: whoever holds the mask keeps holding it.
  c10::AutoGradMode no_grad(false);
  mask_.set_data(mask_.to(device, dtype));
  std::lock_guard<std::mutex> lock(cache_mutex_);
  cache_.reset();
}

void MaskHolder::follow_dtype(const at::Tensor& x) {
  auto reading = lock_mask_for_reading();
  // (An undefined x is not floating: forward says what is wrong with it.)
  if (!x.is_floating_point() || !mask_.is_floating_point() || mask_.scalar_type() == x.scalar_type()) {
    return;
  }
  reading.unlock();
  convert_mask(std::nullopt, x.scalar_type());
}

at::Tensor MaskHolder::forward(const at::Tensor& x) {
  TORCH_CHECK(x.defined(), kind_.class_name, ".forward: x is an undefined tensor");
  // Held through the computation: update_mask waits for it, so this call
  // reads the old mask or the new one, whole.
  auto reading = lock_mask_for_reading();
  if (x.device() != mask_.device()) {
    if (x.is_meta()) {
      // Shape propagation only: never give up the real mask for a meta one.
      return kind_.apply(x, mask_.to(x.device()));
    }
    reading.unlock();
    convert_mask(x.device(), std::nullopt);
    reading = lock_mask_for_reading();
    // (Had another thread moved it elsewhere meanwhile, the operator's
    // device check would say so.)
  }
  if (!may_cache(x, mask_)) {
    // Training, another device, a tracer: drop the kept result rather than
    // hold its memory through calls that cannot use it.
    clear_cache();
    return kind_.apply(x, mask_);
  }
  bool enabled = false;
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_ && cache_->x.matches(x) && cache_->mask.matches(mask_) &&
        cache_->result_stamp.matches(cache_->result) && !cache_->result.requires_grad()) {
      ++cache_hits_;
      return cache_->result;
    }
    enabled = cache_enabled_;
  }
  if (!enabled) {
    return kind_.apply(x, mask_);
  }
  // Stamped before computing: a write to x or to the mask's tensor racing
  // with the computation then shows as a newer version at the next lookup,
  // never as a stale hit.
  Stamp x_stamp(x), mask_stamp(mask_);
  at::Tensor result;
  {
    // A normal tensor even under InferenceMode: the kept result needs a
    // version counter, for writes through it to be seen. No graph either
    // way (may_cache made sure none is needed).
    c10::InferenceMode normal_tensor(false);
    c10::AutoGradMode no_graph(false);
    result = kind_.apply(x, mask_);
  }
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (cache_enabled_) {
    Stamp result_stamp(result);
    cache_.emplace(CacheEntry{std::move(x_stamp), std::move(mask_stamp), result, std::move(result_stamp)});
  }
  return result;
}

at::Tensor MaskHolder::mask() const {
  return mask_;
}

void MaskHolder::update_mask(const at::Tensor& m) {
  check_mask(".update_mask", m);
  auto writing = lock_mask_for_writing();
  TORCH_CHECK(
      !m.is_meta() || mask_.is_meta(),
      kind_.class_name,
      ".update_mask: the new mask is a meta tensor, which has no values to copy");
  TORCH_CHECK(
      m.sizes() == mask_.sizes(),
      kind_.class_name,
      ".update_mask: new mask shape ",
      m.sizes(),
      " must equal the held mask shape ",
      mask_.sizes());
  // Checked here, before the write: copy_ would raise only after writing.
  TORCH_CHECK(
      !mask_.is_inference() || c10::InferenceMode::is_enabled(),
      kind_.class_name,
      ".update_mask: the held mask is an inference tensor, which can be modified in place only in "
      "inference mode (torch.inference_mode())");
  c10::AutoGradMode no_grad(false);
  mask_.copy_(m);
  clear_cache(); // the version bump of copy_ would do; this frees the memory now
}

void MaskHolder::set_cache_enabled(bool enabled) {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  cache_enabled_ = enabled;
  if (!enabled) {
    cache_.reset();
  }
}

bool MaskHolder::cache_enabled() const {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  return cache_enabled_;
}

void MaskHolder::clear_cache() {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  cache_.reset();
}

int64_t MaskHolder::cache_hits() const {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  return cache_hits_;
}

c10::Dict<std::string, at::Tensor> MaskHolder::state_dict() const {
  return c10::Dict<std::string, at::Tensor>();
}

double MaskHolder::sparsity_level() const {
  auto reading = lock_mask_for_reading();
  const int64_t numel = mask_.numel();
  if (numel == 0) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  const int64_t nonzero = at::count_nonzero(mask_).item<int64_t>();
  return static_cast<double>(numel - nonzero) / static_cast<double>(numel);
}

std::tuple<std::tuple<std::string, at::Tensor>> MaskHolder::obj_flatten() const {
  return {{"mask", mask_}};
}

MaskHolder::State MaskHolder::get_state() const {
  // A copy, not the held tensor: TorchScript's deepcopy passes this state
  // straight to __setstate__, and a deep copy must not share its mask.
  at::Tensor mask_copy;
  {
    auto reading = lock_mask_for_reading();
    c10::AutoGradMode no_grad(false);
    mask_copy = mask_.clone();
  }
  mask_copy.set_requires_grad(mask_.requires_grad());
  c10::Dict<std::string, at::Tensor> tensors;
  tensors.insert("mask", std::move(mask_copy));
  return State(kStateVersion, std::move(tensors));
}

at::Tensor MaskHolder::mask_from_state(const Kind& kind, const c10::IValue& state) {
  // Checked here rather than by TorchScript's conversion to State, whose
  // failures are internal asserts ("isGenericDict() INTERNAL ASSERT FAILED").
  const auto expected = " (expected (version: int, {'mask': Tensor}))";
  TORCH_CHECK(
      state.isTuple() && state.toTupleRef().elements().size() == 2,
      kind.class_name,
      ": malformed pickled state: got a value of type ",
      state.type()->repr_str(),
      expected);
  const auto& elements = state.toTupleRef().elements();
  TORCH_CHECK(
      elements[0].isInt(),
      kind.class_name,
      ": malformed pickled state: the format version is a value of type ",
      elements[0].type()->repr_str(),
      expected);
  const int64_t version = elements[0].toInt();
  TORCH_CHECK(
      version == kStateVersion,
      kind.class_name,
      ": cannot load a pickled state of format version ",
      version,
      "; this build reads version ",
      kStateVersion,
      " (was the model saved by a newer torch-sparsity?)");
  TORCH_CHECK(
      elements[1].isGenericDict(),
      kind.class_name,
      ": malformed pickled state: the tensors are a value of type ",
      elements[1].type()->repr_str(),
      expected);
  const c10::Dict<c10::IValue, c10::IValue> tensors = elements[1].toGenericDict();
  TORCH_CHECK(
      tensors.contains(c10::IValue("mask")),
      kind.class_name,
      ": malformed pickled state: version 1 needs a 'mask' entry");
  TORCH_CHECK(
      tensors.size() == 1,
      kind.class_name,
      ": malformed pickled state: version 1 holds only 'mask', but got ",
      tensors.size(),
      " entries");
  const c10::IValue mask = tensors.at(c10::IValue("mask"));
  TORCH_CHECK(
      mask.isTensor(),
      kind.class_name,
      ": malformed pickled state: 'mask' is a value of type ",
      mask.type()->repr_str(),
      ", not a Tensor");
  return mask.toTensor();
}

const MaskHolder::Kind FakeSparsity::kKind{"FakeSparsity", &ops::fake_sparsity, /*row_mask=*/false};

FakeSparsity::FakeSparsity(at::Tensor mask) : MaskHolder(kKind, std::move(mask)) {}

c10::intrusive_ptr<FakeSparsity> FakeSparsity::from_state(const c10::IValue& state) {
  return c10::make_intrusive<FakeSparsity>(mask_from_state(kKind, state));
}

const MaskHolder::Kind FakeStructuredSparsity::kKind{
    "FakeStructuredSparsity", &ops::fake_structured_sparsity, /*row_mask=*/true};

FakeStructuredSparsity::FakeStructuredSparsity(at::Tensor mask) : MaskHolder(kKind, std::move(mask)) {}

c10::intrusive_ptr<FakeStructuredSparsity> FakeStructuredSparsity::from_state(const c10::IValue& state) {
  return c10::make_intrusive<FakeStructuredSparsity>(mask_from_state(kKind, state));
}

namespace {

// One registration for both classes: the same methods, pickling and
// export flattening.
template <typename T>
void define_mask_class(torch::Library& m, const char* name) {
  using Self = const c10::intrusive_ptr<T>&;
  m.class_<T>(name)
      .def(torch::init<at::Tensor>())
      .def("forward", [](Self self, const at::Tensor& x) { return self->forward(x); })
      .def("update_mask", [](Self self, const at::Tensor& mask) { self->update_mask(mask); })
      .def("follow_dtype", [](Self self, const at::Tensor& x) { self->follow_dtype(x); })
      .def("state_dict", [](Self self) { return self->state_dict(); })
      .def("sparsity_level", [](Self self) { return self->sparsity_level(); })
      .def("get_mask", [](Self self) { return self->mask(); })
      .def("set_cache_enabled", [](Self self, bool enabled) { self->set_cache_enabled(enabled); })
      .def("cache_enabled", [](Self self) { return self->cache_enabled(); })
      .def("clear_cache", [](Self self) { self->clear_cache(); })
      .def("cache_hits", [](Self self) { return self->cache_hits(); })
      .def_property("mask", [](Self self) { return self->mask(); })
      .def("__obj_flatten__", [](Self self) { return self->obj_flatten(); })
      .def_pickle(
          [](Self self) { return self->get_state(); },
          // Any value: from_state says what is wrong with a malformed one.
          [](c10::IValue state) { return T::from_state(state); });
}

} // namespace

SPARSITY_LIBRARY_FRAGMENT(m) {
  define_mask_class<FakeSparsity>(m, "FakeSparsity");
  define_mask_class<FakeStructuredSparsity>(m, "FakeStructuredSparsity");
}

} // namespace sparsity
