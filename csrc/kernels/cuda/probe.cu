#include <cuda_runtime.h>

#include "probe.cuh"

namespace gptkernels {

__global__ void probe_kernel(int* out) {
  if (out) *out = 1;
}

int cuda_probe_device(int device, const char** message) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess) err = cudaSetDevice(device);
  cudaFuncAttributes attr;
  // cudaFuncGetAttributes fails with cudaErrorNoKernelImageForDevice when no SASS or PTX in this binary fits
  // the device, which is exactly the question "can the cuda backend run here".
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, probe_kernel);
  cudaSetDevice(previous);
  if (message) *message = cudaGetErrorString(err);
  return int(err);
}

int cuda_compiled_runtime_version() { return CUDART_VERSION; }

}  // namespace gptkernels
