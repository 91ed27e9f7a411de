// CUDA kernel of mtkd_fast::logit_kd, ONE launch (docs/method.md sections 2-3). Each row's K classes are split
// into `chunks` chunks of `len` classes, a block per (row, chunk), so a small batch still fills the GPU (the
// host picks about two blocks per SM; one chunk per row when the batch alone does that).
// - Every block reads its chunk of the student's and the M teachers' rows from global memory once (staged in
//   shared memory) and writes, per row, the chunk's max, sum exp(z - max), sum exp((z - max) / T) and, for a
//   teacher, the KL numerator sum e (z_t - z_s) with the shifts below: a record in a workspace.
// - The last block of a row (arrival counter) merges the row's records (online-softmax rule, chunk order),
//   writes the row's KL, TCE and SCE, then dloss/dz_s for the WHOLE row: the gradient needs the row's
//   normalisers for every class, which exist only after every chunk has finished. Its own chunk comes from
//   shared memory, the rest is a second read of the row from global memory, which the row's other blocks
//   (adjacent block indices, so they run together) have just brought into L2. A cooperative launch (grid sync,
//   each block then writing its own chunk) would avoid that read but needs co-residency bounds and a loop over
//   work items; this keeps an ordinary launch whose correctness does not depend on scheduling.
// - The last row to finish (a second counter) reduces the scalar loss over the rows in a fixed order.
// Nothing runs an atomic on a float: the result does not depend on the order in which blocks finish.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "cpu/op_checks.h"
#include "cuda/common.cuh"

namespace mtkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = kMaxTeachers + 1;  // source rows of a sample: 0 the student, 1 + m teacher m
constexpr int kRecord = 4;               // a chunk's record of one source row: max, sum at 1, sum at T, KL sum
constexpr int kBlocksPerSM = 2;          // the grid the host aims for
// Fewest classes a chunk gets when the batch is small: a warp walks a source row of the chunk, so this is two
// classes per lane; smaller chunks add blocks whose fixed cost (staging, records, an atomic) exceeds their work.
constexpr int64_t kMinChunk = 64;
constexpr int64_t kStageLimit = 48 * 1024;  // shared memory a launch gets without opting in

template <typename scalar_t>
struct TeacherRows {
  const scalar_t* ptr[kMaxTeachers];
};

