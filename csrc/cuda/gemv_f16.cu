// Instantiates the small-M gemm kernels for __half activations (one file per dtype so the
// build compiles them in parallel).
#include "gemv_kernels.cuh"

namespace mbwq {
namespace cuda {
namespace gemv_detail {
template void run_gemv<__half>(int, const GemvArgs&, int, size_t, cudaStream_t);
template void run_reduce<__half>(const float*, int, int64_t, int, const void*, int, void*,
                              cudaStream_t);
}  // namespace gemv_detail
}  // namespace cuda
}  // namespace mbwq
