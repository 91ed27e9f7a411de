// CUDA kernels of the agent-state helpers: pooled cosine COS_{i,m} (forward and backward: one launch each
// for all teachers, coalesced pooling in either layout; the forward splits each (sample, teacher) over blocks
// of channels, the backward takes a block per (sample, teacher)) and the per-sample loss with the normalised reward
// (one block). Same maths as csrc/cpu/state_ops.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/op_checks.h"
#include "cuda/common.cuh"
#include "cuda/pool.cuh"

namespace mtkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
struct CosineArgs {
  const scalar_t* map[kMaxTeachers];
  const scalar_t* emb[kMaxTeachers];
  scalar_t* grad_map[kMaxTeachers];
  scalar_t* grad_emb[kMaxTeachers];
  int64_t channels[kMaxTeachers];
  int64_t spatial[kMaxTeachers];  // H * W
  bool channels_last[kMaxTeachers];
};

// Pools sample i of map m (coalesced in either layout: pool_channels, csrc/cuda/pool.cuh), storing the
// channel means in x (shared, C values) when x is given, and returns (dot, |x|^2, |e|^2) reduced over the
// block. H*W = 0 gives NaN means, as the reference.
template <typename scalar_t, typename acc_t>
__device__ void pool_and_dots(const CosineArgs<scalar_t>& a, int m, int64_t i, acc_t* x, acc_t* part, acc_t* red,
                              acc_t& dot, acc_t& xx, acc_t& ee) {
  const int64_t C = a.channels[m], HW = a.spatial[m];
  const scalar_t* e = a.emb[m] + i * C;
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
  acc_t d = 0, sx = 0, se = 0;
  pool_channels<kThreads>(a.map[m] + i * C * HW, C, HW, a.channels_last[m], C, part, [&](int64_t c, acc_t sum) {
    const acc_t mean = sum * inv_hw, ev = static_cast<acc_t>(e[c]);
    if (x != nullptr) x[c] = mean;
    d += mean * ev;
    sx += mean * mean;
    se += ev * ev;
  });
  dot = block_allreduce(d, red, SumOp{}, acc_t(0));
  xx = block_allreduce(sx, red, SumOp{}, acc_t(0));
  ee = block_allreduce(se, red, SumOp{}, acc_t(0));
}

// Forward: blocks of channels per (sample, teacher) (ChannelSplit, csrc/cuda/pool.cuh), no channel means kept,
// so no dynamic shared memory (any C).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) pooled_cosine_kernel(CosineArgs<scalar_t> a, ChannelSplit split, int M,
                                                                acc_t eps, acc_t* __restrict__ partial,
                                                                unsigned int* counter, acc_t* __restrict__ cos) {
  __shared__ acc_t red[kWarp];
  __shared__ acc_t part[kThreads];
  const ChannelBlock b = locate_channel_block(split, M);
  const int64_t C = a.channels[b.m], HW = a.spatial[b.m];
  cosine_channel_block<kThreads>(a.map[b.m] + b.i * C * HW, a.emb[b.m] + b.i * C, C, HW, a.channels_last[b.m],
                                 split, b, M, eps, part, red, partial, counter, cos);
}

// dcos/dx = e / (n_x n_e) - cos x / (n_x |x|) with n = max(|.|, eps) (clamp not differentiated), / (H W).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) pooled_cosine_backward_kernel(CosineArgs<scalar_t> a, int M, acc_t eps,
                                                                         const acc_t* __restrict__ grad) {
  // the channel means, C values; aligned for the double accumulation type
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* x = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ acc_t red[kWarp];
  __shared__ acc_t part[kThreads];
  const int64_t i = blockIdx.x / M;
  const int m = blockIdx.x % M;
  acc_t dot, xx, ee;
  pool_and_dots<scalar_t, acc_t>(a, m, i, x, part, red, dot, xx, ee);
  const acc_t nx = sqrt(xx), ne = sqrt(ee), cx = max(nx, eps), ce = max(ne, eps);
  const acc_t cosv = (dot / cx) / ce, go = grad[blockIdx.x];
  const acc_t coef_e = go / (cx * ce);
  // only an exactly zero norm contributes no term: a NaN norm (a NaN in the map) keeps the gradient NaN
  const acc_t coef_x = nx != 0 ? go * cosv / (cx * nx) : acc_t(0);
  const acc_t coef_ee = ne != 0 ? go * cosv / (ce * ne) : acc_t(0);
  const int64_t C = a.channels[m], HW = a.spatial[m];
  const scalar_t* e = a.emb[m] + i * C;
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
  __syncthreads();  // every channel mean is in x
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t ev = static_cast<acc_t>(e[c]), xv = x[c];
    a.grad_emb[m][i * C + c] = static_cast<scalar_t>(coef_e * xv - coef_ee * ev);
  }
  __syncthreads();  // x is rewritten below: every reader above is done
  // x now holds dcos/dx_c / (H W)
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const acc_t ev = static_cast<acc_t>(e[c]);
    x[c] = (coef_e * ev - coef_x * x[c]) * inv_hw;
  }
  __syncthreads();
  scalar_t* out = a.grad_map[m] + i * C * HW;
  const bool cl = a.channels_last[m];
  for (int64_t j = threadIdx.x; j < C * HW; j += blockDim.x) {  // coalesced writes in either layout
    const int64_t c = cl ? j % C : j / HW;
    out[j] = static_cast<scalar_t>(x[c]);
  }
}