// The shift a chunk's sums use: its max, or 0 for a chunk of -inf logits only (all exps are then 0; shifting
// by -inf would give NaN). Any finite shift is exact: the merge below undoes it.
template <typename acc_t>
__device__ __forceinline__ acc_t shift_of(acc_t chunk_max) {
  return chunk_max == -INFINITY ? acc_t(0) : chunk_max;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) logit_kd_kernel(
    const scalar_t* __restrict__ student, TeacherRows<scalar_t> teachers, const int64_t* __restrict__ targets,
    const acc_t* __restrict__ weights, int B, int K, int M, int len, int chunks, acc_t T, acc_t alpha,
    acc_t* __restrict__ records, acc_t* __restrict__ loss, acc_t* __restrict__ kl, acc_t* __restrict__ tce,
    acc_t* __restrict__ sce, scalar_t* __restrict__ grad, unsigned int* counter) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // the chunk of source row r at stage + r * len
  scalar_t* stage = reinterpret_cast<scalar_t*>(smem_raw);
  __shared__ acc_t red[kWarp];
  __shared__ acc_t chunk_max[kRows];                    // per source row: this chunk's max
  __shared__ acc_t row_max[kRows], lse1[kRows], lseT[kRows], kl_mean[kRows];  // per source row: merged
  const int R = M + 1, lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t i = blockIdx.x / chunks;
  const int c = static_cast<int>(blockIdx.x % chunks);
  const int k0 = c * len, n = min(K - k0, len);  // this block's classes: [k0, k0 + n), n >= 1
  const acc_t invT = acc_t(1) / T, inf = INFINITY;
  const auto row = [&](int r) -> const scalar_t* {  // source row r of sample i in global memory
    return (r == 0 ? student : teachers.ptr[r - 1]) + i * K;
  };

  // 1. the one global read of the chunk: every source row, coalesced, into shared memory
  for (int r = 0; r < R; ++r) {
    const scalar_t* src = row(r) + k0;
    for (int k = threadIdx.x; k < n; k += blockDim.x) stage[r * len + k] = src[k];
  }
  __syncthreads();

  // 2. a warp per source row: the chunk's max, then its sums (warp shuffles only, no block barrier per row)
  for (int r = warp; r < R; r += warps) {
    acc_t mx = -inf;
    for (int k = lane; k < n; k += kWarp) mx = max(mx, static_cast<acc_t>(stage[r * len + k]));
    mx = warp_reduce(mx, MaxOp{});
    if (lane == 0) chunk_max[r] = mx;
  }
  __syncthreads();  // chunk_max[0] (the student's shift) is read by every warp
  const acc_t hs = shift_of(chunk_max[0]);
  for (int r = warp; r < R; r += warps) {
    const acc_t h = shift_of(chunk_max[r]);
    acc_t s1 = 0, sT = 0, x = 0;
    for (int k = lane; k < n; k += kWarp) {
      const acc_t d = static_cast<acc_t>(stage[r * len + k]) - h;
      const acc_t e = exp(d * invT);
      s1 += exp(d);
      sT += e;
      // teacher: e (x_t - x_s) with both rows shifted by their chunk max (small terms, nothing cancels);
      // only e == 0 contributes 0 (xlogy): a NaN e (a NaN or +inf logit) makes the row's KL NaN, as in torch
      if (r > 0 && e != 0) x += e * (d - (static_cast<acc_t>(stage[k]) - hs));
    }
    s1 = warp_reduce(s1, SumOp{});
    sT = warp_reduce(sT, SumOp{});
    x = warp_reduce(x, SumOp{});
    if (lane == 0) {
      acc_t* rec = records + ((i * chunks + c) * R + r) * kRecord;
      rec[0] = chunk_max[r];
      rec[1] = s1;
      rec[2] = sT;
      rec[3] = x;
    }
  }

  // 3. the last block of row i merges the row's records, chunk by chunk in index order within each lane
  if (!is_last_arrival(counter + 1 + i, static_cast<unsigned int>(chunks))) return;
  const acc_t* row_records = records + i * chunks * R * kRecord;  // record (q, r) at + (q * R + r) * kRecord
  for (int r = warp; r < R; r += warps) {
    acc_t mx = -inf;
    for (int q = lane; q < chunks; q += kWarp)
      mx = max(mx, __ldcg(row_records + (static_cast<int64_t>(q) * R + r) * kRecord));
    mx = warp_reduce(mx, MaxOp{});
    if (lane == 0) row_max[r] = mx;
  }
  __syncthreads();  // row_max[0] is read by every warp
  // With the row's max M_r and the chunk's shift h: sum exp(z - M_r) = exp(h - M_r) * s1 (the same at T), and
  // (z_t - M_t) - (z_s - M_s) = (z_t - h_t) - (z_s - h_s) + (h_t - M_t) - (h_s - M_s), so the KL sum gains
  // sT * ((h_t - M_t) - (h_s - M_s)) before scaling. An all -inf chunk (max -inf, sums 0) adds nothing.
  const acc_t Ms = row_max[0];
  for (int r = warp; r < R; r += warps) {
    const acc_t Mr = row_max[r];
    acc_t s1 = 0, sT = 0, x = 0;
    for (int q = lane; q < chunks; q += kWarp) {
      const acc_t* rec = row_records + (static_cast<int64_t>(q) * R + r) * kRecord;
      const acc_t h = __ldcg(rec);
      // a chunk of -inf logits only adds nothing; a chunk of NaNs has max -inf too (max drops NaN, as fmaxf)
      // but NaN sums, which must reach the row's statistics
      if (h == -inf && __ldcg(rec + 1) == 0) continue;
      const acc_t a1 = exp(h - Mr), aT = exp((h - Mr) * invT), chunk_sT = __ldcg(rec + 2);
      s1 += a1 * __ldcg(rec + 1);
      sT += aT * chunk_sT;
      if (r > 0) {
        const acc_t h_s = shift_of(__ldcg(row_records + static_cast<int64_t>(q) * R * kRecord));
        x += aT * (__ldcg(rec + 3) + chunk_sT * ((h - Mr) - (h_s - Ms)));
      }
    }
    s1 = warp_reduce(s1, SumOp{});
    sT = warp_reduce(sT, SumOp{});
    x = warp_reduce(x, SumOp{});
    if (lane == 0) {
      lse1[r] = log(s1);   // log sum exp(z - M_r)
      lseT[r] = log(sT);   // log sum exp((z - M_r) / T)
      kl_mean[r] = x / sT;  // teacher: sum_k p_t (x_t - x_s), the rows shifted by their maxima
    }
  }
  __syncthreads();  // every source row's merged statistics

  // 4. the row's statistics: CE = lse1 - (z_y - M); KL = T^2 (mean / T + lseT_s - lseT_t)
  const int64_t y = targets[i];
  CUDA_KERNEL_ASSERT(y >= 0 && y < K && "targets: class index out of range");
  if (threadIdx.x < R) {
    const int r = threadIdx.x;
    const acc_t ce = lse1[r] - (static_cast<acc_t>(row(r)[y]) - row_max[r]);
    if (r == 0) {
      sce[i] = ce;
    } else {
      tce[i * M + r - 1] = ce;
      kl[i * M + r - 1] = T * T * (kl_mean[r] * invT + lseT[0] - lseT[r]);
    }
  }

  // 5. the gradient: dL/dz_s = (p^1(z_s) - onehot(y)) / B + alpha T / B * sum_m w_m (p^T(z_s) - p^T(z_m)),
  // this block's chunk from shared memory, the rest of the row from global memory (L2)
  const acc_t* w = weights + i * M;
  acc_t w_total = 0;
  for (int m = 0; m < M; ++m) w_total += w[m];
  const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B), kd_scale = alpha * T * inv_B;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const bool own = k >= k0 && k < k0 + n;
    const auto z = [&](int r) -> acc_t { return static_cast<acc_t>(own ? stage[r * len + (k - k0)] : row(r)[k]); };
    const acc_t xs = z(0) - Ms;
    acc_t teach_sum = 0;
    for (int m = 0; m < M; ++m) teach_sum += w[m] * exp((z(1 + m) - row_max[1 + m]) * invT - lseT[1 + m]);
    const acc_t p1 = exp(xs - lse1[0]) - (k == y ? acc_t(1) : acc_t(0));
    grad[i * K + k] = static_cast<scalar_t>(p1 * inv_B + kd_scale * (w_total * exp(xs * invT - lseT[0]) - teach_sum));
  }

  // 6. the last row to finish reduces loss = (sum_i SCE_i + alpha sum_{i,m} w_im KL_im) / B in a fixed order
  if (!is_last_arrival(counter, static_cast<unsigned int>(B))) return;
  acc_t part = 0;
  for (int r = threadIdx.x; r < B; r += blockDim.x) {
    acc_t kd = 0;
    for (int m = 0; m < M; ++m) kd += weights[static_cast<int64_t>(r) * M + m] * __ldcg(kl + static_cast<int64_t>(r) * M + m);
    part += __ldcg(sce + r) + alpha * kd;
  }
  const acc_t total = block_allreduce(part, red, SumOp{}, acc_t(0));
  if (threadIdx.x == 0) *loss = total * inv_B;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
  const int sms = multiprocessor_count();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "mtkd_logit_kd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TeacherRows<scalar_t> rows{};
    for (int64_t m = 0; m < d.M; ++m) rows.ptr[m] = teachers[m].const_data_ptr<scalar_t>();
    // chunk length: the M + 1 staged rows fit next to the kernel's static arrays; within that, enough chunks per
    // row for kBlocksPerSM blocks per SM, but no chunk under kMinChunk classes (unless K is)
    const int64_t max_len = (kStageLimit - static_shared_bytes<logit_kd_kernel<scalar_t, acc_t>>()) /
                            ((d.M + 1) * static_cast<int64_t>(sizeof(scalar_t)));
    TORCH_CHECK(max_len >= 1, "teacher_logits: too many teachers for the CUDA kernel's shared memory");
    const int64_t wanted = std::min(ceil_div(int64_t{kBlocksPerSM} * sms, d.B), ceil_div(d.K, kMinChunk));
    const int64_t len = ceil_div(d.K, std::max(ceil_div(d.K, max_len), wanted));  // <= max_len
    const int64_t chunks = ceil_div(d.K, len);  // every chunk holds at least one class
    TORCH_CHECK(d.B * chunks < (int64_t{1} << 31), "student_logits: too large for the CUDA kernel");
    // workspace: a record per (row, chunk, source row); counters: [0] rows finished, [1 + i] chunks of row i
    at::Tensor work = at::empty({d.B * chunks * (d.M + 1) * kRecord}, opts);
    at::Tensor counters = at::empty({1 + d.B}, student.options().dtype(at::kInt));
    auto* counter = reinterpret_cast<unsigned int*>(counters.data_ptr<int>());
    C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, counters.nbytes(), stream));
    const size_t stage_bytes = static_cast<size_t>((d.M + 1) * len) * sizeof(scalar_t);
    logit_kd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(d.B * chunks), kThreads, stage_bytes, stream>>>(
        student.const_data_ptr<scalar_t>(), rows, targets.const_data_ptr<int64_t>(), weights.const_data_ptr<acc_t>(),
        static_cast<int>(d.B), static_cast<int>(d.K), static_cast<int>(d.M), static_cast<int>(len),
        static_cast<int>(chunks), static_cast<acc_t>(temperature), static_cast<acc_t>(alpha), work.data_ptr<acc_t>(),
        loss.data_ptr<acc_t>(), kl.data_ptr<acc_t>(), tce.data_ptr<acc_t>(), sce.data_ptr<acc_t>(),
        grad.data_ptr<scalar_t>(), counter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, kl, tce, sce, grad};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mtkd_fast, CUDA, m) { m.impl("logit_kd", &cuda::logit_kd_cuda); }

}  // namespace mtkd
