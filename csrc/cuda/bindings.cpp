// The CUDA kernels of csrc/cuda as operators in the aunn_fast namespace (prefix cuda_).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

namespace aunn_cuda {

cudaError_t launch_scale(const float* x, float* y, float alpha, int64_t n, cudaStream_t stream);

namespace {

at::Tensor cuda_scale(const at::Tensor& x, double alpha) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat, "aunn_fast cuda_scale: x must be a float32 CUDA tensor");
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const cudaError_t status = launch_scale(input.data_ptr<float>(), out.data_ptr<float>(), static_cast<float>(alpha),
                                          input.numel(), c10::cuda::getCurrentCUDAStream(input.device().index()));
  TORCH_CHECK(status == cudaSuccess, "aunn_fast cuda_scale: ", cudaGetErrorString(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(aunn_fast, m) { m.def("cuda_scale(Tensor x, float alpha) -> Tensor"); }

TORCH_LIBRARY_IMPL(aunn_fast, CUDA, m) { m.impl("cuda_scale", &cuda_scale); }

}  // namespace aunn_cuda
