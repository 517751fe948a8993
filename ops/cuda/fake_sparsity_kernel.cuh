#pragma once

// The CUDA kernels of fake_sparsity and fake_sparsity_ (ops/cuda/
// fake_sparsity_kernel.cu) and the host code that picks a kernel and its
// launch shape. In a header, apart from the CUDA runtime calls, so that
// tests/cpp/test_cuda_kernel_emulation.cpp can compile the same code for the
// CPU and run every block and thread of each launch in a loop: that checks
// the index arithmetic (packs, tails, grid-stride loops, the strided offsets,
// the host loop past kMaxDims) on machines without a GPU.
//
// Same arithmetic as the CPU kernel (and as PyTorch's mask * x): both
// operands converted to the op-math type of the promoted dtype, multiplied,
// rounded once to the output dtype. Two kernels:
//  - flat: x, mask and out share one dense memory layout, so element i of each
//    is at offset i. Each thread moves several elements per access ("a
//    pack": 16 bytes of the widest of the three types, or with a 1-byte mask
//    optionally more, below) when all three pointers are aligned for it, and
//    one element per access otherwise (a view such as x[1:] starts
//    mid-vector).
//  - strided: any other layout; every element's three offsets are computed
//    from its linear index with 64-bit arithmetic. Layouts of more than
//    kMaxDims dimensions (after merging) loop over the outer ones on the host.
// Both are grid-stride loops with 64-bit indices, so tensors of more than
// 2^31 elements work. Everything runs on PyTorch's current stream of x's
// device.
//
// Launch settings of the flat kernel, fixed at compile time (CMake cache
// variables of the same names set them; see CMakeLists.txt):
//  TORCH_SPARSITY_CUDA_FLAT_THREADS      threads per block (256)
//  TORCH_SPARSITY_CUDA_FLAT_UNROLL       packs each thread loads before it
//                                        computes and stores (4)
//  TORCH_SPARSITY_CUDA_FLAT_GRID_WAVES   grid cap, in waves of
//                                        SMs * 2048 / threads blocks (1);
//                                        0: one block per chunk, no cap
//  TORCH_SPARSITY_CUDA_FLAT_MIN_BLOCKS   blocks per SM the compiler must fit
//                                        (the second __launch_bounds__
//                                        argument; 0: none). 2048 / threads
//                                        makes a wave of the cap one resident
//                                        wave: without it the kernel for
//                                        float32 x and mask takes 60
//                                        registers (ptxas -v), so 4 blocks of
//                                        256 fit an SM and the cap's "one
//                                        wave" runs as two
//  TORCH_SPARSITY_CUDA_BYTE_MASK_VEC     elements per pack with a bool or
//                                        uint8 mask (0: the rule above); 8 or
//                                        16 load that many mask bytes at once,
//                                        and x and out in up to four 16-byte
//                                        pieces (float32 and 16: one 16-byte
//                                        mask load, four of x, four stores)
//  TORCH_SPARSITY_CUDA_BYTE_MASK_UNROLL  the unroll of those packs
//                                        (0: FLAT_UNROLL)
// A pointer not aligned for the wide pack falls back to the 16-byte pack,
// then to one element per access.

#include "ops/fake_sparsity_common.h"

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__CUDACC__)
#define TORCH_SPARSITY_UNROLL _Pragma("unroll")
#elif defined(TORCH_SPARSITY_CUDA_EMULATION)
// The CPU build of the kernels (see above): CUDA's keywords vanish, and the
// built-in thread coordinates are variables that the emulating launcher sets
// before each call of a kernel.
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

