#pragma once

// The one hand-written CUDA kernel of fake_sparsity and fake_sparsity_: x,
// mask and out in one dense memory layout with a bool or uint8 mask, where it
// beats aten's mul (which converts the mask element by element; aten wins
// with a floating mask: docs/performance.md, "Operator, GPU"). Every other
// case is aten's mul, in ops/cuda/fake_sparsity_kernel.cu. In a header, apart
// from the CUDA runtime calls, so that tests/cpp/test_cuda_kernel_emulation.cpp
// can compile the same code for the CPU and run every block and thread of
// each launch in a loop: that checks the index arithmetic (packs, tails, the
// grid-stride loop) on machines without a GPU.
//
// Same arithmetic as PyTorch's mask * x: both operands converted to the
// op-math type of the promoted dtype, multiplied, rounded once to the output
// dtype. Element i of each tensor is at offset i. Each thread moves a pack of
// elements per access (16 bytes of the widest of the three types) when all
// three pointers are aligned for it, and one element per access otherwise (a
// view such as x[1:] starts mid-vector). A grid-stride loop with 64-bit
// indices, so tensors of more than 2^31 elements work; it runs on PyTorch's
// current stream of x's device.

#include "ops/fake_sparsity_common.h"

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#define TORCH_SPARSITY_UNROLL _Pragma("unroll")
#elif defined(TORCH_SPARSITY_CUDA_EMULATION)
// The CPU build of the kernel (see above): CUDA's keywords vanish, and the
// built-in thread coordinates are variables that the emulating launcher sets
// before each call of the kernel.
#define __global__
#define __device__
#define __launch_bounds__(...)
#define TORCH_SPARSITY_UNROLL
namespace sparsity {
namespace ops {
struct EmulatedDim3 {
  unsigned int x = 0, y = 1, z = 1;
};
inline EmulatedDim3 blockIdx, threadIdx, blockDim, gridDim;
} // namespace ops
} // namespace sparsity
#else
#error "fake_sparsity_kernel.cuh is for nvcc, or for the CPU with TORCH_SPARSITY_CUDA_EMULATION"
#endif

namespace sparsity {
namespace ops {
namespace {

constexpr int kThreads = 256;
// Packs each thread loads before it computes and stores.
constexpr int kUnroll = 4;
// Widest single load, in bytes.
constexpr int kMaxLoadBytes = 16;
// The grid is capped at one wave of what an SM keeps resident (sm_90), and
// loops beyond it.
constexpr int kThreadsPerSM = 2048;
// The last numel % kVec (< 16) elements go to one thread each of the first
// block.
static_assert(kThreads >= 16, "first block must cover the tail");

template <typename compute_t, typename out_t, typename x_t, typename mask_t>
C10_HOST_DEVICE inline out_t masked_value(mask_t m, x_t v) {
  return static_cast<out_t>(static_cast<compute_t>(m) * static_cast<compute_t>(v));
}

// kVec elements of T, loaded or stored as one access of at most 16 bytes.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Elements per pack: 16 bytes of the widest of the three types.
template <typename out_t, typename x_t, typename mask_t>
constexpr int vector_width() {
  return kMaxLoadBytes / static_cast<int>(std::max({sizeof(out_t), sizeof(x_t), sizeof(mask_t)}));
}

// One chunk: kUnroll packs per thread, consecutive threads on consecutive
// packs (coalesced), every load issued before the first store. out may be x
// (in place): each element is read and then written by the same thread.
// kChecked drops packs at or past num_packs; chunks that lie wholly inside
// skip the checks, which also lets the compiler keep all loads in flight.
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
TORCH_SPARSITY_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = first_pack + static_cast<int64_t>(u) * blockDim.x;
    if (!kChecked || p < num_packs) {
      x_in[u] = x_packs[p];
      mask_in[u] = mask_packs[p];
    }
  }
TORCH_SPARSITY_UNROLL
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t p = first_pack + static_cast<int64_t>(u) * blockDim.x;
    if (!kChecked || p < num_packs) {
      Pack<out_t, kVec> result;
TORCH_SPARSITY_UNROLL
      for (int k = 0; k < kVec; ++k) {
        result.v[k] = masked_value<compute_t, out_t>(mask_in[u].v[k], x_in[u].v[k]);
      }
      out_packs[p] = result;
    }
  }
}

