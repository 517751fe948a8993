// CUDA kernels of fake_sparsity, fake_sparsity_ and fake_structured_sparsity: the kernels and the
// choice of kernel are in fake_sparsity_kernel.cuh (shared with the CPU
// emulation test); here are the CUDA runtime calls and the registration.

#include "ops/cuda/fake_sparsity_kernel.cuh"
#include "ops/registration.h"

#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

namespace sparsity {
namespace ops {
namespace {

// Launches on PyTorch's current stream of one device and checks every launch.
class CudaLauncher {
 public:
  explicit CudaLauncher(c10::DeviceIndex device)
      : device_(device), stream_(c10::cuda::getCurrentCUDAStream(device)) {}

  // Asked once, and only when a grid is capped.
  int sm_count() {
    if (sm_count_ == 0) {
      C10_CUDA_CHECK(cudaDeviceGetAttribute(
          &sm_count_, cudaDevAttrMultiProcessorCount, device_));
    }
    return sm_count_;
  }

  template <typename... Params, typename... Args>
  void launch(
      void (*kernel)(Params...),
      unsigned int blocks,
      int threads,
      Args... args) {
    kernel<<<blocks, threads, 0, stream_>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::DeviceIndex device_;
  cudaStream_t stream_;
  int sm_count_ = 0;
};

at::Tensor fake_sparsity_cuda(const at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_sparsity_inputs("fake_sparsity", x, mask);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty_like(
      x, x.options().dtype(detail::fake_sparsity_result_type(x, mask)));
  CudaLauncher launcher(x.device().index());
  apply_mask(launcher, "fake_sparsity", out, x, mask);
  return out;
}

at::Tensor& fake_sparsity__cuda(at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_sparsity_inputs("fake_sparsity_", x, mask);
  detail::check_inplace_overlap("fake_sparsity_", x, mask);
  const c10::cuda::CUDAGuard device_guard(x.device());
  CudaLauncher launcher(x.device().index());
  apply_mask(launcher, "fake_sparsity_", x, x, mask);
  return x;
}

// The row mask expanded to x's shape (stride 0 past dim 0) through the
// kernels of fake_sparsity, whose index arithmetic takes any strides.
at::Tensor fake_structured_sparsity_cuda(const at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_structured_sparsity_inputs("fake_structured_sparsity", x, mask);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty_like(
      x, x.options().dtype(detail::fake_sparsity_result_type(x, mask)));
  CudaLauncher launcher(x.device().index());
  apply_mask(launcher, "fake_structured_sparsity", out, x, detail::expand_row_mask(mask, x));
  return out;
}

} // namespace

SPARSITY_LIBRARY_IMPL(CUDA, m) {
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity"),
      TORCH_FN(fake_sparsity_cuda));
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_sparsity_"),
      TORCH_FN(fake_sparsity__cuda));
  m.impl(
      TORCH_SELECTIVE_NAME("sparsity::fake_structured_sparsity"),
      TORCH_FN(fake_structured_sparsity_cuda));
}

} // namespace ops
} // namespace sparsity
