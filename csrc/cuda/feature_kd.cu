// CUDA kernel of mtkd_fast::feature_kd: all M (student map, teacher map) pairs in ONE launch. The teachers'
// pointers travel in the kernel parameters (a multi-tensor-apply pattern); the grid is the concatenation of
// every teacher's (sample, chunk) blocks. Each block reads its chunk of G and F once, writes dloss/dG and a
// partial sum of squares; the last block to finish sums the partials per (sample, teacher) in a fixed order
// (deterministic MSE) and the scalar loss.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/op_checks.h"
#include "cuda/common.cuh"

namespace mtkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;  // values of one sample handled by one block

template <typename scalar_t>
struct FeatureArgs {
  const scalar_t* g[kMaxTeachers];
  const scalar_t* f[kMaxTeachers];
  scalar_t* out[kMaxTeachers];
  int64_t numel[kMaxTeachers];       // C_m * H_m * W_m: one sample's values (dense, sample-major)
  int64_t chunks[kMaxTeachers];      // blocks per sample
  int64_t block_start[kMaxTeachers + 1];  // first block of teacher m
  bool vectorised[kMaxTeachers];     // 16-byte aligned and numel a multiple of the pack size
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) feature_kd_kernel(FeatureArgs<scalar_t> args, const acc_t* __restrict__ weights,
                                                             int B, int M, acc_t beta, acc_t* __restrict__ partial,
                                                             acc_t* __restrict__ mse, acc_t* __restrict__ loss,
                                                             unsigned int* counter) {
  __shared__ acc_t red[kWarp];
  constexpr int kPack = 16 / sizeof(scalar_t);
  const int64_t block = blockIdx.x;
  int m = 0;
  while (m + 1 < M && block >= args.block_start[m + 1]) ++m;
  const int64_t local = block - args.block_start[m];
  const int64_t i = local / args.chunks[m], chunk = local % args.chunks[m];
  const int64_t n = args.numel[m];
  const int64_t begin = chunk * kChunk, end = min(n, begin + kChunk);
  const int64_t off = i * n;
  const scalar_t* __restrict__ g = args.g[m] + off;
  const scalar_t* __restrict__ f = args.f[m] + off;
  scalar_t* __restrict__ out = args.out[m] + off;
  const acc_t coef = acc_t(2) * beta * weights[i * M + m] / (static_cast<acc_t>(B) * static_cast<acc_t>(n));

  acc_t s = 0;
  if (args.vectorised[m]) {  // kChunk and numel are multiples of kPack: whole packs only
    using P = Pack<scalar_t, kPack>;
    for (int64_t j = begin + threadIdx.x * kPack; j < end; j += blockDim.x * kPack) {
      const P gv = *reinterpret_cast<const P*>(g + j);
      const P fv = *reinterpret_cast<const P*>(f + j);
      P ov;
#pragma unroll
      for (int q = 0; q < kPack; ++q) {
        const acc_t d = static_cast<acc_t>(gv.v[q]) - static_cast<acc_t>(fv.v[q]);
        s += d * d;
        ov.v[q] = static_cast<scalar_t>(coef * d);
      }
      *reinterpret_cast<P*>(out + j) = ov;
    }
  } else {
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      const acc_t d = static_cast<acc_t>(g[j]) - static_cast<acc_t>(f[j]);
      s += d * d;
      out[j] = static_cast<scalar_t>(coef * d);
    }
  }
  s = block_allreduce(s, red, SumOp{}, acc_t(0));
  if (threadIdx.x == 0) partial[block] = s;

  if (!is_last_block(counter)) return;
  acc_t part = 0;
  for (int64_t task = threadIdx.x; task < static_cast<int64_t>(B) * M; task += blockDim.x) {
    const int64_t r = task / M;
    const int tm = static_cast<int>(task % M);
    const int64_t first = args.block_start[tm] + r * args.chunks[tm];
    acc_t total = 0;
    for (int64_t c = 0; c < args.chunks[tm]; ++c) total += __ldcg(partial + first + c);
    const acc_t value = total / static_cast<acc_t>(args.numel[tm]);
    mse[task] = value;
    part += weights[task] * value;
  }
  part = block_allreduce(part, red, SumOp{}, acc_t(0));
  if (threadIdx.x == 0) *loss = beta * part / static_cast<acc_t>(B);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> feature_kd_cuda(at::TensorList students,
                                                                          at::TensorList teachers,
                                                                          const at::Tensor& weights, double beta) {
  const int64_t B = check_feature_kd_args(students, teachers, weights);
  const int64_t M = static_cast<int64_t>(students.size());
  TORCH_CHECK(M <= kMaxTeachers, "student_maps: the CUDA kernel takes at most ", kMaxTeachers, " maps, got ", M);
  c10::cuda::CUDAGuard guard(students[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = students[0].scalar_type();
  const auto opts = students[0].options().dtype(acc_dtype(dtype));
  at::Tensor loss = at::empty({}, opts), mse = at::empty({B, M}, opts);
  std::vector<at::Tensor> grads;
  for (int64_t m = 0; m < M; ++m) grads.push_back(at::empty_like(students[m]));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mtkd_feature_kd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t kPack = 16 / sizeof(scalar_t);
    FeatureArgs<scalar_t> args{};
    int64_t blocks = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t n = students[m].numel() / B;
      args.g[m] = students[m].const_data_ptr<scalar_t>();
      args.f[m] = teachers[m].const_data_ptr<scalar_t>();
      args.out[m] = grads[m].data_ptr<scalar_t>();
      args.numel[m] = n;
      args.chunks[m] = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
      args.block_start[m] = blocks;
      args.vectorised[m] = n % kPack == 0 && aligned16(args.g[m]) && aligned16(args.f[m]) && aligned16(args.out[m]);
      blocks += B * args.chunks[m];
    }
    args.block_start[M] = blocks;
    TORCH_CHECK(blocks < (int64_t{1} << 31), "student_maps: too large for the CUDA kernel");
    // workspace: one partial sum per block, then the "last block" counter
    at::Tensor work = at::empty({blocks + 1}, opts.dtype(acc_dtype(dtype)));
    acc_t* partial = work.data_ptr<acc_t>();
    auto* counter = reinterpret_cast<unsigned int*>(partial + blocks);
    C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream));
    feature_kd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        args, weights.const_data_ptr<acc_t>(), static_cast<int>(B), static_cast<int>(M), static_cast<acc_t>(beta),
        partial, mse.data_ptr<acc_t>(), loss.data_ptr<acc_t>(), counter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, mse, grads};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mtkd_fast, CUDA, m) { m.impl("feature_kd", &cuda::feature_kd_cuda); }

}  // namespace mtkd
