// Asks the CUDA runtime whether this build carries a kernel image that can run on a given device.
#pragma once

namespace gptkernels {

// 0 when a trivial kernel of this build loads on `device`; otherwise the cudaError_t code (e.g. 209,
// cudaErrorNoKernelImageForDevice, when the GPU's arch was not compiled in). *message gets the error string.
int cuda_probe_device(int device, const char** message);

// CUDART_VERSION this file was compiled against (e.g. 13000).
int cuda_compiled_runtime_version();

}  // namespace gptkernels
