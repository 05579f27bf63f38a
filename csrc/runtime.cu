// Device discovery and per-device bookkeeping for the entry points.
#include <mutex>
#include <map>
#include <utility>
#include <vector>

#include "common.cuh"

namespace kx {

namespace {

// The device count is fixed for the life of a process once the runtime has
// initialised, so a successful query is cached; a failed one is retried (and
// reported) on every call.
int query_device_count(cudaError_t* err_out) {
  static int cached = -1;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (cached >= 0) {
    *err_out = cudaSuccess;
    return cached;
  }
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // the failure is not sticky; keep later checks clean
    *err_out = err;
    return 0;
  }
  *err_out = cudaSuccess;
  cached = count;
  return count;
}

}  // namespace

int device_count() {
  cudaError_t err;
  return query_device_count(&err);
}

std::string runtime_info() {
  int runtime_version = 0;
  cudaRuntimeGetVersion(&runtime_version);
  std::string s = "cudart " + std::to_string(runtime_version / 1000) + "." +
                  std::to_string((runtime_version % 1000) / 10) + " (static)";
  cudaError_t err;
  int n = query_device_count(&err);
  if (err != cudaSuccess) {
    s += ", no CUDA device: " + std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  } else {
    s += ", " + std::to_string(n) + " device(s)";
  }
  return s;
}

void prepare_device(int device) {
  cudaError_t err;
  int n = query_device_count(&err);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("kernels._C: no CUDA device available (cudaGetDeviceCount: ") +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + ")");
  }
  if (n == 0) throw std::runtime_error("kernels._C: no CUDA device available (the driver reports 0 devices)");
  if (device < 0 || device >= n) {
    throw std::runtime_error("kernels._C: device index " + std::to_string(device) + " is out of range (" +
                             std::to_string(n) + " device(s))");
  }
  KX_CUDA_CHECK(cudaSetDevice(device));
}

void ensure_smem_limit(const void* kernel, int device, int bytes) {
  // The attribute is a limit, so it only ever needs raising: remember the
  // largest value set for each (kernel, device).
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> raised;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_pair(kernel, device);
  auto it = raised.find(key);
  if (it != raised.end() && it->second >= bytes) return;
  KX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  raised[key] = bytes;
}

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int n = 0;
    KX_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

}  // namespace kx