template <typename scalar_t>
CosineArgs<scalar_t> cosine_args(at::TensorList maps, at::TensorList embeddings, int64_t& max_c) {
  CosineArgs<scalar_t> a{};
  max_c = 0;
  for (size_t m = 0; m < maps.size(); ++m) {
    a.map[m] = maps[m].const_data_ptr<scalar_t>();
    a.emb[m] = embeddings[m].const_data_ptr<scalar_t>();
    a.channels[m] = maps[m].size(1);
    a.spatial[m] = maps[m].size(2) * maps[m].size(3);
    a.channels_last[m] = is_channels_last_map(maps[m]);
    max_c = std::max(max_c, maps[m].size(1));
  }
  return a;
}

int64_t check_cuda_cosine(at::TensorList maps, at::TensorList embeddings, double eps) {
  const int64_t B = check_pooled_cosine_args(maps, embeddings, eps);
  TORCH_CHECK(static_cast<int64_t>(maps.size()) <= kMaxTeachers, "student_maps: the CUDA kernel takes at most ",
              kMaxTeachers, " maps");
  return B;
}

// The backward keeps C channel means in dynamic shared memory next to the kernel's static arrays: the sum
// must fit the 48 KiB a launch gets without opting in.
template <auto Kernel>
void check_backward_shared_memory(int64_t max_c, size_t acc_size) {
  const int64_t limit = 48 * 1024, static_bytes = static_shared_bytes<Kernel>();
  TORCH_CHECK(max_c * static_cast<int64_t>(acc_size) + static_bytes <= limit, "student_maps: at most ",
              (limit - static_bytes) / static_cast<int64_t>(acc_size),
              " channels for the CUDA pooled_cosine backward, got ", max_c);
}

at::Tensor pooled_cosine_cuda(at::TensorList maps, at::TensorList embeddings, double eps) {
  const int64_t B = check_cuda_cosine(maps, embeddings, eps);
  const auto dtype = maps[0].scalar_type();
  const int64_t M = static_cast<int64_t>(maps.size());
  c10::cuda::CUDAGuard guard(maps[0].device());
  at::Tensor cos = at::empty({B, M}, maps[0].options().dtype(acc_dtype(dtype)));
  if (B == 0) return cos;  // no empty launches
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mtkd_pooled_cosine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int64_t max_c = 0;
    const auto args = cosine_args<scalar_t>(maps, embeddings, max_c);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto split = split_channels<kThreads>(B, M, args.channels, args.spatial, args.channels_last);
    const auto work = split_workspace(split, B, M, cos.options(), stream);
    pooled_cosine_kernel<scalar_t, acc_t><<<static_cast<unsigned>(split.block_start[M]), kThreads, 0, stream>>>(
        args, split, static_cast<int>(M), static_cast<acc_t>(eps), work.partial.data_ptr<acc_t>(),
        reinterpret_cast<unsigned int*>(work.counters.data_ptr<int>()), cos.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return cos;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> pooled_cosine_backward_cuda(
    const at::Tensor& grad, at::TensorList maps, at::TensorList embeddings, double eps) {
  const int64_t B = check_cuda_cosine(maps, embeddings, eps);
  const auto dtype = maps[0].scalar_type();
  const int64_t M = static_cast<int64_t>(maps.size());
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == M, "grad: expected shape [", B, ", ", M,
              "], got ", grad.sizes());
  TORCH_CHECK(grad.device() == maps[0].device(), "grad: expected device ", maps[0].device(), ", got ",
              grad.device());
  TORCH_CHECK(is_float_dtype(grad.scalar_type()), "grad: expected a floating dtype, got ", grad.scalar_type());
  c10::cuda::CUDAGuard guard(maps[0].device());
  const at::Tensor grad_acc = grad.to(acc_dtype(dtype)).contiguous();
  std::vector<at::Tensor> grad_maps, grad_emb;
  for (int64_t m = 0; m < M; ++m) {
    grad_maps.push_back(at::empty_like(maps[m]));
    grad_emb.push_back(at::empty_like(embeddings[m]));
  }
  if (B == 0) return {grad_maps, grad_emb};  // no empty launches
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mtkd_pooled_cosine_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int64_t max_c = 0;
    auto args = cosine_args<scalar_t>(maps, embeddings, max_c);
    check_backward_shared_memory<pooled_cosine_backward_kernel<scalar_t, acc_t>>(max_c, sizeof(acc_t));
    for (int64_t m = 0; m < M; ++m) {
      args.grad_map[m] = grad_maps[m].data_ptr<scalar_t>();
      args.grad_emb[m] = grad_emb[m].data_ptr<scalar_t>();
    }
    pooled_cosine_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B * M), kThreads, max_c * sizeof(acc_t),
                                                     c10::cuda::getCurrentCUDAStream()>>>(
        args, static_cast<int>(M), static_cast<acc_t>(eps), grad_acc.const_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_maps, grad_emb};
}

