// A trivial CUDA kernel that proves the extension's CUDA path (build, binding, compile_check --cuda):
// y[i] = alpha * x[i]. Kernels in csrc/cuda take plain pointers and sizes; bindings.cpp wraps them as operators.
#include <cstdint>

#include <cuda_runtime.h>

namespace aunn_cuda {

__global__ void scale_kernel(const float* __restrict__ x, float* __restrict__ y, float alpha, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = alpha * x[i];
}

// Launches scale_kernel on `stream`; returns the launch's error code.
cudaError_t launch_scale(const float* x, float* y, float alpha, int64_t n, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  if (blocks > 0) scale_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, y, alpha, n);
  return cudaGetLastError();
}

}  // namespace aunn_cuda
