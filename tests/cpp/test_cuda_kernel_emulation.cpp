// The CUDA kernels of fake_sparsity (ops/cuda/fake_sparsity_kernel.cuh),
// compiled for the CPU and run by an emulating launcher that calls the kernel
// once per block and thread, in order. The kernels share nothing between
// threads and each thread reads an element before it writes it, so running
// the threads one after another gives the GPU's result; what this checks is
// the index arithmetic: which elements each thread takes (packs, the tail,
// grid-stride sweeps, the strided offsets, the host loop past kMaxDims), that
// every element gets mask * x's bits (in place, with masks of 2, 0.5 and the
// like, an element masked twice would show), that nothing outside the output
// is written or, under AddressSanitizer, read past the inputs, and which
// kernel the pointers' alignment selects.
// CMake builds this file once per set of launch settings (the
// TORCH_SPARSITY_CUDA_* definitions), including those scripts/gpu/gpu-tune.sh
// times on a GPU. The real kernels on a GPU: tests/python/test_cuda.py.

#define TORCH_SPARSITY_CUDA_EMULATION
#include "ops/cuda/fake_sparsity_kernel.cuh"

#include "test_helpers.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// Under AddressSanitizer (CMake adds it where the compiler has it): leaks are
// not what these tests look for, and torch keeps some allocations for the
// life of the process.
#if defined(__SANITIZE_ADDRESS__)
extern "C" const char* __asan_default_options() {
  return "detect_leaks=0";
}
#endif

namespace {

using sparsity::ops::apply_mask;
using sparsity_test::same_bits;

// The tests make many small tensors: ATen's thread pool would spend more time
// waking its threads than working.
class OneAtenThread : public ::testing::Environment {
 public:
  void SetUp() override {
    at::set_num_threads(1);
  }
};
::testing::Environment* const kOneAtenThread =
    ::testing::AddGlobalTestEnvironment(new OneAtenThread);

// Runs each launch's blocks and threads in a loop; records the launches.
class EmulatedLauncher {
 public:
  struct Launch {
    const void* kernel;
    unsigned int blocks;
    int threads;
  };

  // Few SMs, so that a capped grid sweeps the larger tensors several times.
  int sm_count() const {
    return 2;
  }

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), unsigned int blocks, int threads, Args... args) {
    launches.push_back({reinterpret_cast<const void*>(kernel), blocks, threads});
    sparsity::ops::gridDim.x = blocks;
    sparsity::ops::blockDim.x = static_cast<unsigned int>(threads);
    for (unsigned int b = 0; b < blocks; ++b) {
      sparsity::ops::blockIdx.x = b;
      for (int t = 0; t < threads; ++t) {
        sparsity::ops::threadIdx.x = static_cast<unsigned int>(t);
        kernel(args...);
      }
    }
  }

  std::vector<Launch> launches;
};

