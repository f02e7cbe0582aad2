// Device queries (device.h), each read once per device.
#include "device.h"

namespace mbwq {
namespace cuda {
namespace {

int cached_device_attribute(cudaDeviceAttr attr, int (&cache)[64]) {
  return once_per_device(cache, [attr](int dev) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, dev));
    return v;
  });
}

}  // namespace

int sm_count() {
  static int cache[64] = {};
  return cached_device_attribute(cudaDevAttrMultiProcessorCount, cache);
}

int compute_capability_major() {
  static int cache[64] = {};
  return cached_device_attribute(cudaDevAttrComputeCapabilityMajor, cache);
}

int smem_optin_limit() {
  static int cache[64] = {};
  return cached_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, cache);
}

bool wgmma_available() { return compute_capability_major() == 9; }

DeviceFacts device_facts() {
  DeviceFacts d;
  d.sm_count = sm_count();
  d.wgmma = wgmma_available();
  return d;
}

bool pdl_enabled() { return compute_capability_major() >= 9 && knobs().no_pdl == 0; }

}  // namespace cuda
}  // namespace mbwq
