// CPU kernels of fake_sparsity, fake_sparsity_ and fake_structured_sparsity.
//
// Two loops: a flat one for tensors that share one dense memory layout
// (contiguous, channels-last, any dense permutation), which the compiler
// vectorises, and a strided one for everything else. Both are split across
// threads with at::parallel_for. The flat loops that involve float16 or
// bfloat16 are written with conversion intrinsics (fake_sparsity_half.h).

#include "ops/fake_sparsity_common.h"
#include "ops/cpu/fake_sparsity_half.h"
#include "ops/registration.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparsity {
namespace ops {
namespace {

// Elements per task: small tensors stay on one thread, where waking the pool
// costs more than it saves.
constexpr int64_t kGrainSize = 32768;

// One product, computed as PyTorch computes mask * x: both operands in the
// op-math type of the promoted dtype, rounded once to the output dtype. A bool
// mask is read as its byte, normalised to 0 or 1, which the compiler
// vectorises (a bool load it does not).
template <typename compute_t, typename out_t, typename x_t, typename mask_t>
inline out_t masked_value(mask_t m, x_t v) {
  return static_cast<out_t>(static_cast<compute_t>(m) * static_cast<compute_t>(v));
}

template <typename out_t, typename x_t, typename mask_t>
using mask_storage_t = std::conditional_t<std::is_same_v<mask_t, bool>, uint8_t, mask_t>;

template <typename out_t, typename x_t, typename mask_t>
__attribute__((always_inline)) inline void flat_loop(
    out_t* out,
    const x_t* x,
    const mask_storage_t<out_t, x_t, mask_t>* mask,
    int64_t n) {
  using compute_t = at::opmath_type<detail::promoted_t<x_t, mask_t>>;
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<mask_t, bool>) {
      // As int32_t: GCC 12 does not vectorise a bool (nor a min(byte, 1))
      // passed on, and a scalar loop is 3x slower.
      const int32_t keep = mask[i] != 0;
      out[i] = masked_value<compute_t, out_t>(keep, x[i]);
    } else {
      out[i] = masked_value<compute_t, out_t>(mask[i], x[i]);
    }
  }
}

// flat_loop out of line, for the loop pickers that take its address.
template <typename out_t, typename x_t, typename mask_t>
void generic_flat_loop(
    out_t* out,
    const x_t* x,
    const mask_storage_t<out_t, x_t, mask_t>* mask,
    int64_t n) {
  flat_loop<out_t, x_t, mask_t>(out, x, mask, n);
}

// PyTorch's own kernels use the widest vectors the CPU has; to keep up while
// the data is in cache, the float and double loops are compiled for AVX-512
// and AVX2 too, and the loader picks the best once (GCC function clones).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TORCH_SPARSITY_NO_CPU_CLONES)
#define SPARSITY_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPARSITY_CPU_CLONES
#endif

// The cloned loops, one per (out, x, mask) triple of plain C++ types; those
// with half or bfloat16 are in fake_sparsity_half.h.
template <typename out_t, typename x_t, typename mask_t>
struct ClonedFlatLoop {
  static constexpr bool available = false;
};

#define SPARSITY_DEFINE_CLONED_FLAT_LOOP(OUT, X, MASK)                               \
  SPARSITY_CPU_CLONES void cloned_flat_loop_##OUT##_##X##_##MASK(                      \
      OUT* out, const X* x, const mask_storage_t<OUT, X, MASK>* mask, int64_t n) { \
    flat_loop<OUT, X, MASK>(out, x, mask, n);                                      \
  }                                                                                \
  template <>                                                                      \
  struct ClonedFlatLoop<OUT, X, MASK> {                                            \
    static constexpr bool available = true;                                        \
    static void run(OUT* out, const X* x, const mask_storage_t<OUT, X, MASK>* mask, int64_t n) { \
      cloned_flat_loop_##OUT##_##X##_##MASK(out, x, mask, n);                        \
    }                                                                              \
  };

SPARSITY_DEFINE_CLONED_FLAT_LOOP(float, float, bool)
SPARSITY_DEFINE_CLONED_FLAT_LOOP(float, float, uint8_t)
SPARSITY_DEFINE_CLONED_FLAT_LOOP(float, float, float)
SPARSITY_DEFINE_CLONED_FLAT_LOOP(double, float, double)
SPARSITY_DEFINE_CLONED_FLAT_LOOP(float, float, double) // in place
SPARSITY_DEFINE_CLONED_FLAT_LOOP(double, double, bool)
SPARSITY_DEFINE_CLONED_FLAT_LOOP(double, double, uint8_t)
SPARSITY_DEFINE_CLONED_FLAT_LOOP(double, double, float)
SPARSITY_DEFINE_CLONED_FLAT_LOOP(double, double, double)