#ifndef TORCH_SPARSITY_CUDA_FLAT_THREADS
#define TORCH_SPARSITY_CUDA_FLAT_THREADS 256
#endif
#ifndef TORCH_SPARSITY_CUDA_FLAT_UNROLL
#define TORCH_SPARSITY_CUDA_FLAT_UNROLL 4
#endif
#ifndef TORCH_SPARSITY_CUDA_FLAT_GRID_WAVES
#define TORCH_SPARSITY_CUDA_FLAT_GRID_WAVES 1
#endif
#ifndef TORCH_SPARSITY_CUDA_FLAT_MIN_BLOCKS
#define TORCH_SPARSITY_CUDA_FLAT_MIN_BLOCKS 0
#endif
#ifndef TORCH_SPARSITY_CUDA_BYTE_MASK_VEC
#define TORCH_SPARSITY_CUDA_BYTE_MASK_VEC 0
#endif
#ifndef TORCH_SPARSITY_CUDA_BYTE_MASK_UNROLL
#define TORCH_SPARSITY_CUDA_BYTE_MASK_UNROLL 0
#endif
#ifndef TORCH_SPARSITY_CUDA_STRIDED_MAX_DIMS
#define TORCH_SPARSITY_CUDA_STRIDED_MAX_DIMS 25
#endif

