// The CUDA kernel of fake_sparsity (ops/cuda/fake_sparsity_kernel.cuh),
// compiled for the CPU and run by an emulating launcher that calls the kernel
// once per block and thread, in order. The kernel shares nothing between
// threads and each thread reads an element before it writes it, so running
// the threads one after another gives the GPU's result; what this checks is
// the index arithmetic: which elements each thread takes (packs, the tail,
// grid-stride sweeps), that every element gets mask * x's bits (in place,
// with uint8 masks of 2 and 255, an element masked twice would show), that
// nothing outside the output is written or, under AddressSanitizer, read past
// the inputs, which inputs the kernel takes, and which pack the pointers'
// alignment selects. The real kernel on a GPU: tests/python/test_cuda.py.

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

using sparsity::ops::kernel_covers;
using sparsity::ops::launch_apply_mask;
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
// The masks the kernel takes; aten's mul does the others.
const std::vector<at::ScalarType> kMaskDtypes = {at::kBool, at::kByte};

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

// 0/1, with 2 and 255 among them for uint8: an element masked twice by
// mistake, in place, would show.
at::Tensor make_mask(int64_t numel, at::ScalarType dtype) {
  const at::Tensor keep = at::rand({numel}) > 0.5;
  if (dtype == at::kBool) {
    return keep;
  }
  at::Tensor mask = keep.to(at::kDouble);
  if (numel > 0) {
    const at::Tensor values = at::tensor({2.0, 255.0}, at::kDouble);
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
  EXPECT_TRUE(kernel_covers(out, x, mask)) << what;
  EmulatedLauncher launcher;
  launch_apply_mask(launcher, "fake_sparsity", out, x, mask);
  EXPECT_TRUE(same_bits(out, expected)) << what;
  const at::Tensor after = as_bits(storage_of(out));
  EXPECT_TRUE(at::equal(after.masked_select(outside), before.masked_select(outside)))
      << what << ": an element outside the output was written";
  return launcher.launches;
}

// Lengths that cover: a single element, tails shorter than any pack, one
// pack, a last chunk one pack short (the checked path at its fullest), a
// half-full last chunk and a tensor past one sweep of the capped grid (with
// 2 SMs) whose last chunk is one pack short again. A chunk of 16-element packs spans
// threads * unroll * 16 elements, and one of narrower packs divides it, so
// these hold for every pack width.
std::vector<int64_t> flat_sizes() {
  using namespace sparsity::ops;
  std::vector<int64_t> sizes = {1, 3, 16, 17, 255, 1031};
  const int64_t chunk = int64_t{kThreads} * kUnroll * 16;
  sizes.push_back(chunk - 1);
  sizes.push_back(2 * chunk + chunk / 2 + 3);
  const int64_t sweep = grid_blocks(std::numeric_limits<int64_t>::max() / 2, 16, 2) * chunk;
  sizes.push_back(sweep + chunk - 1);
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
        // pack by one element, then all three off by the same amount.
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
          ASSERT_TRUE(kernel_covers(x, x, mask)) << what;
          EmulatedLauncher launcher;
          launch_apply_mask(launcher, "fake_sparsity_", x, x, mask);
          EXPECT_TRUE(same_bits(x, expected)) << what;
          EXPECT_TRUE(at::equal(
              as_bits(storage_of(x)).masked_select(outside), before.masked_select(outside)))
              << what << ": an element outside x was written";
        }
      }
    }
  }
}

// What the kernel takes: a bool or uint8 mask, one dense layout (any shared
// permutation, such as channels-last), at least one element. Everything else
// is left to aten's mul.
TEST(CudaKernelEmulation, KernelCoversDenseByteMasksOnly) {
  at::manual_seed(3);
  const at::Tensor x = make_x(210, at::kFloat).reshape({2, 3, 5, 7});
  const at::Tensor bool_mask = make_mask(210, at::kBool).reshape({2, 3, 5, 7});
  EXPECT_TRUE(kernel_covers(x.clone(), x, bool_mask));
  EXPECT_TRUE(kernel_covers(x, x, bool_mask.to(at::kByte)));
  for (const at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
    EXPECT_FALSE(kernel_covers(x.clone(), x, bool_mask.to(dtype))) << c10::toString(dtype);
  }
  // All three channels-last: one dense layout, so the kernel, with mask * x's bits.
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x_cl = x.contiguous(cl);
  const at::Tensor mask_cl = bool_mask.contiguous(cl);
  check_apply_mask(at::empty_like(x_cl), x_cl, mask_cl, "channels-last");
  // Layouts that differ, or that are not dense: aten's mul.
  EXPECT_FALSE(kernel_covers(x.clone(), x_cl, bool_mask));
  EXPECT_FALSE(kernel_covers(at::empty_like(x_cl), x, bool_mask));
  const at::Tensor x_t = make_x(12, at::kFloat).reshape({4, 3}).t();
  EXPECT_FALSE(kernel_covers(at::empty({3, 4}), x_t, make_mask(12, at::kBool).reshape({3, 4})));
  const at::Tensor every_second = make_x(20, at::kFloat).slice(0, 0, 20, 2);
  EXPECT_FALSE(kernel_covers(at::empty({10}), every_second, make_mask(10, at::kBool)));
  const at::Tensor row = make_mask(6, at::kBool).reshape({6, 1}).expand({6, 5});
  EXPECT_FALSE(kernel_covers(at::empty({6, 5}), make_x(30, at::kFloat).reshape({6, 5}), row));
  for (const std::vector<int64_t>& sizes : {std::vector<int64_t>{0}, std::vector<int64_t>{3, 0, 2}}) {
    const at::Tensor empty = at::empty(sizes, at::kFloat);
    EXPECT_FALSE(kernel_covers(empty.clone(), empty, at::empty(sizes, at::kBool)));
  }
}

