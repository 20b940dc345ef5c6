#include "kernels/arch_probe.h"

#include <cuda_runtime.h>

namespace jmep {

__global__ void arch_probe_kernel() {}

std::string kernel_image_error(int device) {
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    // Loads the kernel for this device (lazy loading included): fails with
    // cudaErrorNoKernelImageForDevice when no SASS/PTX in the module fits.
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, arch_probe_kernel);
  }
  const std::string text = err == cudaSuccess ? "" : cudaGetErrorString(err);
  cudaGetLastError();  // the probe's error must not surface in a later call
  if (prev >= 0) cudaSetDevice(prev);
  return text;
}

std::string compute_capability(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return "?";
  }
  return std::to_string(major) + "." + std::to_string(minor);
}

}  // namespace jmep
