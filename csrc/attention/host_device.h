// Marks functions callable from both host and device code when compiled by nvcc.
#pragma once

#if defined(__CUDACC__)
#define MHA_HOST_DEVICE __host__ __device__
#else
#define MHA_HOST_DEVICE
#endif
