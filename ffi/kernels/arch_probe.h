// Can a GPU run this build's kernels? Every kernel is compiled for the same
// architecture list, so one empty kernel having an image that the device can
// load means they all do.
#pragma once
#include <string>

namespace jmep {
// "" when `device` can run the compiled kernels, else the CUDA error text.
std::string kernel_image_error(int device);
// The device's compute capability as "major.minor" ("?" if unknown).
std::string compute_capability(int device);
}  // namespace jmep