template <typename out_t, typename x_t, typename mask_t>
using FlatLoop = void (*)(out_t*, const x_t*, const mask_storage_t<out_t, x_t, mask_t>*, int64_t);

// The fastest flat loop this CPU has for the types.
template <typename out_t, typename x_t, typename mask_t>
FlatLoop<out_t, x_t, mask_t> pick_flat_loop() {
  if constexpr (half_loops::covers<out_t, x_t, mask_t>) {
    return half_loops::pick<out_t, x_t, mask_t>(&generic_flat_loop<out_t, x_t, mask_t>);
  } else if constexpr (ClonedFlatLoop<out_t, x_t, mask_t>::available) {
    return &ClonedFlatLoop<out_t, x_t, mask_t>::run;
  } else {
    return &generic_flat_loop<out_t, x_t, mask_t>;
  }
}

template <typename out_t, typename x_t, typename mask_t>
void apply_mask_flat(
    out_t* out,
    const x_t* x,
    const mask_t* mask,
    int64_t numel) {
  using storage_t = mask_storage_t<out_t, x_t, mask_t>;
  const auto* mask_storage = reinterpret_cast<const storage_t*>(mask);
  const auto loop = pick_flat_loop<out_t, x_t, mask_t>();
  at::parallel_for(0, numel, kGrainSize, [=](int64_t begin, int64_t end) {
    loop(out + begin, x + begin, mask_storage + begin, end - begin);
  });
}

// A row mask (one entry per slice along dim 0) on contiguous x and out.
// float and double x: each row is one scalar times the row, which moves the
// bytes of a copy of x. float16 and bfloat16 x: the flat loops (and their
// conversion intrinsics) over the row with a small mask block filled with
// that row's entry, which stays in L1. Either way the rounding is that of
// fake_sparsity.
template <typename out_t, typename x_t, typename compute_t>
__attribute__((always_inline)) inline void scalar_mask_loop(out_t* out, const x_t* x, compute_t m, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<out_t>(m * static_cast<compute_t>(x[i]));
  }
}

template <typename out_t, typename x_t>
struct ScalarMaskLoop {
  static constexpr bool available = false;
};

#define SPARSITY_DEFINE_SCALAR_MASK_LOOP(OUT, X)                                         \
  SPARSITY_CPU_CLONES void scalar_mask_loop_##OUT##_##X(OUT* out, const X* x, OUT m, int64_t n) { \
    scalar_mask_loop<OUT, X, OUT>(out, x, m, n);                                          \
  }                                                                                       \
  template <>                                                                             \
  struct ScalarMaskLoop<OUT, X> {                                                         \
    static constexpr bool available = true;                                               \
    static void run(OUT* out, const X* x, OUT m, int64_t n) {                             \
      scalar_mask_loop_##OUT##_##X(out, x, m, n);                                         \
    }                                                                                     \
  };

SPARSITY_DEFINE_SCALAR_MASK_LOOP(float, float)
SPARSITY_DEFINE_SCALAR_MASK_LOOP(double, double)
SPARSITY_DEFINE_SCALAR_MASK_LOOP(double, float)

constexpr int64_t kRowMaskBlock = 2048;

template <typename out_t, typename x_t, typename mask_t>
void apply_row_mask_flat(
    out_t* out,
    const x_t* x,
    const mask_t* mask,
    int64_t mask_stride,
    int64_t numel,
    int64_t row_numel) {
  using storage_t = mask_storage_t<out_t, x_t, mask_t>;
  const auto* mask_storage = reinterpret_cast<const storage_t*>(mask);
  if constexpr (ScalarMaskLoop<out_t, x_t>::available) {
    // out_t is the op-math type of the promoted dtype here (float or double).
    at::parallel_for(0, numel, kGrainSize, [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end;) {
        const int64_t row = i / row_numel;
        const int64_t n = std::min(end, (row + 1) * row_numel) - i;
        const storage_t entry = mask_storage[row * mask_stride];
        out_t m;
        if constexpr (std::is_same_v<mask_t, bool>) {
          m = static_cast<out_t>(entry != 0);
        } else {
          m = static_cast<out_t>(entry);
        }
        ScalarMaskLoop<out_t, x_t>::run(out + i, x + i, m, n);
        i += n;
      }
    });
    return;
  }
  const auto loop = pick_flat_loop<out_t, x_t, mask_t>();
  at::parallel_for(0, numel, kGrainSize, [=](int64_t begin, int64_t end) {
    storage_t block[kRowMaskBlock];
    int64_t block_row = -1;
    int64_t block_filled = 0;
    for (int64_t i = begin; i < end;) {
      const int64_t row = i / row_numel;
      const int64_t n = std::min({kRowMaskBlock, end - i, (row + 1) * row_numel - i});
      if (row != block_row || block_filled < n) {
        std::fill_n(block, n, mask_storage[row * mask_stride]);
        block_row = row;
        block_filled = n;
      }
      loop(out + i, x + i, block, n);
      i += n;
    }
  });
}

