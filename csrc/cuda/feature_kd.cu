// CUDA kernel of mtkd_fast::feature_kd: all M (student map, teacher map) pairs in ONE launch. The teachers'
// pointers travel in the kernel parameters (a multi-tensor-apply pattern); the grid is the concatenation of
// every teacher's (sample, chunk) blocks. Each block reads its chunk of G and F once, writes dloss/dG and a
// partial sum of squares; the last block of each (sample, teacher) sums that task's partials in a fixed order
// (deterministic MSE), and the last of those the scalar loss. Given the teacher embeddings, blocks take whole channels instead
// and also pool them for the agent state's cosine (docs/method.md section 2) from the same read of the maps.
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
constexpr int kWarps = kThreads / kWarp;
constexpr int64_t kChunk = 8192;  // values of one sample handled by one block
// With the cosine, a block handles whole channels (their means need every value of the channel). For an
// NCHW map a warp walks one channel row when a row is short (up to kChunk / kWarps values, so a block has
// at least one row per warp), and the whole block walks it when rows are longer.
constexpr int64_t kWarpRowMax = kChunk / kWarps;

enum class Walk : int { kFlat, kWarpRows, kBlockRows, kChannelsLast };

template <typename scalar_t, typename acc_t>
struct FeatureArgs {
  const scalar_t* g[kMaxTeachers];
  const scalar_t* f[kMaxTeachers];
  scalar_t* out[kMaxTeachers];
  const acc_t* emb[kMaxTeachers];    // teacher embeddings [B, C_m] (kFlat: unused)
  int64_t numel[kMaxTeachers];       // C_m * H_m * W_m: one sample's values (dense, sample-major)
  int64_t channels[kMaxTeachers];
  int64_t spatial[kMaxTeachers];     // H_m * W_m
  int64_t chunk[kMaxTeachers];       // per block: values (kFlat) or channels (the cosine walks)
  int64_t chunks[kMaxTeachers];      // blocks per sample
  int64_t block_start[kMaxTeachers + 1];  // first block of teacher m
  Walk walk[kMaxTeachers];
  bool vectorised[kMaxTeachers];     // kFlat: 16-byte aligned and numel a multiple of the pack size
};

// One value: accumulate its squared difference (and, for the cosine, the channel sum) and write dloss/dG.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t visit(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                       scalar_t* __restrict__ out, int64_t j, acc_t coef, acc_t& s) {
  const acc_t gv = static_cast<acc_t>(g[j]);
  const acc_t d = gv - static_cast<acc_t>(f[j]);
  s += d * d;
  out[j] = static_cast<scalar_t>(coef * d);
  return gv;
}

