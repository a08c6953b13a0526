// CUDA segmented sort for snap_fast (Python face: snap_fast/ops/swd/cpp.py, cuda_segmented_argsort
// and cuda_sort_rows). Built only when torch has CUDA and nvcc is found; the CPU build never
// compiles this file.
//
// The Triton kernels sort a segment inside one program's registers, which caps the segment
// length; longer segments (an embedding's 49 152 or a Llama-8B's 128 256 rows) go through CUB's
// DeviceSegmentedSort, which picks per segment between warp, block and multi-block radix sorts,
// so one call serves a whole model's mixed segment lengths. Float keys are radix-sorted on their
// order-preserving bit pattern: NaNs are sorted (not UB) and stay in the output.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <cub/device/device_segmented_sort.cuh>

#include <cstdint>

namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& offsets) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "x must be a contiguous 1-D tensor");
  TORCH_CHECK(offsets.device() == x.device(), "offsets must be on the device of x");
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1 && offsets.is_contiguous(),
              "offsets must be a contiguous non-empty 1-D tensor");
  TORCH_CHECK(x.numel() < (int64_t{1} << 31), "x has more than 2^31 - 1 elements");
}

// Segment-local index of every element: idx[i] = i - offsets[segment of i]. One thread per
// element, segment found by binary search in the (S + 1) offsets.
__global__ void local_index_kernel(const int64_t* __restrict__ offsets, int64_t num_segments, int64_t total,
                                   int32_t* __restrict__ idx) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  int64_t lo = 0, hi = num_segments;  // invariant: offsets[lo] <= i < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= i) lo = mid; else hi = mid;
  }
  idx[i] = static_cast<int32_t>(i - offsets[lo]);
}

at::Tensor temp_buffer(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// Values sorted ascending within every segment, and the segment-local index each came from.
std::tuple<at::Tensor, at::Tensor> segmented_argsort(const at::Tensor& x, const at::Tensor& offsets) {
  check_inputs(x, offsets);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = x.numel();
  const int64_t num_segments = offsets.numel() - 1;
  at::Tensor values = at::empty_like(x);
  at::Tensor idx_in = at::empty({total}, x.options().dtype(at::kInt));
  at::Tensor idx_out = at::empty({total}, x.options().dtype(at::kInt));
  if (total == 0 || num_segments == 0) return {values, idx_out};
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  local_index_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      offsets.data_ptr<int64_t>(), num_segments, total, idx_in.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t* begin = offsets.data_ptr<int64_t>();
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceSegmentedSort::SortPairs(
      nullptr, temp_bytes, x.data_ptr<float>(), values.data_ptr<float>(), idx_in.data_ptr<int32_t>(),
      idx_out.data_ptr<int32_t>(), total, num_segments, begin, begin + 1, stream));
  at::Tensor temp = temp_buffer(temp_bytes, x);
  C10_CUDA_CHECK(cub::DeviceSegmentedSort::SortPairs(
      temp.data_ptr(), temp_bytes, x.data_ptr<float>(), values.data_ptr<float>(), idx_in.data_ptr<int32_t>(),
      idx_out.data_ptr<int32_t>(), total, num_segments, begin, begin + 1, stream));
  return {values, idx_out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "snap_fast CUDA kernels: CUB segmented sort of a flat float32 buffer";
  m.def("segmented_argsort", &segmented_argsort, "Sorted values and segment-local indices per segment",
        pybind11::arg("x"), pybind11::arg("offsets"));
}
