// CPU kernels of fake_sparsity, fake_sparsity_ and fake_structured_sparsity.
//
// aten's mul (mask * x, the contract's own definition, so the same bits) does
// the work, except where the operator benchmark shows a hand-written loop
// beating it (docs/performance.md, "Operator, CPU"): x, mask and result in
// one dense layout with a bool or uint8 mask or a float16/bfloat16 operand,
// which the vector loops of fake_sparsity_vector.h take, split across
// threads.

#include "ops/fake_sparsity_common.h"
#include "ops/cpu/fake_sparsity_vector.h"
#include "ops/registration.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparsity {
namespace ops {
namespace {

// Elements per task: small tensors stay on one thread, where waking the pool
// costs more than it saves.
constexpr int64_t kGrainSize = 32768;

// out = mask * x by a vector loop; false (nothing written) where none covers
// the types, the layout or this CPU.
bool apply_mask_vector(
    const char* op_name,
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask) {
  if (!detail::share_dense_layout(x, mask, out)) {
    return false;
  }
  bool done = false;
  detail::dispatch_fake_sparsity_types(
      op_name, out, x, mask, [&](auto out_tag, auto x_tag, auto mask_tag) {
        using out_t = decltype(out_tag);
        using x_t = decltype(x_tag);
        using mask_t = decltype(mask_tag);
        if constexpr (vector_loops::covers<out_t, x_t, mask_t>) {
          const auto loop = vector_loops::pick<out_t, x_t, mask_t>();
          if (loop == nullptr) {
            return;
          }
          out_t* out_ptr = out.data_ptr<out_t>();
          const x_t* x_ptr = x.const_data_ptr<x_t>();
          // A bool mask is read as its bytes.
          const auto* mask_ptr =
              reinterpret_cast<const vector_loops::mask_bytes_t<mask_t>*>(mask.const_data_ptr<mask_t>());
          at::parallel_for(0, x.numel(), kGrainSize, [=](int64_t begin, int64_t end) {
            loop(out_ptr + begin, x_ptr + begin, mask_ptr + begin, end - begin);
          });
          done = true;
        }
      });
  return done;
}

// out = mask * x, out already allocated with the result (or x's) dtype.
void apply_mask_cpu(
    const char* op_name,
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask) {
  if (x.numel() == 0 || apply_mask_vector(op_name, out, x, mask)) {
    return;
  }
  detail::mul_into(out, x, mask);
}

// A result of 32 MiB or more is memory glibc has just mapped for it (its
// mmap threshold never exceeds 32 MiB), and the first write to each 4 KiB
// page faults: at 16M float32 elements the faults cost more than the kernel.
// Advising transparent huge pages for the still untouched pages (what
// PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every allocation) makes that one
// fault per 2 MiB. Advice only: without THP support nothing changes.
constexpr size_t kHugePageAdviceMinBytes = size_t{32} << 20;
constexpr uintptr_t kHugePageBytes = uintptr_t{2} << 20;

void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t nbytes = fresh.storage().nbytes();
  if (nbytes < kHugePageAdviceMinBytes) {
    return;
  }
  // Only whole huge pages inside the allocation: the advice must not reach
  // memory that belongs to anything else.
  const auto begin = reinterpret_cast<uintptr_t>(fresh.storage().data());
  const uintptr_t first = (begin + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t last = (begin + nbytes) & ~(kHugePageBytes - 1);
  if (last > first) {
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)fresh;
#endif
}

at::Tensor fake_sparsity_cpu(const at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_sparsity_inputs("fake_sparsity", x, mask);
  at::Tensor out = at::empty_like(
      x, x.options().dtype(detail::fake_sparsity_result_type(x, mask)));
  advise_huge_pages(out);
  apply_mask_cpu("fake_sparsity", out, x, mask);
  return out;
}

at::Tensor fake_structured_sparsity_cpu(const at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_structured_sparsity_inputs("fake_structured_sparsity", x, mask);
  at::Tensor out = at::empty_like(
      x, x.options().dtype(detail::fake_sparsity_result_type(x, mask)));
  advise_huge_pages(out);
  detail::mul_into(out, x, detail::row_mask_view(mask, x));
  return out;
}

at::Tensor& fake_sparsity__cpu(at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_sparsity_inputs("fake_sparsity_", x, mask);
  detail::check_inplace_overlap("fake_sparsity_", x, mask);
  apply_mask_cpu("fake_sparsity_", x, x, mask);
  return x;
}

} // namespace

SPARSITY_LIBRARY_IMPL(CPU, m) {
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity"),
      TORCH_FN(fake_sparsity_cpu));
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity_"),
      TORCH_FN(fake_sparsity__cpu));
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_structured_sparsity"),
      TORCH_FN(fake_structured_sparsity_cpu));
}

} // namespace ops
} // namespace sparsity
