// CUDA kernels of fake_sparsity and fake_sparsity_.
//
// Same arithmetic as the CPU kernel (and as PyTorch's mask * x): both
// operands converted to the op-math type of the promoted dtype, multiplied,
// rounded once to the output dtype. Two kernels:
//  - flat: x, mask and out share one dense memory layout, so element i of each
//    is at offset i. Each thread moves several elements per load (16 bytes of
//    the widest of the three types) when all three pointers are aligned for
//    it, and one element per load otherwise (a view such as x[1:] starts
//    mid-vector).
//  - strided: any other layout; every element's three offsets are computed
//    from its linear index with 64-bit arithmetic.
// Both are grid-stride loops over a capped grid, with 64-bit indices, so
// tensors of more than 2^31 elements work. Everything runs on PyTorch's
// current stream of x's device.

#include "ops/fake_sparsity_common.h"

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace sparsity {
namespace ops {
namespace {

constexpr int kThreadsPerBlock = 256;
// Vectors each thread loads before it computes and stores, so that several
// loads per thread are in flight at once.
constexpr int kUnroll = 4;
// Widest load, in bytes.
constexpr int kMaxLoadBytes = 16;
// Dimensions the strided kernel takes after merging (TensorIterator's limit).
constexpr int kMaxDims = 25;
// The flat kernel's last numel % kVec (< kVec <= kMaxLoadBytes) elements go
// to one thread each of the first block.
static_assert(kThreadsPerBlock >= kMaxLoadBytes, "first block must cover the tail");

template <typename compute_t, typename out_t, typename x_t, typename mask_t>
C10_HOST_DEVICE inline out_t masked_value(mask_t m, x_t v) {
  return static_cast<out_t>(static_cast<compute_t>(m) * static_cast<compute_t>(v));
}

// kVec elements of T loaded or stored as one access of sizeof(T) * kVec
// bytes (a power of two up to 16, so a single vector instruction).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Elements per vector load: 16 bytes of the widest of the three types.
template <typename out_t, typename x_t, typename mask_t>
constexpr int vector_width() {
  return kMaxLoadBytes /
      static_cast<int>(std::max({sizeof(out_t), sizeof(x_t), sizeof(mask_t)}));
}

// One chunk of the flat kernel: kUnroll packs per thread, consecutive
// threads on consecutive packs (coalesced), every load issued before the
// first store. out may be x (in place): each element is read and then written
// by the same thread, so that is safe. kChecked drops packs at or past
// num_packs; chunks that lie wholly inside skip the checks, which also lets
// the compiler keep all loads in flight together.
template <bool kChecked, int kVec, typename out_t, typename x_t, typename mask_t>
__device__ inline void apply_mask_chunk(
    Pack<out_t, kVec>* out_packs,
    const Pack<x_t, kVec>* x_packs,
    const Pack<mask_t, kVec>* mask_packs,
    int64_t first_pack,
    int64_t num_packs) {
  using compute_t = at::opmath_type<detail::promoted_t<x_t, mask_t>>;
  Pack<x_t, kVec> x_in[kUnroll];
  Pack<mask_t, kVec> mask_in[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = first_pack + static_cast<int64_t>(u) * blockDim.x;
    if (!kChecked || p < num_packs) {
      x_in[u] = x_packs[p];
      mask_in[u] = mask_packs[p];
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = first_pack + static_cast<int64_t>(u) * blockDim.x;
    if (!kChecked || p < num_packs) {
      Pack<out_t, kVec> result;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        result.v[k] =
            masked_value<compute_t, out_t>(mask_in[u].v[k], x_in[u].v[k]);
      }
      out_packs[p] = result;
    }
  }
}

// out[i] = mask[i] * x[i] for i < numel, kVec elements per access. The
// pointers must be aligned to their Pack; kVec == 1 needs no more than the
// element alignment every tensor has.
template <int kVec, typename out_t, typename x_t, typename mask_t>
__global__ void __launch_bounds__(kThreadsPerBlock) apply_mask_flat_kernel(
    out_t* out,
    const x_t* x,
    const mask_t* mask,
    int64_t numel) {
  using compute_t = at::opmath_type<detail::promoted_t<x_t, mask_t>>;
  const auto* x_packs = reinterpret_cast<const Pack<x_t, kVec>*>(x);
  const auto* mask_packs = reinterpret_cast<const Pack<mask_t, kVec>*>(mask);
  auto* out_packs = reinterpret_cast<Pack<out_t, kVec>*>(out);

  const int64_t num_packs = numel / kVec;
  const int64_t block_work = static_cast<int64_t>(blockDim.x) * kUnroll;
  const int64_t grid_work = block_work * gridDim.x;
  for (int64_t chunk = block_work * blockIdx.x; chunk < num_packs;
       chunk += grid_work) {
    const int64_t first_pack = chunk + threadIdx.x;
    if (chunk + block_work <= num_packs) {
      apply_mask_chunk<false, kVec>(
          out_packs, x_packs, mask_packs, first_pack, num_packs);
    } else {
      apply_mask_chunk<true, kVec>(
          out_packs, x_packs, mask_packs, first_pack, num_packs);
    }
  }

  // The last numel % kVec elements, one per thread of the first block.
  const int64_t i = num_packs * kVec +
      static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) {
    out[i] = masked_value<compute_t, out_t>(mask[i], x[i]);
  }
}

// Sizes and element strides of out, x and mask, passed to the kernel by
// value. Dimension 0 is the outermost.
struct StridedLayout {
  int ndim;
  int64_t sizes[kMaxDims];
  int64_t out_strides[kMaxDims];
  int64_t x_strides[kMaxDims];
  int64_t mask_strides[kMaxDims];
};

template <typename out_t, typename x_t, typename mask_t>
__global__ void __launch_bounds__(kThreadsPerBlock) apply_mask_strided_kernel(
    out_t* out,
    const x_t* x,
    const mask_t* mask,
    int64_t numel,
    StridedLayout layout) {
  using compute_t = at::opmath_type<detail::promoted_t<x_t, mask_t>>;
  const int64_t grid_threads = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < numel;
       i += grid_threads) {
    int64_t rest = i;
    int64_t out_offset = 0, x_offset = 0, mask_offset = 0;
    for (int d = layout.ndim - 1; d >= 0; --d) {
      const int64_t index = rest % layout.sizes[d];
      rest /= layout.sizes[d];
      out_offset += index * layout.out_strides[d];
      x_offset += index * layout.x_strides[d];
      mask_offset += index * layout.mask_strides[d];
    }
    out[out_offset] =
        masked_value<compute_t, out_t>(mask[mask_offset], x[x_offset]);
  }
}

// Fills layout with x's shape, dropping size-1 dimensions and merging each
// dimension into the one outside it when all three tensors step through them
// as one (fewer divisions per element). False when more than kMaxDims remain.
bool make_strided_layout(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask,
    StridedLayout& layout) {
  int n = 0;
  for (int64_t d = 0; d < x.dim(); ++d) {
    const int64_t size = x.size(d);
    if (size == 1) {
      continue;
    }
    const int64_t os = out.stride(d), xs = x.stride(d), ms = mask.stride(d);
    if (n > 0 && layout.out_strides[n - 1] == os * size &&
        layout.x_strides[n - 1] == xs * size &&
        layout.mask_strides[n - 1] == ms * size) {
      layout.sizes[n - 1] *= size;
      layout.out_strides[n - 1] = os;
      layout.x_strides[n - 1] = xs;
      layout.mask_strides[n - 1] = ms;
      continue;
    }
    if (n == kMaxDims) {
      return false;
    }
    layout.sizes[n] = size;
    layout.out_strides[n] = os;
    layout.x_strides[n] = xs;
    layout.mask_strides[n] = ms;
    ++n;
  }
  if (n == 0) {
    // One element (0-d, or every size 1).
    layout.sizes[0] = 1;
    layout.out_strides[0] = layout.x_strides[0] = layout.mask_strides[0] = 0;
    n = 1;
  }
  layout.ndim = n;
  return true;
}

// blocks_needed, capped at what the device keeps resident at once (the
// kernels are grid-stride loops and do the rest) and at least 1.
unsigned int grid_size(int64_t blocks_needed, c10::DeviceIndex device) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t max_blocks =
      static_cast<int64_t>(std::max(sm_count, 1)) * (2048 / kThreadsPerBlock);
  return static_cast<unsigned int>(
      std::clamp<int64_t>(blocks_needed, 1, max_blocks));
}

bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename out_t, typename x_t, typename mask_t>
void launch_apply_mask(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask) {
  const int64_t numel = x.numel();
  const c10::DeviceIndex device = x.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  out_t* out_ptr = out.data_ptr<out_t>();
  const x_t* x_ptr = x.const_data_ptr<x_t>();
  const mask_t* mask_ptr = mask.const_data_ptr<mask_t>();

  if (detail::share_dense_layout(x, mask, out)) {
    constexpr int kVec = vector_width<out_t, x_t, mask_t>();
    const bool vectorizable = is_aligned(out_ptr, sizeof(out_t) * kVec) &&
        is_aligned(x_ptr, sizeof(x_t) * kVec) &&
        is_aligned(mask_ptr, sizeof(mask_t) * kVec);
    if (vectorizable) {
      const int64_t blocks = (numel / kVec + kThreadsPerBlock * kUnroll - 1) /
          (kThreadsPerBlock * kUnroll);
      apply_mask_flat_kernel<kVec, out_t, x_t, mask_t>
          <<<grid_size(blocks, device), kThreadsPerBlock, 0, stream>>>(
              out_ptr, x_ptr, mask_ptr, numel);
    } else {
      const int64_t blocks = (numel + kThreadsPerBlock * kUnroll - 1) /
          (kThreadsPerBlock * kUnroll);
      apply_mask_flat_kernel<1, out_t, x_t, mask_t>
          <<<grid_size(blocks, device), kThreadsPerBlock, 0, stream>>>(
              out_ptr, x_ptr, mask_ptr, numel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  StridedLayout layout;
  if (make_strided_layout(out, x, mask, layout)) {
    const int64_t blocks = (numel + kThreadsPerBlock - 1) / kThreadsPerBlock;
    apply_mask_strided_kernel<out_t, x_t, mask_t>
        <<<grid_size(blocks, device), kThreadsPerBlock, 0, stream>>>(
            out_ptr, x_ptr, mask_ptr, numel, layout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  // More than kMaxDims dimensions that cannot be merged: compute on
  // contiguous copies and copy the result into place.
  at::Tensor contiguous_out = at::empty(out.sizes(), out.options());
  launch_apply_mask<out_t, x_t, mask_t>(
      contiguous_out, x.contiguous(), mask.contiguous());
  out.copy_(contiguous_out);
}

// out = mask * x, out already allocated with the result (or x's) dtype.
void apply_mask_cuda(
    const char* op_name,
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask) {
  if (x.numel() == 0) {
    return;
  }
  detail::dispatch_fake_sparsity_types(
      op_name, out, x, mask, [&](auto out_tag, auto x_tag, auto mask_tag) {
        launch_apply_mask<decltype(out_tag), decltype(x_tag), decltype(mask_tag)>(
            out, x, mask);
      });
}

at::Tensor fake_sparsity_cuda(const at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_sparsity_inputs("fake_sparsity", x, mask);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty_like(
      x, x.options().dtype(detail::fake_sparsity_result_type(x, mask)));
  apply_mask_cuda("fake_sparsity", out, x, mask);
  return out;
}

at::Tensor& fake_sparsity__cuda(at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_sparsity_inputs("fake_sparsity_", x, mask);
  detail::check_inplace_overlap("fake_sparsity_", x, mask);
  const c10::cuda::CUDAGuard device_guard(x.device());
  apply_mask_cuda("fake_sparsity_", x, x, mask);
  return x;
}

} // namespace

TORCH_LIBRARY_IMPL(sparsity, CUDA, m) {
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity"),
      TORCH_FN(fake_sparsity_cuda));
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity_"),
      TORCH_FN(fake_sparsity__cuda));
}

} // namespace ops
} // namespace sparsity
