// CUDA kernel of mtkd_fast::logit_kd, ONE launch: a block per row i computes the student's and every
// teacher's softmax statistics once, then in one sweep over the classes the KL terms and dloss/dz_s
// (docs/method.md sections 2-3); the last block to finish reduces the scalar loss (deterministic order).
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

template <typename scalar_t, typename acc_t>
__global__ void logit_kd_kernel(const scalar_t* __restrict__ student, TeacherRows<scalar_t> teachers,
                                const int64_t* __restrict__ targets, const acc_t* __restrict__ weights, int B, int K,
                                int M, acc_t T, acc_t alpha, acc_t* __restrict__ loss, acc_t* __restrict__ kl,
                                acc_t* __restrict__ tce, acc_t* __restrict__ sce, scalar_t* __restrict__ grad,
                                unsigned int* counter) {
  __shared__ acc_t red[kWarp];
  __shared__ acc_t t_max[kMaxTeachers], t_lseT[kMaxTeachers];
  const int i = blockIdx.x;
  const acc_t invT = acc_t(1) / T, inf = INFINITY;
  const scalar_t* zs = student + static_cast<int64_t>(i) * K;
  const int64_t y = targets[i];
  CUDA_KERNEL_ASSERT(y >= 0 && y < K && "targets: class index out of range");

  // student: max, log-sum-exp at T = 1 and at T
  acc_t v = -inf;
  for (int k = threadIdx.x; k < K; k += blockDim.x) v = max(v, static_cast<acc_t>(zs[k]));
  const acc_t smax = block_allreduce(v, red, MaxOp{}, -inf);
  acc_t s1 = 0, sT = 0;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t x = static_cast<acc_t>(zs[k]) - smax;
    s1 += exp(x);
    sT += exp(x * invT);
  }
  const acc_t lse1 = log(block_allreduce(s1, red, SumOp{}, acc_t(0)));
  const acc_t lseT = log(block_allreduce(sT, red, SumOp{}, acc_t(0)));
  if (threadIdx.x == 0) sce[i] = lse1 - (static_cast<acc_t>(zs[y]) - smax);

  // teachers: max and log-sum-exp (T for the KL, 1 for the teacher's cross-entropy)
  for (int m = 0; m < M; ++m) {
    const scalar_t* zt = teachers.ptr[m] + static_cast<int64_t>(i) * K;
    acc_t tv = -inf;
    for (int k = threadIdx.x; k < K; k += blockDim.x) tv = max(tv, static_cast<acc_t>(zt[k]));
    const acc_t tmax = block_allreduce(tv, red, MaxOp{}, -inf);
    acc_t t1 = 0, tT = 0;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
      const acc_t x = static_cast<acc_t>(zt[k]) - tmax;
      t1 += exp(x);
      tT += exp(x * invT);
    }
    t1 = block_allreduce(t1, red, SumOp{}, acc_t(0));
    tT = block_allreduce(tT, red, SumOp{}, acc_t(0));
    if (threadIdx.x == 0) {
      t_max[m] = tmax;
      t_lseT[m] = log(tT);
      tce[static_cast<int64_t>(i) * M + m] = log(t1) - (static_cast<acc_t>(zt[y]) - tmax);
    }
  }
  __syncthreads();

  // one sweep over the classes: KL partial sums per teacher and the gradient
  acc_t kl_part[kMaxTeachers];
  acc_t w_total = 0;
  for (int m = 0; m < M; ++m) {
    kl_part[m] = 0;
    w_total += weights[static_cast<int64_t>(i) * M + m];
  }
  const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B), kd_scale = alpha * T * inv_B;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t xs = static_cast<acc_t>(zs[k]) - smax;
    const acc_t log_ps = xs * invT - lseT;
    acc_t teach_sum = 0;
    for (int m = 0; m < M; ++m) {
      const acc_t log_pt = (static_cast<acc_t>(teachers.ptr[m][static_cast<int64_t>(i) * K + k]) - t_max[m]) * invT - t_lseT[m];
      const acc_t p = exp(log_pt);
      if (p > 0) kl_part[m] += p * (log_pt - log_ps);  // p == 0 contributes 0 (xlogy)
      teach_sum += weights[static_cast<int64_t>(i) * M + m] * p;
    }
    const acc_t p1 = exp(xs - lse1) - (k == y ? acc_t(1) : acc_t(0));
    grad[static_cast<int64_t>(i) * K + k] = static_cast<scalar_t>(p1 * inv_B + kd_scale * (w_total * exp(log_ps) - teach_sum));
  }
  for (int m = 0; m < M; ++m) {
    const acc_t total = block_allreduce(kl_part[m], red, SumOp{}, acc_t(0));
    if (threadIdx.x == 0) kl[static_cast<int64_t>(i) * M + m] = T * T * total;
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
    logit_kd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(d.B), threads, 0, stream>>>(
        student.const_data_ptr<scalar_t>(), rows, targets.const_data_ptr<int64_t>(), weights.const_data_ptr<acc_t>(),
        static_cast<int>(d.B), static_cast<int>(d.K), static_cast<int>(d.M), static_cast<acc_t>(temperature),
        static_cast<acc_t>(alpha), loss.data_ptr<acc_t>(), kl.data_ptr<acc_t>(), tce.data_ptr<acc_t>(),
        sce.data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), reinterpret_cast<unsigned int*>(counter.data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, kl, tce, sce, grad};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mtkd_fast, CUDA, m) { m.impl("logit_kd", &cuda::logit_kd_cuda); }

}  // namespace mtkd