const std::vector<at::ScalarType> kXDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
const std::vector<at::ScalarType> kMaskDtypes = {
    at::kBool, at::kByte, at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

std::string dtypes_name(at::ScalarType x, at::ScalarType mask) {
  return std::string("x ") + c10::toString(x) + ", mask " + c10::toString(mask);
}

// Random values with NaN, +-Inf and signed zeros sprinkled in.
at::Tensor make_x(int64_t numel, at::ScalarType dtype) {
  at::Tensor x = at::randn({numel}, at::kDouble) * 4;
  if (numel > 0) {
    const at::Tensor specials = at::tensor(
        {std::nan(""), INFINITY, -INFINITY, -0.0, 0.0, -1.5}, at::kDouble);
    const at::Tensor picks = at::randint(numel, {std::max<int64_t>(1, numel / 5)}, at::kLong);
    x.index_put_({picks}, specials.index({at::randint(6, {picks.numel()}, at::kLong)}));
  }
  return x.to(dtype);
}

// 0/1 with other values among them (2 and 255 for uint8; 0.5, -2, -0, NaN,
// Inf for floating masks): an element masked twice by mistake, in place,
// would show.
at::Tensor make_mask(int64_t numel, at::ScalarType dtype) {
  const at::Tensor keep = at::rand({numel}) > 0.5;
  if (dtype == at::kBool) {
    return keep;
  }
  at::Tensor mask = keep.to(at::kDouble);
  if (numel > 0) {
    const at::Tensor values = dtype == at::kByte
        ? at::tensor({2.0, 255.0}, at::kDouble)
        : at::tensor({0.5, -2.0, -0.0, std::nan(""), INFINITY}, at::kDouble);
    const at::Tensor picks = at::randint(numel, {std::max<int64_t>(1, numel / 4)}, at::kLong);
    mask.index_put_({picks}, values.index({at::randint(values.numel(), {picks.numel()}, at::kLong)}));
  }
  return mask.to(dtype);
}

// A tensor of the given geometry over a buffer of its own that has
// spare_before elements before it (so an offset view starts mid-vector and
// writes there can be seen) and spare_after after it, holding `values` (any
// shape with the same number of elements) in its elements and a fixed
// pattern elsewhere. Inputs end where their allocation ends (spare_after 0),
// so that under AddressSanitizer a read past them stops the test.
at::Tensor place(
    const at::Tensor& values,
    at::IntArrayRef sizes,
    at::IntArrayRef strides,
    int64_t spare_before,
    int64_t spare_after) {
  int64_t span = 1;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == 0) {
      span = 0;
      break;
    }
    span += (sizes[d] - 1) * strides[d];
  }
  at::Tensor buffer =
      at::full({spare_before + span + spare_after}, 7.0, at::kDouble).to(values.scalar_type());
  at::Tensor view = buffer.as_strided(sizes, strides, spare_before);
  view.copy_(values.reshape(sizes));
  return view;
}

at::Tensor place_contiguous(
    const at::Tensor& values,
    at::IntArrayRef sizes,
    int64_t spare_before,
    int64_t spare_after) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  return place(values, sizes, strides, spare_before, spare_after);
}

// The whole storage of t, as one flat tensor of t's dtype.
at::Tensor storage_of(const at::Tensor& t) {
  const int64_t numel = static_cast<int64_t>(t.storage().nbytes()) / t.element_size();
  return at::empty({0}, t.options()).set_(t.storage(), 0, {numel}, {1});
}

// Elements of t's storage that t does not cover: false where t has an element.
at::Tensor outside_of(const at::Tensor& t) {
  at::Tensor outside = at::ones({storage_of(t).numel()}, at::kBool);
  outside.as_strided(t.sizes(), t.strides(), t.storage_offset()).fill_(false);
  return outside;
}

// Integers with the bits of a floating tensor, so NaNs compare too.
at::Tensor as_bits(const at::Tensor& t) {
  switch (t.element_size()) {
    case 8:
      return t.view(at::kLong);
    case 4:
      return t.view(at::kInt);
    case 2:
      return t.view(at::kShort);
    default:
      return t.view(at::kByte);
  }
}

// Runs the emulated kernels on (out, x, mask) and checks out against mask * x
// (computed first, as out may be x) and that no other element of out's
// storage changed. Returns the launches.
std::vector<EmulatedLauncher::Launch> check_apply_mask(
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& mask,
    const std::string& what) {
  // In place (out is x) rounds mask * x to x's dtype, as x.mul_(mask).
  const at::Tensor expected = (mask * x).to(out.scalar_type());
  const at::Tensor before = as_bits(storage_of(out)).clone();
  const at::Tensor outside = outside_of(out);
  EmulatedLauncher launcher;
  apply_mask(launcher, "fake_sparsity", out, x, mask);
  EXPECT_TRUE(same_bits(out, expected)) << what;
  const at::Tensor after = as_bits(storage_of(out));
  EXPECT_TRUE(at::equal(after.masked_select(outside), before.masked_select(outside)))
      << what << ": an element outside the output was written";
  return launcher.launches;
}

