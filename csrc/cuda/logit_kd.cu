// CUDA kernel of mtkd_fast::logit_kd, ONE launch: a block per row i reads the student's and every teacher's
// row once (staged in shared memory), computes their softmax statistics and KL terms, then dloss/dz_s in one
// sweep over the classes (docs/method.md sections 2-3); the last block to finish reduces the scalar loss
// (deterministic order).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/op_checks.h"
#include "cuda/common.cuh"

namespace mtkd {
namespace cuda {
namespace {

template <typename scalar_t>
struct TeacherRows {
  const scalar_t* ptr[kMaxTeachers];
};

// A row of K values is read from global memory once: it is staged in shared memory (`staged`, when the
// M + 1 rows fit) and every later pass reads the copy. Teachers are walked one at a time (their statistics
// and KL reduced before the next), so no per-teacher array lives in registers or local memory.
template <typename scalar_t, typename acc_t>
__global__ void logit_kd_kernel(const scalar_t* __restrict__ student, TeacherRows<scalar_t> teachers,
                                const int64_t* __restrict__ targets, const acc_t* __restrict__ weights, int B, int K,
                                int M, acc_t T, acc_t alpha, bool staged, acc_t* __restrict__ loss,
                                acc_t* __restrict__ kl, acc_t* __restrict__ tce, acc_t* __restrict__ sce,
                                scalar_t* __restrict__ grad, unsigned int* counter) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // staged rows: student, then teacher 0..M-1
  scalar_t* rows = reinterpret_cast<scalar_t*>(smem_raw);
  __shared__ acc_t red[kWarp];
  __shared__ acc_t t_max[kMaxTeachers], t_lseT[kMaxTeachers];
  const int i = blockIdx.x;
  const acc_t invT = acc_t(1) / T, inf = INFINITY;
  const int64_t y = targets[i];
  CUDA_KERNEL_ASSERT(y >= 0 && y < K && "targets: class index out of range");
  // row r (0: student, 1 + m: teacher m) as the later passes read it: the shared copy, or global memory
  const auto row = [&](int r) -> const scalar_t* {
    if (staged) return rows + static_cast<int64_t>(r) * K;
    return (r == 0 ? student : teachers.ptr[r - 1]) + static_cast<int64_t>(i) * K;
  };
  // the one global read of row r: staged on the way, returns the row's maximum
  const auto load_max = [&](int r) -> acc_t {
    const scalar_t* src = (r == 0 ? student : teachers.ptr[r - 1]) + static_cast<int64_t>(i) * K;
    scalar_t* dst = rows + static_cast<int64_t>(r) * K;
    acc_t v = -inf;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
      const scalar_t x = src[k];
      if (staged) dst[k] = x;
      v = max(v, static_cast<acc_t>(x));
    }
    return block_allreduce(v, red, MaxOp{}, -inf);  // its barriers also publish the staged row
  };

  // student: max, log-sum-exp at T = 1 and at T
  const acc_t smax = load_max(0);
  const scalar_t* zs = row(0);
  acc_t s1 = 0, sT = 0;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t x = static_cast<acc_t>(zs[k]) - smax;
    s1 += exp(x);
    sT += exp(x * invT);
  }
  const acc_t lse1 = log(block_allreduce(s1, red, SumOp{}, acc_t(0)));
  const acc_t lseT = log(block_allreduce(sT, red, SumOp{}, acc_t(0)));
  if (threadIdx.x == 0) sce[i] = lse1 - (static_cast<acc_t>(zs[y]) - smax);