namespace sparsity {
namespace ops {
namespace {

constexpr int kFlatThreads = TORCH_SPARSITY_CUDA_FLAT_THREADS;
constexpr int kFlatUnroll = TORCH_SPARSITY_CUDA_FLAT_UNROLL;
constexpr int kFlatGridWaves = TORCH_SPARSITY_CUDA_FLAT_GRID_WAVES;
constexpr int kFlatMinBlocks = TORCH_SPARSITY_CUDA_FLAT_MIN_BLOCKS;
constexpr int kByteMaskVec = TORCH_SPARSITY_CUDA_BYTE_MASK_VEC;
constexpr int kByteMaskUnroll = TORCH_SPARSITY_CUDA_BYTE_MASK_UNROLL > 0
    ? TORCH_SPARSITY_CUDA_BYTE_MASK_UNROLL
    : kFlatUnroll;
constexpr int kStridedThreads = 256;
// Widest single load, in bytes.
constexpr int kMaxLoadBytes = 16;
// Most bytes of x (or out) per pack: four 16-byte loads.
constexpr int kMaxPackBytes = 4 * kMaxLoadBytes;
// Resident threads per SM that a wave of the grid cap counts (sm_90).
constexpr int kThreadsPerSM = 2048;
// Dimensions the strided kernel takes after merging (TensorIterator's limit).
// Only the emulation test lowers it, to run the host loop over several
// dimensions on small tensors.
constexpr int kMaxDims = TORCH_SPARSITY_CUDA_STRIDED_MAX_DIMS;

static_assert(
    kFlatThreads >= 32 && kFlatThreads <= 1024 && kFlatThreads % 32 == 0,
    "TORCH_SPARSITY_CUDA_FLAT_THREADS: a multiple of 32 from 32 to 1024");
static_assert(
    kFlatUnroll >= 1 && kFlatUnroll <= 16 && kByteMaskUnroll <= 16,
    "TORCH_SPARSITY_CUDA_FLAT_UNROLL and _BYTE_MASK_UNROLL: 1 to 16");
static_assert(kMaxDims >= 1, "TORCH_SPARSITY_CUDA_STRIDED_MAX_DIMS: 1 or more");
static_assert(kFlatGridWaves >= 0, "TORCH_SPARSITY_CUDA_FLAT_GRID_WAVES: 0 (no cap) or more");
static_assert(
    kFlatMinBlocks >= 0 && kFlatMinBlocks * kFlatThreads <= kThreadsPerSM,
    "TORCH_SPARSITY_CUDA_FLAT_MIN_BLOCKS: 0 (none) to 2048 / FLAT_THREADS");
static_assert(
    kByteMaskVec == 0 || kByteMaskVec == 8 || kByteMaskVec == 16,
    "TORCH_SPARSITY_CUDA_BYTE_MASK_VEC: 0, 8 or 16");
// The flat kernel's last numel % kVec (< kVec <= 16) elements go to one
// thread each of the first block.
static_assert(kFlatThreads >= 16, "first block must cover the tail");

// No second argument unless asked for: the compiler then picks registers for
// the loads in flight, not for occupancy.
#if TORCH_SPARSITY_CUDA_FLAT_MIN_BLOCKS > 0
#define TORCH_SPARSITY_FLAT_LAUNCH_BOUNDS __launch_bounds__(kFlatThreads, kFlatMinBlocks)
#else
#define TORCH_SPARSITY_FLAT_LAUNCH_BOUNDS __launch_bounds__(kFlatThreads)
#endif

template <typename compute_t, typename out_t, typename x_t, typename mask_t>
C10_HOST_DEVICE inline out_t masked_value(mask_t m, x_t v) {
  return static_cast<out_t>(static_cast<compute_t>(m) * static_cast<compute_t>(v));
}

// kVec elements of T, loaded or stored as one access of sizeof(T) * kVec
// bytes when that is at most 16 (a power of two, so a single vector
// instruction), else as 16-byte pieces.
template <typename T, int kVec>
struct alignas(std::min<size_t>(sizeof(T) * kVec, kMaxLoadBytes)) Pack {
  T v[kVec];
};

template <typename out_t, typename x_t, typename mask_t>
constexpr int widest_size() {
  return static_cast<int>(std::max({sizeof(out_t), sizeof(x_t), sizeof(mask_t)}));
}

// Elements per pack: 16 bytes of the widest of the three types.
template <typename out_t, typename x_t, typename mask_t>
constexpr int vector_width() {
  return kMaxLoadBytes / widest_size<out_t, x_t, mask_t>();
}

// Elements per pack with a 1-byte mask under TORCH_SPARSITY_CUDA_BYTE_MASK_VEC
// (at most kMaxPackBytes of x and of out); 0 when that path is off or would be
// no wider than vector_width.
template <typename out_t, typename x_t, typename mask_t>
constexpr int byte_mask_width() {
  if (kByteMaskVec == 0 || sizeof(mask_t) != 1) {
    return 0;
  }
  const int width = std::min(
      kByteMaskVec,
      kMaxPackBytes / static_cast<int>(std::max(sizeof(out_t), sizeof(x_t))));
  return width > vector_width<out_t, x_t, mask_t>() ? width : 0;
}

// One chunk of the flat kernel: kUnroll packs per thread, consecutive
// threads on consecutive packs (coalesced), every load issued before the
// first store. out may be x (in place): each element is read and then written
// by the same thread, so that is safe. kChecked drops packs at or past
// num_packs; chunks that lie wholly inside skip the checks, which also lets
// the compiler keep all loads in flight together.
template <bool kChecked, int kVec, int kUnroll, typename out_t, typename x_t, typename mask_t>
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
template <int kVec, int kUnroll, typename out_t, typename x_t, typename mask_t>
__global__ void TORCH_SPARSITY_FLAT_LAUNCH_BOUNDS apply_mask_flat_kernel(
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
      apply_mask_chunk<false, kVec, kUnroll>(
          out_packs, x_packs, mask_packs, first_pack, num_packs);
    } else {
      apply_mask_chunk<true, kVec, kUnroll>(
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
__global__ void __launch_bounds__(kStridedThreads) apply_mask_strided_kernel(
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

// One dimension of the three tensors: its size and element strides.
struct Dim {
  int64_t size;
  int64_t out_stride;
  int64_t x_stride;
  int64_t mask_stride;
};

// x's shape without size-1 dimensions, each dimension merged into the one
// outside it when all three tensors step through them as one (fewer
// divisions per element). At least one dimension (a 0-d or all-ones shape
// gives one of size 1).
std::vector<Dim> merged_dims(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask) {
  std::vector<Dim> dims;
  for (int64_t d = 0; d < x.dim(); ++d) {
    const Dim next{x.size(d), out.stride(d), x.stride(d), mask.stride(d)};
    if (next.size == 1) {
      continue;
    }
    if (!dims.empty()) {
      Dim& outer = dims.back();
      if (outer.out_stride == next.out_stride * next.size &&
          outer.x_stride == next.x_stride * next.size &&
          outer.mask_stride == next.mask_stride * next.size) {
        outer.size *= next.size;
        outer.out_stride = next.out_stride;
        outer.x_stride = next.x_stride;
        outer.mask_stride = next.mask_stride;
        continue;
      }
    }
    dims.push_back(next);
  }
  if (dims.empty()) {
    dims.push_back(Dim{1, 0, 0, 0});
  }
  return dims;
}


// Blocks for a grid-stride kernel: blocks_needed, capped at `waves` times
// what sm_count SMs keep resident at once (no cap when waves is 0), and at
// least 1.
inline unsigned int grid_blocks(
    int64_t blocks_needed,
    int threads_per_block,
    int waves,
    int sm_count) {
  int64_t max_blocks = std::numeric_limits<int32_t>::max(); // gridDim.x limit
  if (waves > 0) {
    max_blocks = static_cast<int64_t>(std::max(sm_count, 1)) *
        (kThreadsPerSM / threads_per_block) * waves;
  }
  return static_cast<unsigned int>(
      std::clamp<int64_t>(blocks_needed, 1, max_blocks));
}

template <typename T>
bool is_aligned(const T* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// True when the three pointers can be read and written as packs of kVec.
template <int kVec, typename out_t, typename x_t, typename mask_t>
bool pack_aligned(const out_t* out, const x_t* x, const mask_t* mask) {
  return is_aligned(out, alignof(Pack<out_t, kVec>)) &&
      is_aligned(x, alignof(Pack<x_t, kVec>)) &&
      is_aligned(mask, alignof(Pack<mask_t, kVec>));
}

// The launch helpers below take a Launcher, which runs a kernel:
//   int sm_count();  the device's SMs, for the grid cap
//   void launch(kernel, blocks, threads, args...);
// CudaLauncher (fake_sparsity_kernel.cu) launches on the GPU's current
// stream and checks the launch; the emulation test loops on the CPU.

template <int kVec, int kUnroll, typename out_t, typename x_t, typename mask_t, typename Launcher>
void launch_flat(
    Launcher& launcher,
    out_t* out,
    const x_t* x,
    const mask_t* mask,
    int64_t numel) {
  constexpr int64_t kBlockPacks = static_cast<int64_t>(kFlatThreads) * kUnroll;
  const int64_t blocks = (numel / kVec + kBlockPacks - 1) / kBlockPacks;
  launcher.launch(
      apply_mask_flat_kernel<kVec, kUnroll, out_t, x_t, mask_t>,
      grid_blocks(blocks, kFlatThreads, kFlatGridWaves, launcher.sm_count()),
      kFlatThreads,
      out,
      x,
      mask,
      numel);
}

// The widest pack all three pointers are aligned for: the byte-mask pack
// (when enabled), the 16-byte pack, one element.
template <typename out_t, typename x_t, typename mask_t, typename Launcher>
void launch_apply_mask_flat(
    Launcher& launcher,
    out_t* out,
    const x_t* x,
    const mask_t* mask,
    int64_t numel) {
  constexpr int kWide = byte_mask_width<out_t, x_t, mask_t>();
  if constexpr (kWide > 0) {
    if (pack_aligned<kWide>(out, x, mask)) {
      launch_flat<kWide, kByteMaskUnroll>(launcher, out, x, mask, numel);
      return;
    }
  }
  constexpr int kVec = vector_width<out_t, x_t, mask_t>();
  if (pack_aligned<kVec>(out, x, mask)) {
    launch_flat<kVec, kFlatUnroll>(launcher, out, x, mask, numel);
  } else {
    launch_flat<1, kFlatUnroll>(launcher, out, x, mask, numel);
  }
}

template <typename out_t, typename x_t, typename mask_t, typename Launcher>
void launch_strided(
    Launcher& launcher,
    out_t* out,
    const x_t* x,
    const mask_t* mask,
    const StridedLayout& layout) {
  int64_t numel = 1;
  for (int d = 0; d < layout.ndim; ++d) {
    numel *= layout.sizes[d];
  }
  const int64_t blocks = (numel + kStridedThreads - 1) / kStridedThreads;
  launcher.launch(
      apply_mask_strided_kernel<out_t, x_t, mask_t>,
      grid_blocks(blocks, kStridedThreads, 1, launcher.sm_count()),
      kStridedThreads,
      out,
      x,
      mask,
      numel,
      layout);
}

// The strided kernel over dims. More than kMaxDims of them: the kernel takes
// the kMaxDims largest, and the host loops over every index of the others
// (one launch each, pointers moved to that sub-tensor).
template <typename out_t, typename x_t, typename mask_t, typename Launcher>
void launch_apply_mask_strided(
    Launcher& launcher,
    out_t* out,
    const x_t* x,
    const mask_t* mask,
    const std::vector<Dim>& dims) {
  const int ndim = static_cast<int>(dims.size());
  std::vector<bool> on_host(ndim, false);
  if (ndim > kMaxDims) {
    std::vector<int> by_size(ndim);
    std::iota(by_size.begin(), by_size.end(), 0);
    std::stable_sort(by_size.begin(), by_size.end(), [&](int a, int b) {
      return dims[a].size < dims[b].size;
    });
    for (int k = 0; k < ndim - kMaxDims; ++k) {
      on_host[by_size[k]] = true;
    }
  }
  StridedLayout layout;
  layout.ndim = 0;
  std::vector<int> host_dims;
  for (int d = 0; d < ndim; ++d) {
    if (on_host[d]) {
      host_dims.push_back(d);
      continue;
    }
    layout.sizes[layout.ndim] = dims[d].size;
    layout.out_strides[layout.ndim] = dims[d].out_stride;
    layout.x_strides[layout.ndim] = dims[d].x_stride;
    layout.mask_strides[layout.ndim] = dims[d].mask_stride;
    ++layout.ndim;
  }
  // Odometer over the host dimensions (none: one launch).
  std::vector<int64_t> index(host_dims.size(), 0);
  while (true) {
    int64_t out_offset = 0, x_offset = 0, mask_offset = 0;
    for (size_t k = 0; k < host_dims.size(); ++k) {
      const Dim& dim = dims[host_dims[k]];
      out_offset += index[k] * dim.out_stride;
      x_offset += index[k] * dim.x_stride;
      mask_offset += index[k] * dim.mask_stride;
    }
    launch_strided(
        launcher, out + out_offset, x + x_offset, mask + mask_offset, layout);
    int k = static_cast<int>(host_dims.size()) - 1;
    while (k >= 0 && ++index[k] == dims[host_dims[k]].size) {
      index[k] = 0;
      --k;
    }
    if (k < 0) {
      return;
    }
  }
}

template <typename out_t, typename x_t, typename mask_t, typename Launcher>
void launch_apply_mask(
    Launcher& launcher,
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask) {
  out_t* out_ptr = out.data_ptr<out_t>();
  const x_t* x_ptr = x.const_data_ptr<x_t>();
  const mask_t* mask_ptr = mask.const_data_ptr<mask_t>();
  if (detail::share_dense_layout(x, mask, out)) {
    launch_apply_mask_flat(launcher, out_ptr, x_ptr, mask_ptr, x.numel());
  } else {
    launch_apply_mask_strided(
        launcher, out_ptr, x_ptr, mask_ptr, merged_dims(out, x, mask));
  }
}

// out = mask * x, out already allocated with the result (or x's) dtype; out
// may be x (in place). The inputs are checked by the caller.
template <typename Launcher>
void apply_mask(
    Launcher& launcher,
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
            launcher, out, x, mask);
      });
}

} // namespace
} // namespace ops
} // namespace sparsity
