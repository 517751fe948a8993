// CUDA kernels of fake_sparsity, fake_sparsity_ and fake_structured_sparsity:
// the hand-written kernel of fake_sparsity_kernel.cuh (shared with the CPU
// emulation test) where it beats aten's mul, aten's mul everywhere else.
// Here are the CUDA runtime calls and the registration.

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
  explicit CudaLauncher(c10::DeviceIndex device) : stream_(c10::cuda::getCurrentCUDAStream(device)) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device));
  }

  int sm_count() const {
    return sm_count_;
  }

  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), unsigned int blocks, int threads, Args... args) {
    kernel<<<blocks, threads, 0, stream_>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  cudaStream_t stream_;
  int sm_count_ = 0;
};

// out = mask * x; out may be x (in place). The inputs are checked already.
void apply_mask_cuda(const char* op_name, const at::Tensor& out, const at::Tensor& x, const at::Tensor& mask) {
  if (!kernel_covers(out, x, mask)) {
    detail::mul_into(out, x, mask);
    return;
  }
  CudaLauncher launcher(x.device().index());
  launch_apply_mask(launcher, op_name, out, x, mask);
}

at::Tensor fake_sparsity_cuda(const at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_sparsity_inputs("fake_sparsity", x, mask);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty_like(x, x.options().dtype(detail::fake_sparsity_result_type(x, mask)));
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

at::Tensor fake_structured_sparsity_cuda(const at::Tensor& x, const at::Tensor& mask) {
  detail::check_fake_structured_sparsity_inputs("fake_structured_sparsity", x, mask);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty_like(x, x.options().dtype(detail::fake_sparsity_result_type(x, mask)));
  detail::mul_into(out, x, detail::row_mask_view(mask, x));
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