// One block: l_i, then its mean and Bessel's std, then r_hat (B is a batch: a few hundred values).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) reward_kernel(const acc_t* __restrict__ sce, const acc_t* __restrict__ kl,
                                                         const acc_t* __restrict__ wl, const acc_t* __restrict__ mse,
                                                         const acc_t* __restrict__ wf, int64_t B, int64_t M,
                                                         acc_t alpha, acc_t beta, acc_t* __restrict__ loss,
                                                         acc_t* __restrict__ reward) {
  __shared__ acc_t red[kWarp];
  // a NaN/Inf loss gets reward 0 and stays out of the mean and std (docs/method.md section 5; as the reference)
  acc_t sum = 0, count = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    acc_t kd = 0, fd = 0;
    for (int64_t m = 0; m < M; ++m) {
      kd += wl[i * M + m] * kl[i * M + m];
      if (mse != nullptr) fd += wf[i * M + m] * mse[i * M + m];
    }
    const acc_t l = sce[i] + alpha * kd + beta * fd;
    loss[i] = l;
    if (isfinite(l)) {
      sum += l;
      count += 1;
    }
  }
  const acc_t n = block_allreduce(count, red, SumOp{}, acc_t(0));
  const acc_t mean = block_allreduce(sum, red, SumOp{}, acc_t(0)) / max(n, acc_t(1));
  acc_t var = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x)
    if (isfinite(loss[i])) var += (loss[i] - mean) * (loss[i] - mean);
  var = block_allreduce(var, red, SumOp{}, acc_t(0));
  const acc_t std_dev = n > 1 ? sqrt(var / (n - 1)) : acc_t(0);
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const acc_t z = (std_dev > 0 && isfinite(loss[i])) ? (mean - loss[i]) / std_dev : acc_t(0);  // r = -l
    reward[i] = min(acc_t(1), max(acc_t(0), z));
  }
}

std::tuple<at::Tensor, at::Tensor> per_sample_loss_reward_cuda(const at::Tensor& sce, const at::Tensor& kl,
                                                               const at::Tensor& wl,
                                                               const std::optional<at::Tensor>& mse,
                                                               const std::optional<at::Tensor>& wf, double alpha,
                                                               double beta) {
  check_reward_args(sce, kl, wl, mse, wf);
  c10::cuda::CUDAGuard guard(kl.device());
  const int64_t B = kl.size(0), M = kl.size(1);
  at::Tensor loss = at::empty({B}, kl.options()), reward = at::empty({B}, kl.options());
  AT_DISPATCH_FLOATING_TYPES(kl.scalar_type(), "mtkd_per_sample_loss_reward_cuda", [&] {
    reward_kernel<scalar_t><<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        sce.const_data_ptr<scalar_t>(), kl.const_data_ptr<scalar_t>(), wl.const_data_ptr<scalar_t>(),
        mse ? mse->const_data_ptr<scalar_t>() : nullptr, wf ? wf->const_data_ptr<scalar_t>() : nullptr, B, M,
        static_cast<scalar_t>(alpha), static_cast<scalar_t>(beta), loss.data_ptr<scalar_t>(),
        reward.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, reward};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mtkd_fast, CUDA, m) {
  m.impl("pooled_cosine", &cuda::pooled_cosine_cuda);
  m.impl("pooled_cosine_backward", &cuda::pooled_cosine_backward_cuda);
  m.impl("per_sample_loss_reward", &cuda::per_sample_loss_reward_cuda);
}

}  // namespace mtkd
