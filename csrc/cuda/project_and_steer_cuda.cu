// CUDA kernels of emokern::project and emokern::project_and_steer_: argument checks, dtype dispatch and stream
// plumbing around the raw-pointer launchers of emokern/project_and_steer.cuh (where the design is described).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "checks.h"
#include "emokern/project_and_steer.cuh"

namespace emokern {
namespace {

template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

void check_cuda_sizes(const char* op, const at::Tensor& h, const at::Tensor& V) {
  TORCH_CHECK(h.is_cuda(), op, ": argument 'h' must be a CUDA tensor; got device ", h.device());
  TORCH_CHECK(V.size(0) <= std::numeric_limits<int>::max() && V.size(1) <= std::numeric_limits<int>::max(), op,
              ": argument 'V' is too large for the CUDA kernels; got shape ", V.sizes());
}

// Double passes the dispatch macro but not check_hidden_and_vectors; the branch keeps the kernels from being
// instantiated for it.
template <typename scalar_t>
void project_typed(const at::Tensor& h, const at::Tensor& V, const at::Tensor& P_out, int num_sms,
                   cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    TORCH_CHECK(false, "emokern::project: float64 is not supported by the CUDA kernels");
  } else {
    using T = typename CudaType<scalar_t>::type;
    C10_CUDA_CHECK(emokern::cuda::launch_project<T>(
        reinterpret_cast<const T*>(h.data_ptr<scalar_t>()), h.stride(0),
        reinterpret_cast<const T*>(V.data_ptr<scalar_t>()), P_out.data_ptr<float>(), P_out.stride(0), h.size(0),
        static_cast<int>(V.size(0)), static_cast<int>(V.size(1)), num_sms, stream));
  }
}

template <typename scalar_t>
void project_and_steer_typed(const at::Tensor& h, const at::Tensor& V, const at::Tensor& row, const at::Tensor& a,
                             const at::Tensor& b, const at::Tensor& lo, const at::Tensor& hi, const at::Tensor& P_out,
                             int num_sms, cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    TORCH_CHECK(false, "emokern::project_and_steer_: float64 is not supported by the CUDA kernels");
  } else {
    using T = typename CudaType<scalar_t>::type;
    C10_CUDA_CHECK(emokern::cuda::launch_project_and_steer<T>(
        reinterpret_cast<T*>(h.data_ptr<scalar_t>()), h.stride(0),
        reinterpret_cast<const T*>(V.data_ptr<scalar_t>()), row.data_ptr<int32_t>(), a.data_ptr<float>(),
        b.data_ptr<float>(), lo.data_ptr<float>(), hi.data_ptr<float>(), a.size(0), P_out.data_ptr<float>(),
        P_out.stride(0), h.size(0), static_cast<int>(V.size(0)), static_cast<int>(V.size(1)), num_sms, stream));
  }
}

// Every backend's kernel for an op must share one C++ signature (the dispatcher checks it at load time), and
// the CPU kernels take all tensors as const at::Tensor& (a const handle still allows writing the data).
void project_cuda(const at::Tensor& h, const at::Tensor& V, const at::Tensor& P_out) {
  constexpr const char* op = "emokern::project";
  check_hidden_and_vectors(op, h, V);
  check_projection_out(op, h, V, P_out);
  check_cuda_sizes(op, h, V);
  if (h.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(h.device());
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "emokern_project_cuda", [&] {
    project_typed<scalar_t>(h, V, P_out, num_sms, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void project_and_steer_cuda(const at::Tensor& h, const at::Tensor& V, const at::Tensor& row, const at::Tensor& a,
                            const at::Tensor& b, const at::Tensor& lo, const at::Tensor& hi,
                            const at::Tensor& P_out) {
  constexpr const char* op = "emokern::project_and_steer_";
  check_hidden_and_vectors(op, h, V);
  check_projection_out(op, h, V, P_out);
  check_steering_tables(op, h, V, row, a, b, lo, hi);
  check_cuda_sizes(op, h, V);
  if (h.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(h.device());
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "emokern_project_and_steer_cuda", [&] {
    project_and_steer_typed<scalar_t>(h, V, row, a, b, lo, hi, P_out, num_sms, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace emokern

TORCH_LIBRARY_IMPL(emokern, CUDA, m) {
  m.impl("project", &emokern::project_cuda);
  m.impl("project_and_steer_", &emokern::project_and_steer_cuda);
}