// Lengths that cover: a single element, tails shorter than any pack, one
// pack, and, for each unroll of the flat kernel, a last chunk one pack short
// (the checked path at its fullest), a half-full last chunk and, where the
// grid is capped, a tensor past one sweep of the grid (with 2 SMs) whose last
// chunk is one pack short again. A chunk of 16-element packs spans
// threads * unroll * 16 elements, and one of narrower packs divides it, so
// these hold for every pack width.
std::vector<int64_t> flat_sizes() {
  using namespace sparsity::ops;
  std::vector<int64_t> sizes = {1, 3, 16, 17, 255, 1031};
  for (const int unroll : {kFlatUnroll, kByteMaskUnroll}) {
    const int64_t chunk = int64_t{kFlatThreads} * unroll * 16;
    sizes.push_back(chunk - 1);
    sizes.push_back(2 * chunk + chunk / 2 + 3);
    if (kFlatGridWaves > 0) {
      const int64_t sweep =
          grid_blocks(std::numeric_limits<int64_t>::max(), kFlatThreads, kFlatGridWaves, 2) * chunk;
      sizes.push_back(sweep + chunk - 1);
    }
  }
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  return sizes;
}

// The largest lengths run only with all pointers aligned and with x one
// element off (enough for the sweeps; every offset runs on the others).
constexpr int64_t kEveryOffsetUpTo = 70000;

TEST(CudaKernelEmulation, DenseMatchesMaskTimesXAtEveryOffset) {
  at::manual_seed(1);
  for (const at::ScalarType x_dtype : kXDtypes) {
    for (const at::ScalarType mask_dtype : kMaskDtypes) {
      const at::ScalarType out_dtype = c10::promoteTypes(x_dtype, mask_dtype);
      for (const int64_t numel : flat_sizes()) {
        const at::Tensor x_values = make_x(numel, x_dtype);
        const at::Tensor mask_values = make_mask(numel, mask_dtype);
        // Offsets in elements: all aligned, then each pointer alone off its
        // pack by one element, then the mask 4 bytes in (a 4-byte-aligned
        // 1-byte mask: the 16-byte pack of float32 but not a wider one).
        for (const auto& [x_off, mask_off, out_off] : std::vector<std::tuple<int, int, int>>{
                 {0, 0, 0}, {1, 0, 0}, {0, 1, 0}, {0, 0, 1}, {3, 3, 3}, {0, 4, 0}}) {
          if (numel > kEveryOffsetUpTo && x_off + mask_off + out_off > 1) {
            continue;
          }
          const std::string what = dtypes_name(x_dtype, mask_dtype) + ", " +
              std::to_string(numel) + " elements, offsets " + std::to_string(x_off) + "/" +
              std::to_string(mask_off) + "/" + std::to_string(out_off);
          const at::Tensor x = place_contiguous(x_values, {numel}, 16 + x_off, 0);
          const at::Tensor mask = place_contiguous(mask_values, {numel}, 16 + mask_off, 0);
          const at::Tensor out = place_contiguous(at::zeros({numel}, out_dtype), {numel}, 16 + out_off, 16);
          check_apply_mask(out, x, mask, what);
        }
      }
    }
  }
}

TEST(CudaKernelEmulation, InPlaceMatchesMulAtEveryOffset) {
  at::manual_seed(2);
  for (const at::ScalarType x_dtype : kXDtypes) {
    for (const at::ScalarType mask_dtype : kMaskDtypes) {
      for (const int64_t numel : flat_sizes()) {
        for (const auto& [x_off, mask_off] :
             std::vector<std::pair<int, int>>{{0, 0}, {1, 0}, {0, 1}, {5, 5}}) {
          if (numel > kEveryOffsetUpTo && x_off + mask_off > 1) {
            continue;
          }
          const std::string what = "in place, " + dtypes_name(x_dtype, mask_dtype) + ", " +
              std::to_string(numel) + " elements, offsets " + std::to_string(x_off) + "/" +
              std::to_string(mask_off);
          const at::Tensor x = place_contiguous(make_x(numel, x_dtype), {numel}, 16 + x_off, 16);
          const at::Tensor mask = place_contiguous(make_mask(numel, mask_dtype), {numel}, 16 + mask_off, 0);
          // In place keeps x's dtype: mask * x rounded to it, as x.mul_(mask).
          const at::Tensor expected = (mask * x).to(x_dtype);
          const at::Tensor outside = outside_of(x);
          const at::Tensor before = as_bits(storage_of(x)).clone();
          EmulatedLauncher launcher;
          apply_mask(launcher, "fake_sparsity_", x, x, mask);
          EXPECT_TRUE(same_bits(x, expected)) << what;
          EXPECT_TRUE(at::equal(
              as_bits(storage_of(x)).masked_select(outside), before.masked_select(outside)))
              << what << ": an element outside x was written";
        }
      }
    }
  }
}