TEST(CudaKernelEmulation, ZeroDimTensor) {
  const at::Tensor x = at::scalar_tensor(-2.5, at::kFloat);
  const at::Tensor mask = at::scalar_tensor(3, at::kByte);
  const at::Tensor out = at::empty({}, at::kFloat);
  const auto launches = check_apply_mask(out, x, mask, "0-d");
  ASSERT_EQ(launches.size(), 1u);
  EXPECT_EQ(launches[0].blocks, 1u);
}

// The kernel the pointers' alignment selects: packs of 16 bytes of the widest
// type when all three are aligned for them, one element otherwise.
TEST(CudaKernelEmulation, AlignmentPicksThePack) {
  using sparsity::ops::apply_mask_flat_kernel;
  const int64_t numel = 4096;
  const auto kernel_for = [&](const at::Tensor& x, const at::Tensor& mask) {
    const at::Tensor out = at::empty({numel}, c10::promoteTypes(x.scalar_type(), mask.scalar_type()));
    return check_apply_mask(out, x, mask, "alignment").at(0).kernel;
  };
  const auto kernel_id = [](auto kernel) { return reinterpret_cast<const void*>(kernel); };
  const at::Tensor x = place_contiguous(make_x(numel, at::kFloat), {numel}, 0, 0);
  const at::Tensor x_off = place_contiguous(make_x(numel, at::kFloat), {numel}, 1, 0);
  const at::Tensor bool_values = make_mask(numel, at::kBool);
  const at::Tensor bool_mask = place_contiguous(bool_values, {numel}, 0, 0);
  const at::Tensor bool_mask_4 = place_contiguous(bool_values, {numel}, 4, 0);
  const at::Tensor bool_mask_1 = place_contiguous(bool_values, {numel}, 1, 0);
  EXPECT_EQ(kernel_for(x, bool_mask), kernel_id(apply_mask_flat_kernel<4, float, float, bool>));
  // 4 bytes in: still aligned for 4 mask bytes.
  EXPECT_EQ(kernel_for(x, bool_mask_4), kernel_id(apply_mask_flat_kernel<4, float, float, bool>));
  EXPECT_EQ(kernel_for(x, bool_mask_1), kernel_id(apply_mask_flat_kernel<1, float, float, bool>));
  EXPECT_EQ(kernel_for(x_off, bool_mask), kernel_id(apply_mask_flat_kernel<1, float, float, bool>));
  const at::Tensor half_x = place_contiguous(make_x(numel, at::kHalf), {numel}, 0, 0);
  EXPECT_EQ(kernel_for(half_x, bool_mask), kernel_id(apply_mask_flat_kernel<8, c10::Half, c10::Half, bool>));
}

TEST(CudaKernelEmulation, GridBlocks) {
  using sparsity::ops::grid_blocks;
  // A chunk is 256 threads x 4 packs; the cap one wave of 2048 / 256 blocks per SM.
  EXPECT_EQ(grid_blocks(0, 4, 132), 1u);
  EXPECT_EQ(grid_blocks(1, 1, 132), 1u);
  EXPECT_EQ(grid_blocks(100 * 1024 * 4, 4, 132), 100u);
  EXPECT_EQ(grid_blocks(100 * 1024 * 4 + 1, 4, 132), 100u);
  EXPECT_EQ(grid_blocks(100 * 1024 * 4 + 4, 4, 132), 101u);
  EXPECT_EQ(grid_blocks(int64_t{1} << 40, 4, 132), 132u * 8);
  EXPECT_EQ(grid_blocks(int64_t{1} << 40, 1, 0), 8u);
}

} // namespace