// Adds channel c's mean x (and the embedding value) to this thread's cosine partial sums.
template <typename acc_t>
__device__ __forceinline__ void add_cos_terms(acc_t x, acc_t e, acc_t& dot, acc_t& xx, acc_t& ee) {
  dot += x * e;
  xx += x * x;
  ee += e * e;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) feature_kd_kernel(FeatureArgs<scalar_t, acc_t> args,
                                                             const acc_t* __restrict__ weights, int B, int M,
                                                             acc_t beta, acc_t eps, acc_t* __restrict__ partial,
                                                             acc_t* __restrict__ mse, acc_t* __restrict__ cos,
                                                             acc_t* __restrict__ loss, unsigned int* counter) {
  __shared__ acc_t red[kWarp];
  constexpr int kPack = 16 / sizeof(scalar_t);
  const int64_t block = blockIdx.x, blocks = gridDim.x;
  int m = 0;
  while (m + 1 < M && block >= args.block_start[m + 1]) ++m;
  const int64_t local = block - args.block_start[m];
  const int64_t i = local / args.chunks[m], chunk = local % args.chunks[m];
  const int64_t n = args.numel[m];
  const int64_t off = i * n;
  const scalar_t* __restrict__ g = args.g[m] + off;
  const scalar_t* __restrict__ f = args.f[m] + off;
  scalar_t* __restrict__ out = args.out[m] + off;
  const acc_t coef = acc_t(2) * beta * weights[i * M + m] / (static_cast<acc_t>(B) * static_cast<acc_t>(n));
  const Walk walk = args.walk[m];  // uniform over the block

  acc_t s = 0, dot = 0, xx = 0, ee = 0;
  if (walk == Walk::kFlat) {
    const int64_t begin = chunk * args.chunk[m], end = min(n, begin + args.chunk[m]);
    if (args.vectorised[m]) {  // the chunk and numel are multiples of kPack: whole packs only
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
      for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) visit(g, f, out, j, coef, s);
    }
  } else {
    const int64_t C = args.channels[m], HW = args.spatial[m];
    const int64_t c0 = chunk * args.chunk[m], c1 = min(C, c0 + args.chunk[m]);
    const acc_t* __restrict__ e = args.emb[m] + i * C;
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
    if (walk == Walk::kChannelsLast) {
      // the block's Cb <= kThreads channels: R = kThreads / Cb rows of Cb threads split the pixels, adjacent
      // threads on adjacent channels (coalesced), so small C neither idles threads nor walks H*W serially
      __shared__ acc_t part[kThreads];
      const int64_t Cb = c1 - c0, R = kThreads / Cb, cc = threadIdx.x % Cb, r = threadIdx.x / Cb;
      acc_t sum = 0;
      if (r < R)
        for (int64_t p = r; p < HW; p += R) sum += visit(g, f, out, p * C + c0 + cc, coef, s);
      part[threadIdx.x] = sum;
      __syncthreads();
      if (threadIdx.x < Cb) {
        acc_t total = 0;
        for (int64_t q = 0; q < R; ++q) total += part[q * Cb + threadIdx.x];
        add_cos_terms(total * inv_hw, e[c0 + threadIdx.x], dot, xx, ee);
      }
    } else if (walk == Walk::kWarpRows) {  // a warp per channel row (NCHW)
      const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
      for (int64_t c = c0 + warp; c < c1; c += blockDim.x / kWarp) {
        acc_t sum = 0;
        for (int64_t p = lane; p < HW; p += kWarp) sum += visit(g, f, out, c * HW + p, coef, s);
        sum = warp_reduce(sum, SumOp{});
        if (lane == 0) add_cos_terms(sum * inv_hw, e[c], dot, xx, ee);
      }
    } else {  // kBlockRows: the block walks each (long) channel row (NCHW)
      for (int64_t c = c0; c < c1; ++c) {
        acc_t sum = 0;
        for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) sum += visit(g, f, out, c * HW + p, coef, s);
        sum = block_allreduce(sum, red, SumOp{}, acc_t(0));
        if (threadIdx.x == 0) add_cos_terms(sum * inv_hw, e[c], dot, xx, ee);
      }
    }
  }
  s = block_allreduce(s, red, SumOp{}, acc_t(0));
  if (walk != Walk::kFlat) {
    dot = block_allreduce(dot, red, SumOp{}, acc_t(0));
    xx = block_allreduce(xx, red, SumOp{}, acc_t(0));
    ee = block_allreduce(ee, red, SumOp{}, acc_t(0));
  }
  if (threadIdx.x == 0) {  // workspace: [s | dot | xx | ee] per block
    partial[block] = s;
    if (walk != Walk::kFlat) {
      partial[blocks + block] = dot;
      partial[2 * blocks + block] = xx;
      partial[3 * blocks + block] = ee;
    }
  }

  // the last block of each (sample, teacher) sums that task's partials in a fixed order (deterministic), and
  // the last of those the scalar loss: no single block walks every partial
  const int64_t task = i * M + m;
  if (!is_last_arrival(counter + 1 + task, static_cast<unsigned int>(args.chunks[m]))) return;
  if (threadIdx.x == 0) {
    const int64_t first = args.block_start[m] + i * args.chunks[m];
    acc_t total = 0, d = 0, x2 = 0, e2 = 0;
    for (int64_t c = 0; c < args.chunks[m]; ++c) total += __ldcg(partial + first + c);
    mse[task] = n > 0 ? total / static_cast<acc_t>(n) : acc_t(0);
    if (walk != Walk::kFlat) {
      for (int64_t c = 0; c < args.chunks[m]; ++c) {
        d += __ldcg(partial + blocks + first + c);
        x2 += __ldcg(partial + 2 * blocks + first + c);
        e2 += __ldcg(partial + 3 * blocks + first + c);
      }
      cos[task] = (d / max(sqrt(x2), eps)) / max(sqrt(e2), eps);
    } else if (cos != nullptr) {
      // an empty map, as pooled_cosine and the reference: H*W = 0 has no mean (NaN), C = 0 gives 0
      cos[task] = args.spatial[m] == 0 && args.channels[m] > 0 ? acc_t(NAN) : acc_t(0);
    }
  }
  if (!is_last_arrival(counter, static_cast<unsigned int>(static_cast<int64_t>(B) * M))) return;
  acc_t part = 0;
  for (int64_t t = threadIdx.x; t < static_cast<int64_t>(B) * M; t += blockDim.x) part += weights[t] * __ldcg(mse + t);
  part = block_allreduce(part, red, SumOp{}, acc_t(0));
  if (threadIdx.x == 0) *loss = beta * part / static_cast<acc_t>(B);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> feature_kd_cuda(
    at::TensorList students, at::TensorList teachers, const at::Tensor& weights, double beta,
    std::optional<at::TensorList> embeddings, double eps) {
  const int64_t B = check_feature_kd_args(students, teachers, weights, embeddings, eps);
  const int64_t M = static_cast<int64_t>(students.size());
  const bool with_cos = embeddings.has_value();
  TORCH_CHECK(M <= kMaxTeachers, "student_maps: the CUDA kernel takes at most ", kMaxTeachers, " maps, got ", M);
  c10::cuda::CUDAGuard guard(students[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = students[0].scalar_type();
  const auto opts = students[0].options().dtype(acc_dtype(dtype));
  at::Tensor loss = at::empty({}, opts), mse = at::empty({B, M}, opts);
  at::Tensor cos = with_cos ? at::empty({B, M}, opts) : at::empty({0}, opts);
  std::vector<at::Tensor> grads;
  for (int64_t m = 0; m < M; ++m) grads.push_back(at::empty_like(students[m]));
  if (B == 0) {  // no empty launches: the mean over no samples is 0
    loss.zero_();
    return {loss, mse, cos, grads};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mtkd_feature_kd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t kPack = 16 / sizeof(scalar_t);
    FeatureArgs<scalar_t, acc_t> args{};
    int64_t blocks = 0;
    for (int64_t m = 0; m < M; ++m) {
      const int64_t n = students[m].numel() / B, C = students[m].size(1), HW = students[m].size(2) * students[m].size(3);
      args.g[m] = students[m].const_data_ptr<scalar_t>();
      args.f[m] = teachers[m].const_data_ptr<scalar_t>();
      args.out[m] = grads[m].data_ptr<scalar_t>();
      args.numel[m] = n;
      args.channels[m] = C;
      args.spatial[m] = HW;
      if (!with_cos || n == 0) {
        args.walk[m] = Walk::kFlat;
        args.chunk[m] = kChunk;
        args.chunks[m] = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
        args.vectorised[m] = n % kPack == 0 && aligned16(args.g[m]) && aligned16(args.f[m]) && aligned16(args.out[m]);
        if (with_cos) args.emb[m] = nullptr;
      } else {
        args.emb[m] = (*embeddings)[m].const_data_ptr<acc_t>();
        int64_t per_block;
        if (is_channels_last_map(students[m])) {
          args.walk[m] = Walk::kChannelsLast;
          // about kThreads channels per block, spread evenly over the blocks of a sample
          per_block = (C + (C + kThreads - 1) / kThreads - 1) / ((C + kThreads - 1) / kThreads);
        } else {
          args.walk[m] = HW <= kWarpRowMax ? Walk::kWarpRows : Walk::kBlockRows;
          per_block = std::max<int64_t>(1, kChunk / HW);
        }
        args.chunk[m] = std::min(C, per_block);
        args.chunks[m] = (C + args.chunk[m] - 1) / args.chunk[m];
      }
      args.block_start[m] = blocks;
      blocks += B * args.chunks[m];
    }
    args.block_start[M] = blocks;
    TORCH_CHECK(blocks < (int64_t{1} << 31), "student_maps: too large for the CUDA kernel");
    // workspace: per block the partial sum of squares (and, for the cosine, of dot, |x|^2, |e|^2), then the
    // arrival counters: one for the loss, one per (sample, teacher)
    const int64_t parts = with_cos ? 4 : 1;
    at::Tensor work = at::empty({parts * blocks}, opts);
    acc_t* partial = work.data_ptr<acc_t>();
    at::Tensor counters = at::empty({1 + B * M}, opts.dtype(at::kInt));
    auto* counter = reinterpret_cast<unsigned int*>(counters.data_ptr<int>());
    C10_CUDA_CHECK(cudaMemsetAsync(counter, 0, counters.nbytes(), stream));
    feature_kd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        args, weights.const_data_ptr<acc_t>(), static_cast<int>(B), static_cast<int>(M), static_cast<acc_t>(beta),
        static_cast<acc_t>(eps), partial, mse.data_ptr<acc_t>(), with_cos ? cos.data_ptr<acc_t>() : nullptr,
        loss.data_ptr<acc_t>(), counter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, mse, cos, grads};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mtkd_fast, CUDA, m) { m.impl("feature_kd", &cuda::feature_kd_cuda); }

}  // namespace mtkd
