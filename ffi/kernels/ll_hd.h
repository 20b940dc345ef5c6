// JMEP_HD: a function the host (registration, tests) and the kernels both call.
#pragma once

#if defined(__CUDACC__)
#define JMEP_HD __host__ __device__ __forceinline__
#else
#define JMEP_HD inline
#endif