// Layouts that are not one flat array: the strided kernel (and one shared
// dense permutation, which the flat kernel takes).
TEST(CudaKernelEmulation, StridedLayoutsMatchMaskTimesX) {
  at::manual_seed(3);
  struct Layout {
    std::string name;
    std::vector<int64_t> sizes;
    std::vector<int64_t> x_strides, mask_strides, out_strides;
  };
  const std::vector<Layout> layouts = {
      {"x transposed", {37, 29}, {1, 37}, {29, 1}, {29, 1}},
      {"every second element of x", {5, 7, 33}, {2 * 231, 2 * 33, 2}, {231, 33, 1}, {231, 33, 1}},
      {"mask expanded along a dimension", {6, 130}, {130, 1}, {0, 1}, {130, 1}},
      // fake_structured_sparsity's row mask: expanded past dim 0.
      {"row mask", {6, 130}, {130, 1}, {1, 0}, {130, 1}},
      {"row mask of a 3-d x", {4, 5, 33}, {165, 33, 1}, {1, 0, 0}, {165, 33, 1}},
      {"row mask, x transposed", {9, 40}, {1, 9}, {1, 0}, {40, 1}},
      {"out transposed", {3, 4, 50}, {200, 50, 1}, {200, 50, 1}, {1, 3, 12}},
      {"all three channels-last (dense, flat kernel)", {2, 3, 5, 7}, {105, 1, 21, 3}, {105, 1, 21, 3}, {105, 1, 21, 3}},
      {"size-1 and mergeable dimensions", {1, 4, 1, 6, 10}, {480, 120, 120, 20, 2}, {240, 60, 60, 10, 1}, {240, 60, 60, 10, 1}},
      {"one element", {1, 1}, {7, 3}, {1, 1}, {1, 1}},
  };
  for (const Layout& layout : layouts) {
    int64_t numel = 1;
    for (const int64_t size : layout.sizes) {
      numel *= size;
    }
    for (const at::ScalarType x_dtype : {at::kFloat, at::kHalf}) {
      for (const at::ScalarType mask_dtype : {at::kBool, at::kFloat, at::kDouble}) {
        const std::string what = layout.name + ", " + dtypes_name(x_dtype, mask_dtype);
        const at::Tensor x = place(make_x(numel, x_dtype), layout.sizes, layout.x_strides, 3, 0);
        // An expanded mask (stride 0) holds values for its distinct elements.
        std::vector<int64_t> distinct_sizes = layout.sizes;
        int64_t distinct = 1;
        for (size_t d = 0; d < distinct_sizes.size(); ++d) {
          if (layout.mask_strides[d] == 0) {
            distinct_sizes[d] = 1;
          }
          distinct *= distinct_sizes[d];
        }
        const at::Tensor mask =
            place(make_mask(distinct, mask_dtype), distinct_sizes, layout.mask_strides, 3, 0)
                .expand(layout.sizes);
        const at::Tensor out = place(
            at::zeros({numel}, c10::promoteTypes(x_dtype, mask_dtype)), layout.sizes, layout.out_strides, 3, 3);
        check_apply_mask(out, x, mask, what);
        // In place, into a copy of x with x's layout.
        const at::Tensor x_copy = place(x.clone(), layout.sizes, layout.x_strides, 3, 3);
        check_apply_mask(x_copy, x_copy, mask, "in place, " + what);
      }
    }
  }
}