  // teachers, one at a time: max, log-sum-exp (T for the KL, 1 for the cross-entropy), then the KL
  for (int m = 0; m < M; ++m) {
    const acc_t tmax = load_max(1 + m);
    const scalar_t* zt = row(1 + m);
    acc_t t1 = 0, tT = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
      const acc_t x = static_cast<acc_t>(zt[k]) - tmax;
      t1 += exp(x);
      tT += exp(x * invT);
    }
    t1 = block_allreduce(t1, red, SumOp{}, acc_t(0));
    tT = block_allreduce(tT, red, SumOp{}, acc_t(0));
    const acc_t tlseT = log(tT);
    acc_t part = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
      const acc_t log_pt = (static_cast<acc_t>(zt[k]) - tmax) * invT - tlseT;
      const acc_t p = exp(log_pt);
      const acc_t log_ps = (static_cast<acc_t>(zs[k]) - smax) * invT - lseT;
      if (p > 0) part += p * (log_pt - log_ps);  // p == 0 contributes 0 (xlogy)
    }
    part = block_allreduce(part, red, SumOp{}, acc_t(0));
    if (threadIdx.x == 0) {
      t_max[m] = tmax;
      t_lseT[m] = tlseT;
      tce[static_cast<int64_t>(i) * M + m] = log(t1) - (static_cast<acc_t>(zt[y]) - tmax);
      kl[static_cast<int64_t>(i) * M + m] = T * T * part;
    }
  }
  __syncthreads();  // t_max, t_lseT

  // the gradient: dL/dz_s = (p^1(z_s) - onehot(y)) / B + alpha T / B * sum_m w_m (p^T(z_s) - p^T(z_m))
  acc_t w_total = 0;
  for (int m = 0; m < M; ++m) w_total += weights[static_cast<int64_t>(i) * M + m];
  const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B), kd_scale = alpha * T * inv_B;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t xs = static_cast<acc_t>(zs[k]) - smax;
    acc_t teach_sum = 0;
    for (int m = 0; m < M; ++m) {
      const acc_t log_pt = (static_cast<acc_t>(row(1 + m)[k]) - t_max[m]) * invT - t_lseT[m];
      teach_sum += weights[static_cast<int64_t>(i) * M + m] * exp(log_pt);
    }
    const acc_t p1 = exp(xs - lse1) - (k == y ? acc_t(1) : acc_t(0));
    grad[static_cast<int64_t>(i) * K + k] =
        static_cast<scalar_t>(p1 * inv_B + kd_scale * (w_total * exp(xs * invT - lseT) - teach_sum));
  }

  // the last block reduces loss = (sum_i SCE_i + alpha sum_{i,m} w_im KL_im) / B in a fixed order
  if (!is_last_block(counter)) return;
  acc_t part = 0;
  for (int r = threadIdx.x; r < B; r += blockDim.x) {
    acc_t kd = 0;
    for (int m = 0; m < M; ++m) kd += weights[static_cast<int64_t>(r) * M + m] * __ldcg(kl + static_cast<int64_t>(r) * M + m);
    part += __ldcg(sce + r) + alpha * kd;
  }
  const acc_t total = block_allreduce(part, red, SumOp{}, acc_t(0));
  if (threadIdx.x == 0) *loss = total * inv_B;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> logit_kd_cuda(
    const at::Tensor& student, at::TensorList teachers, const at::Tensor& targets, const at::Tensor& weights,
    double temperature, double alpha) {
  const LogitDims d = check_logit_kd_args(student, teachers, targets, weights, temperature);
  TORCH_CHECK(d.M <= kMaxTeachers, "teacher_logits: the CUDA kernel takes at most ", kMaxTeachers,
              " teachers, got ", d.M);
  TORCH_CHECK(d.B < (int64_t{1} << 31) && d.K < (int64_t{1} << 31), "student_logits: too large for the CUDA kernel");
  c10::cuda::CUDAGuard guard(student.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = student.options().dtype(acc_dtype(student.scalar_type()));
  at::Tensor loss = at::empty({}, opts), kl = at::empty({d.B, d.M}, opts), tce = at::empty({d.B, d.M}, opts);
  at::Tensor sce = at::empty({d.B}, opts), grad = at::empty({d.B, d.K}, student.options());
  at::Tensor counter = at::empty({1}, student.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(counter.data_ptr(), 0, sizeof(int), stream));
  const int threads = d.K <= 128 ? 64 : (d.K <= 512 ? 128 : 256);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "mtkd_logit_kd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TeacherRows<scalar_t> rows{};
    for (int64_t m = 0; m < d.M; ++m) rows.ptr[m] = teachers[m].const_data_ptr<scalar_t>();
    // stage the M + 1 rows in shared memory when they fit next to the kernel's static arrays (48 KiB)
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, logit_kd_kernel<scalar_t, acc_t>));
    const int64_t stage_bytes = (d.M + 1) * d.K * static_cast<int64_t>(sizeof(scalar_t));
    const bool staged = stage_bytes + static_cast<int64_t>(attr.sharedSizeBytes) <= 48 * 1024;
    logit_kd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(d.B), threads, staged ? stage_bytes : 0, stream>>>(
        student.const_data_ptr<scalar_t>(), rows, targets.const_data_ptr<int64_t>(), weights.const_data_ptr<acc_t>(),
        static_cast<int>(d.B), static_cast<int>(d.K), static_cast<int>(d.M), static_cast<acc_t>(temperature),
        static_cast<acc_t>(alpha), staged, loss.data_ptr<acc_t>(), kl.data_ptr<acc_t>(), tce.data_ptr<acc_t>(),
        sce.data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), reinterpret_cast<unsigned int*>(counter.data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, kl, tce, sce, grad};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mtkd_fast, CUDA, m) { m.impl("logit_kd", &cuda::logit_kd_cuda); }

}  // namespace mtkd