// out[i] = mask[i] * x[i] for i < numel, kVec elements per access. The
// pointers must be aligned to their Pack; kVec == 1 needs no more than the
// element alignment every tensor has.
template <int kVec, typename out_t, typename x_t, typename mask_t>
__global__ void __launch_bounds__(kThreads) apply_mask_flat_kernel(
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
  for (int64_t chunk = block_work * blockIdx.x; chunk < num_packs; chunk += grid_work) {
    const int64_t first_pack = chunk + threadIdx.x;
    if (chunk + block_work <= num_packs) {
      apply_mask_chunk<false, kVec>(out_packs, x_packs, mask_packs, first_pack, num_packs);
    } else {
      apply_mask_chunk<true, kVec>(out_packs, x_packs, mask_packs, first_pack, num_packs);
    }
  }

  // The last numel % kVec elements, one per thread of the first block.
  const int64_t i = num_packs * kVec + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) {
    out[i] = masked_value<compute_t, out_t>(mask[i], x[i]);
  }
}

// Blocks for numel elements in packs of kVec: one per chunk, capped at one
// wave of sm_count SMs (the grid-stride loop does the rest), at least 1.
inline unsigned int grid_blocks(int64_t numel, int vec, int sm_count) {
  constexpr int64_t kBlockPacks = int64_t{kThreads} * kUnroll;
  const int64_t needed = (numel / vec + kBlockPacks - 1) / kBlockPacks;
  const int64_t wave = static_cast<int64_t>(std::max(sm_count, 1)) * (kThreadsPerSM / kThreads);
  return static_cast<unsigned int>(std::clamp<int64_t>(needed, 1, wave));
}

template <typename T>
bool is_aligned(const T* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// True when the kernel takes (out, x, mask): a bool or uint8 mask, one dense
// layout shared by all three, and at least one element.
inline bool kernel_covers(const at::Tensor& out, const at::Tensor& x, const at::Tensor& mask) {
  const auto m = mask.scalar_type();
  return (m == at::kBool || m == at::kByte) && x.numel() > 0 && detail::share_dense_layout(x, mask, out);
}

// out = mask * x by the kernel, for inputs kernel_covers accepts (checked by
// the caller); out may be x (in place). The Launcher runs a kernel:
//   int sm_count();  the device's SMs, for the grid cap
//   void launch(kernel, blocks, threads, args...);
// CudaLauncher (fake_sparsity_kernel.cu) launches on the GPU's current
// stream and checks the launch; the emulation test loops on the CPU.
template <typename Launcher>
void launch_apply_mask(
    Launcher& launcher,
    const char* op_name,
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask) {
  detail::dispatch_fake_sparsity_types(op_name, out, x, mask, [&](auto out_tag, auto x_tag, auto mask_tag) {
    using out_t = decltype(out_tag);
    using x_t = decltype(x_tag);
    using mask_t = decltype(mask_tag);
    if constexpr (sizeof(mask_t) == 1) {
      out_t* out_ptr = out.data_ptr<out_t>();
      const x_t* x_ptr = x.const_data_ptr<x_t>();
      const mask_t* mask_ptr = mask.const_data_ptr<mask_t>();
      const int64_t numel = x.numel();
      constexpr int kVec = vector_width<out_t, x_t, mask_t>();
      if (is_aligned(out_ptr, sizeof(out_t) * kVec) && is_aligned(x_ptr, sizeof(x_t) * kVec) &&
          is_aligned(mask_ptr, sizeof(mask_t) * kVec)) {
        launcher.launch(
            apply_mask_flat_kernel<kVec, out_t, x_t, mask_t>,
            grid_blocks(numel, kVec, launcher.sm_count()), kThreads, out_ptr, x_ptr, mask_ptr, numel);
      } else {
        launcher.launch(
            apply_mask_flat_kernel<1, out_t, x_t, mask_t>,
            grid_blocks(numel, 1, launcher.sm_count()), kThreads, out_ptr, x_ptr, mask_ptr, numel);
      }
    } else {
      TORCH_INTERNAL_ASSERT(false, op_name, ": the CUDA kernel takes only bool and uint8 masks");
    }
  });
}

} // namespace
} // namespace ops
} // namespace sparsity