TEST(CudaKernelEmulation, EmptyTensorsLaunchNothing) {
  for (const std::vector<int64_t>& sizes : {std::vector<int64_t>{0}, std::vector<int64_t>{3, 0, 2}}) {
    const at::Tensor x = at::empty(sizes, at::kFloat);
    const at::Tensor mask = at::empty(sizes, at::kBool);
    EmulatedLauncher launcher;
    apply_mask(launcher, "fake_sparsity", x.clone(), x, mask);
    apply_mask(launcher, "fake_sparsity_", x, x, mask);
    EXPECT_TRUE(launcher.launches.empty());
  }
}

TEST(CudaKernelEmulation, ZeroDimTensor) {
  const at::Tensor x = at::scalar_tensor(-2.5, at::kFloat);
  const at::Tensor mask = at::scalar_tensor(3.0, at::kHalf);
  const at::Tensor out = at::empty({}, at::kFloat);
  const auto launches = check_apply_mask(out, x, mask, "0-d");
  ASSERT_EQ(launches.size(), 1u);
  EXPECT_EQ(launches[0].blocks, 1u);
}

// The kernel the pointers' alignment selects: the widest pack all three are
// aligned for.
TEST(CudaKernelEmulation, AlignmentPicksTheWidestPack) {
  using namespace sparsity::ops;
  const int64_t numel = 4096;
  const auto kernel_for = [&](const at::Tensor& x, const at::Tensor& mask) {
    const at::Tensor out = at::empty({numel}, c10::promoteTypes(x.scalar_type(), mask.scalar_type()));
    return check_apply_mask(out, x, mask, "alignment").at(0).kernel;
  };
  const auto kernel_id = [](auto kernel) { return reinterpret_cast<const void*>(kernel); };
  const at::Tensor x = place_contiguous(make_x(numel, at::kFloat), {numel}, 0, 0);
  const at::Tensor x_off = place_contiguous(make_x(numel, at::kFloat), {numel}, 1, 0);
  const at::Tensor float_mask = place_contiguous(make_mask(numel, at::kFloat), {numel}, 0, 0);
  EXPECT_EQ(kernel_for(x, float_mask), kernel_id(apply_mask_flat_kernel<4, kFlatUnroll, float, float, float>));
  EXPECT_EQ(kernel_for(x_off, float_mask), kernel_id(apply_mask_flat_kernel<1, kFlatUnroll, float, float, float>));

  const at::Tensor bool_values = make_mask(numel, at::kBool);
  const at::Tensor bool_mask = place_contiguous(bool_values, {numel}, 0, 0);
  const at::Tensor bool_mask_4 = place_contiguous(bool_values, {numel}, 4, 0);
  const at::Tensor bool_mask_1 = place_contiguous(bool_values, {numel}, 1, 0);
  constexpr int kWide = byte_mask_width<float, float, bool>();
  if constexpr (kWide > 0) {
    EXPECT_EQ(kernel_for(x, bool_mask), kernel_id(apply_mask_flat_kernel<kWide, kByteMaskUnroll, float, float, bool>));
  } else {
    EXPECT_EQ(kernel_for(x, bool_mask), kernel_id(apply_mask_flat_kernel<4, kFlatUnroll, float, float, bool>));
  }
  // 4 bytes in: the 16-byte pack of float32 (4 mask bytes), not a wider one.
  EXPECT_EQ(kernel_for(x, bool_mask_4), kernel_id(apply_mask_flat_kernel<4, kFlatUnroll, float, float, bool>));
  EXPECT_EQ(kernel_for(x, bool_mask_1), kernel_id(apply_mask_flat_kernel<1, kFlatUnroll, float, float, bool>));
}