template <typename out_t, typename x_t, typename mask_t>
void apply_mask_strided(
    const at::Tensor& out_tensor,
    const at::Tensor& x_tensor,
    const at::Tensor& mask_tensor) {
  using compute_t = at::opmath_type<detail::promoted_t<x_t, mask_t>>;
  // A 0-d tensor is walked as a 1-d tensor of one element.
  const int64_t ndim = std::max<int64_t>(x_tensor.dim(), 1);
  c10::SmallVector<int64_t, 8> sizes(ndim, 1), xs(ndim, 0), ms(ndim, 0),
      os(ndim, 0);
  for (int64_t d = 0; d < x_tensor.dim(); ++d) {
    sizes[d] = x_tensor.size(d);
    xs[d] = x_tensor.stride(d);
    ms[d] = mask_tensor.stride(d);
    os[d] = out_tensor.stride(d);
  }
  out_t* out = out_tensor.data_ptr<out_t>();
  const x_t* x = x_tensor.const_data_ptr<x_t>();
  const mask_t* mask = mask_tensor.const_data_ptr<mask_t>();
  const int64_t last = ndim - 1;

  at::parallel_for(0, x_tensor.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    // Multi-index and element offsets of the first element of this range.
    c10::SmallVector<int64_t, 8> index(ndim, 0);
    int64_t rest = begin;
    int64_t xo = 0, mo = 0, oo = 0;
    for (int64_t d = last; d >= 0; --d) {
      index[d] = rest % sizes[d];
      rest /= sizes[d];
      xo += index[d] * xs[d];
      mo += index[d] * ms[d];
      oo += index[d] * os[d];
    }
    int64_t i = begin;
    while (i < end) {
      const int64_t run = std::min(sizes[last] - index[last], end - i);
      for (int64_t k = 0; k < run; ++k) {
        out[oo + k * os[last]] =
            masked_value<compute_t, out_t>(mask[mo + k * ms[last]], x[xo + k * xs[last]]);
      }
      i += run;
      index[last] += run;
      xo += run * xs[last];
      mo += run * ms[last];
      oo += run * os[last];
      // Carry into the outer dimensions.
      for (int64_t d = last; d > 0 && index[d] == sizes[d]; --d) {
        xo += xs[d - 1] - sizes[d] * xs[d];
        mo += ms[d - 1] - sizes[d] * ms[d];
        oo += os[d - 1] - sizes[d] * os[d];
        index[d] = 0;
        ++index[d - 1];
      }
    }
  });
}

// out = mask * x, out already allocated with the result (or x's) dtype.
void apply_mask_cpu(
    const char* op_name,
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask) {
  if (x.numel() == 0) {
    return;
  }
  detail::dispatch_fake_sparsity_types(
      op_name, out, x, mask, [&](auto out_tag, auto x_tag, auto mask_tag) {
        using out_t = decltype(out_tag);
        using x_t = decltype(x_tag);
        using mask_t = decltype(mask_tag);
        if (detail::share_dense_layout(x, mask, out)) {
          apply_mask_flat<out_t, x_t, mask_t>(
              out.data_ptr<out_t>(),
              x.const_data_ptr<x_t>(),
              mask.const_data_ptr<mask_t>(),
              x.numel());
        } else {
          apply_mask_strided<out_t, x_t, mask_t>(out, x, mask);
        }
      });
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
  const char* op_name = "fake_structured_sparsity";
  detail::check_fake_structured_sparsity_inputs(op_name, x, mask);
  at::Tensor out = at::empty_like(
      x, x.options().dtype(detail::fake_sparsity_result_type(x, mask)));
  if (x.numel() == 0) {
    return out;
  }
  advise_huge_pages(out);
  if (!(x.is_contiguous() && out.is_contiguous())) {
    // Any other layout: fake_sparsity's kernels on the mask expanded to x's
    // shape (stride 0 past dim 0).
    apply_mask_cpu(op_name, out, x, detail::expand_row_mask(mask, x));
    return out;
  }
  detail::dispatch_fake_sparsity_types(
      op_name, out, x, mask, [&](auto out_tag, auto x_tag, auto mask_tag) {
        using out_t = decltype(out_tag);
        using x_t = decltype(x_tag);
        using mask_t = decltype(mask_tag);
        apply_row_mask_flat<out_t, x_t, mask_t>(
            out.data_ptr<out_t>(),
            x.const_data_ptr<x_t>(),
            mask.const_data_ptr<mask_t>(),
            mask.stride(0),
            x.numel(),
            x.numel() / x.size(0));
      });
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
