#pragma once

// torch.classes.sparsity.FakeSparsity and FakeStructuredSparsity: the
// TorchScript counterparts of torch.ao.pruning's FakeSparsity and
// FakeStructuredSparsity parametrizations. Each holds a mask and applies it
// (mask * x, and mask.reshape(-1, 1, ...) * x for a row mask); scripted
// modules keep them as attributes. Both share MaskHolder: the mask's
// identity, update_mask, the inference cache, pickling.

#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <tuple>

namespace sparsity {

class MaskHolder : public torch::CustomClassHolder {
 public:
  // Version of the pickled state written by this build.
  static constexpr int64_t kStateVersion = 1;
  // (version, named tensors); version 1 holds {"mask": mask}.
  using State = std::tuple<int64_t, c10::Dict<std::string, at::Tensor>>;

  // What tells the classes apart: the name in messages, and the operator
  // that applies the mask.
  struct Kind {
    const char* class_name;
    at::Tensor (*apply)(const at::Tensor& x, const at::Tensor& mask);
    bool row_mask;  // the mask must be 1-d
  };

  // The mask applied to x (FakeSparsity: mask * x). If x is on another device
  // than the mask (the owning module was moved), the held mask first moves
  // to x's device, keeping its identity.
  //
  // Inference cache: when no autograd graph is needed, the result is kept,
  // and a later call with the very same x (same tensor object, storage,
  // offset, sizes, strides, dtype, device), unchanged since (same version
  // counter value; likewise the mask), returns it instead of recomputing.
  // Every such call returns the kept tensor itself, as
  // torch.nn.utils.parametrize.cached() hands out one tensor per
  // parametrization: callers share it (read it; never write to it). A write
  // through it that bumps its version counter, or a change of its metadata
  // (requires_grad_, resize_, set_, t_), is seen: the next call recomputes
  // into a new tensor. Costs one tensor of the result's size per object
  // while enabled. CPU tensors only. Writes that bypass version counters
  // (.data, .numpy(), storage-level writes), to x, the mask or a result,
  // are not seen: call clear_cache() after them, or turn the cache off.
  //
  // Threads: forward, update_mask and the device and dtype moves of the
  // mask are synchronized. A forward concurrent with update_mask computes
  // with the old mask or the new one, whole, never a mix. In-place edits of
  // the tensor mask() returns are not synchronized (as writing any tensor
  // that another thread reads): a forward concurrent with one may read a mix.
  at::Tensor forward(const at::Tensor& x);

  // The very tensor held: in-place edits of it change later forwards.
  at::Tensor mask() const;

  // A floating mask takes x's floating dtype, keeping its identity, as
  // nn.Module.to(dtype) converts floating buffers; bool and uint8 masks stay.
  // The generated getters of a scripted module call it before forward: a
  // scripted module's .half() or .to(dtype) (Python or C++) converts its
  // parameters and buffers, but nothing converts the held mask.
  void follow_dtype(const at::Tensor& x);

  // Copies m into the held mask in place; on error nothing changes.
  void update_mask(const at::Tensor& m);

  // Empty, as in torch.ao.pruning: the owner's state dict carries no masks.
  c10::Dict<std::string, at::Tensor> state_dict() const;

  // Fraction of mask entries equal to zero (NaN for an empty mask, as
  // (mask == 0).float().mean() gives).
  double sparsity_level() const;

  // The inference cache: on by default; turning it off frees the kept
  // result. Neither the setting nor the result is pickled: a loaded or
  // deep-copied object starts with an empty, enabled cache.
  void set_cache_enabled(bool enabled);
  bool cache_enabled() const;
  void clear_cache();
  // Forwards answered from the cache since construction.
  int64_t cache_hits() const;

  // For torch.export and torch.compile: (("mask", the held mask),), from
  // which the fake class that torch_sparsity registers in Python rebuilds a
  // stand-in holding a fake mask.
  std::tuple<std::tuple<std::string, at::Tensor>> obj_flatten() const;

  State get_state() const;

  const Kind& kind() const {
    return kind_;
  }

 protected:
  MaskHolder(const Kind& kind, at::Tensor mask);
  // The mask of a pickled state, checked (its form, version and entries):
  // any value, as a mutated or hand-made file may hold any.
  static at::Tensor mask_from_state(const Kind& kind, const c10::IValue& state);

 private:
  // Who a tensor was and what it held when a result was computed from it.
  // Weak references pin the addresses (so a new tensor or storage cannot
  // reuse them and pass for the old one) without keeping anything alive.
  struct Stamp {
    explicit Stamp(const at::Tensor& t);
    bool matches(const at::Tensor& t) const;

    c10::weak_intrusive_ptr<c10::TensorImpl> impl;
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    int64_t storage_offset;
    c10::SmallVector<int64_t, 5> sizes;
    c10::SmallVector<int64_t, 5> strides;
    at::ScalarType dtype;
    c10::Device device;
    uint32_t version;
  };
  struct CacheEntry {
    Stamp x;
    Stamp mask;
    at::Tensor result;
    // What the result was when kept: a caller that writes to it or changes
    // its metadata makes it stale.
    Stamp result_stamp;
  };

  std::shared_lock<std::shared_mutex> lock_mask_for_reading() const;
  std::unique_lock<std::shared_mutex> lock_mask_for_writing();
  // The held mask moved to that device and dtype (none: its own), keeping
  // its identity.
  void convert_mask(std::optional<c10::Device> device, std::optional<at::ScalarType> dtype);
  void check_mask(const char* where, const at::Tensor& mask) const;

  const Kind& kind_;
  at::Tensor mask_;
  // Readers of the mask's values (forward, get_state, sparsity_level) hold
  // it shared; update_mask and the device and dtype moves hold it
  // exclusively. Taken before cache_mutex_ when both are held.
  mutable std::shared_mutex mask_mutex_;
  // Readers pass through it before taking mask_mutex_, and a writer holds it
  // while it waits for mask_mutex_: glibc's rwlock prefers readers, so
  // without it a steady stream of forwards could starve update_mask.
  mutable std::mutex writer_turnstile_;
  // Guards the cache fields below.
  mutable std::mutex cache_mutex_;
  std::optional<CacheEntry> cache_;
  bool cache_enabled_ = true;
  int64_t cache_hits_ = 0;
};

// mask * x, mask of x's shape.
class FakeSparsity : public MaskHolder {
 public:
  static const Kind kKind;
  explicit FakeSparsity(at::Tensor mask);
  static c10::intrusive_ptr<FakeSparsity> from_state(const c10::IValue& state);
};

// mask.reshape(-1, 1, ...) * x, mask of shape [x.size(0)]: whole slices
// along dim 0 (rows of a Linear weight, output channels of a convolution).
class FakeStructuredSparsity : public MaskHolder {
 public:
  static const Kind kKind;
  explicit FakeStructuredSparsity(at::Tensor mask);
  static c10::intrusive_ptr<FakeStructuredSparsity> from_state(const c10::IValue& state);
};

} // namespace sparsity