TEST(CudaKernelEmulation, GridBlocks) {
  using sparsity::ops::grid_blocks;
  EXPECT_EQ(grid_blocks(0, 256, 1, 132), 1u);
  EXPECT_EQ(grid_blocks(100, 256, 1, 132), 100u);
  EXPECT_EQ(grid_blocks(1 << 20, 256, 1, 132), 132u * 8);
  EXPECT_EQ(grid_blocks(1 << 20, 128, 2, 132), 132u * 16 * 2);
  EXPECT_EQ(grid_blocks(int64_t{1} << 40, 256, 0, 132), 2147483647u);
  EXPECT_EQ(grid_blocks(1 << 20, 256, 0, 132), 1u << 20);
}

TEST(CudaKernelEmulation, MergedDims) {
  using sparsity::ops::merged_dims;
  const at::Tensor contiguous = at::empty({2, 3, 4}, at::kFloat);
  auto dims = merged_dims(contiguous, contiguous, contiguous);
  ASSERT_EQ(dims.size(), 1u);
  EXPECT_EQ(dims[0].size, 24);
  EXPECT_EQ(dims[0].x_stride, 1);

  const at::Tensor transposed = at::empty({4, 3}, at::kFloat).t();
  dims = merged_dims(contiguous.new_empty({3, 4}), transposed, contiguous.new_empty({3, 4}));
  ASSERT_EQ(dims.size(), 2u);
  EXPECT_EQ(dims[0].x_stride, 1);
  EXPECT_EQ(dims[1].x_stride, 3);

  const at::Tensor scalar = at::empty({}, at::kFloat);
  dims = merged_dims(scalar, scalar, scalar);
  ASSERT_EQ(dims.size(), 1u);
  EXPECT_EQ(dims[0].size, 1);
}

#if TORCH_SPARSITY_CUDA_STRIDED_MAX_DIMS <= 8
// Past kMaxDims dimensions that cannot merge, the host loops over the
// smallest ones: one launch per index of those. Built with a low
// TORCH_SPARSITY_CUDA_STRIDED_MAX_DIMS, so that a few small dimensions do it
// (at the real 25, 2^26 elements would: tests/python/test_cuda.py has that).
TEST(CudaKernelEmulation, MoreDimensionsThanTheKernelTakes) {
  using sparsity::ops::kMaxDims;
  at::manual_seed(4);
  // Sizes mixed so that the host dimensions are not the outer ones, and
  // x's strides reversed so that no neighbours merge.
  for (const int extra : {1, 2, 3}) {
    std::vector<int64_t> sizes;
    for (int d = 0; d < kMaxDims + extra; ++d) {
      sizes.push_back(2 + (d * 5) % 3); // 2, 4, 3, 2, 4, 3, ...
    }
    std::vector<int64_t> reversed_strides(sizes.size());
    int64_t stride = 1;
    int64_t numel = 1;
    for (size_t d = 0; d < sizes.size(); ++d) {
      reversed_strides[d] = stride;
      stride *= sizes[d];
      numel *= sizes[d];
    }
    const at::Tensor x = place(make_x(numel, at::kFloat), sizes, reversed_strides, 2, 0);
    const at::Tensor mask = place_contiguous(make_mask(numel, at::kHalf), sizes, 2, 0);
    const at::Tensor out = place_contiguous(at::zeros({numel}, at::kFloat), sizes, 2, 2);
    const std::string what = std::to_string(sizes.size()) + " dimensions";
    const auto launches = check_apply_mask(out, x, mask, what);
    // One launch per index of the `extra` smallest dimensions.
    std::vector<int64_t> by_size = sizes;
    std::sort(by_size.begin(), by_size.end());
    int64_t expected_launches = 1;
    for (int k = 0; k < extra; ++k) {
      expected_launches *= by_size[k];
    }
    EXPECT_EQ(static_cast<int64_t>(launches.size()), expected_launches) << what;
    const at::Tensor x_copy = place(x.clone(), sizes, reversed_strides, 2, 2);
    check_apply_mask(x_copy, x_copy, mask, "in place, " + what);
  }
}
#endif

} // namespace
