#pragma once
// Argument checks shared by the CPU and CUDA kernels of the mtkd_fast::* operators (csrc/mtkd_ops.cpp).
// The Python API (mtkd_fast/ops.py) validates and normalises inputs first with messages naming the user's
// argument; these checks guard direct calls of torch.ops.mtkd_fast.* and name the operator's argument.
// No torch/extension.h here: this header is included by nvcc-compiled files too.
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>

namespace mtkd {

inline bool is_float_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The accumulation (and statistics) dtype for inputs of dtype t: float32, or float64 for float64 inputs.
inline c10::ScalarType acc_dtype(c10::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_weights_arg(const char* name, const at::Tensor& w, int64_t B, int64_t M, c10::ScalarType acc,
                              const at::Device& device) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == B && w.size(1) == M, name, ": expected shape [", B, ", ", M,
              "], got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == acc, name, ": expected dtype ", acc, " (the accumulation dtype), got ",
              w.scalar_type());
  TORCH_CHECK(w.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK(w.device() == device, name, ": expected device ", device, ", got ", w.device());
}

// The documented temperature range (mtkd_fast._validation.TEMPERATURE_RANGE, docs/safety.md): T^2 scales the
// KL and alpha*T the gradient, so a huge T overflows (T = 1e30: T^2 is inf in float32) and a tiny one is an
// argmax; NaN fails the range test too (it compares false).
constexpr double kMinTemperature = 1e-2, kMaxTemperature = 1e2;

inline void check_temperature_arg(double temperature) {
  TORCH_CHECK(temperature >= kMinTemperature && temperature <= kMaxTemperature,
              "temperature: expected a number in [", kMinTemperature, ", ", kMaxTemperature, "], got ", temperature);
}

struct LogitDims {
  int64_t B, K, M;
};

// The student logits [B, K], the M teachers' logits (each like the student's) and the targets [B]: the checks
// logit_kd and agent_stats share (after each has checked the student's own shape).
inline LogitDims check_logits_and_targets(const at::Tensor& student, at::TensorList teachers,
                                          const at::Tensor& targets) {
  TORCH_CHECK(is_float_dtype(student.scalar_type()), "student_logits: expected a floating dtype, got ",
              student.scalar_type());
  TORCH_CHECK(student.is_contiguous(), "student_logits: expected a contiguous tensor");
  const int64_t B = student.size(0), K = student.size(1), M = static_cast<int64_t>(teachers.size());
  TORCH_CHECK(M >= 1, "teacher_logits: expected at least one teacher");
  for (int64_t m = 0; m < M; ++m) {
    const auto& t = teachers[m];
    TORCH_CHECK(t.sizes() == student.sizes(), "teacher_logits[", m, "]: expected shape ", student.sizes(),
                " like student_logits, got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == student.scalar_type(), "teacher_logits[", m, "]: expected dtype ",
                student.scalar_type(), " like student_logits, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "teacher_logits[", m, "]: expected a contiguous tensor");
    TORCH_CHECK(t.device() == student.device(), "teacher_logits[", m, "]: expected device ", student.device(),
                ", got ", t.device());
  }
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == B, "targets: expected shape [", B, "], got ",
              targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets: expected dtype int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.is_contiguous() && targets.device() == student.device(),
              "targets: expected a contiguous tensor on ", student.device());
  return {B, K, M};
}

inline LogitDims check_logit_kd_args(const at::Tensor& student, at::TensorList teachers, const at::Tensor& targets,
                                     const at::Tensor& weights, double temperature) {
  TORCH_CHECK(student.dim() == 2 && student.size(0) >= 1 && student.size(1) >= 2,
              "student_logits: expected shape [B, K] with B >= 1 and K >= 2, got ", student.sizes());
  const auto [B, K, M] = check_logits_and_targets(student, teachers, targets);
  check_weights_arg("weights", weights, B, M, acc_dtype(student.scalar_type()), student.device());
  check_temperature_arg(temperature);
  return {B, K, M};
}

// Map layouts the pooled-cosine kernels walk: NCHW contiguous or channels_last.
inline bool is_channels_last_map(const at::Tensor& g) {
  return !g.is_contiguous() && g.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// Two tensors of one shape that one flat index walks alike: equal strides on every dimension of size > 1
// (a size-1 dimension's stride is never used, so e.g. a channels_last [B, C, 1, 1] map and a contiguous one
// agree).
inline bool same_walk(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// The teacher embeddings feature_kd pools against (its optional cosine output): one [B, C_m] tensor per map,
// in the accumulation dtype and contiguous (like the weights), each map NCHW-contiguous or channels_last.
inline void check_feature_kd_embeddings(at::TensorList students, at::TensorList embeddings, double eps) {
  const int64_t M = static_cast<int64_t>(students.size());
  TORCH_CHECK(static_cast<int64_t>(embeddings.size()) == M, "teacher_embeddings: expected ", M,
              " embeddings (one per map), got ", embeddings.size());
  const auto acc = acc_dtype(students[0].scalar_type());
  for (int64_t m = 0; m < M; ++m) {
    const auto &g = students[m], &e = embeddings[m];
    TORCH_CHECK(g.is_contiguous() || g.is_contiguous(at::MemoryFormat::ChannelsLast), "student_maps[", m,
                "]: expected a contiguous or channels_last map when teacher_embeddings are given");
    TORCH_CHECK(e.dim() == 2 && e.size(0) == g.size(0) && e.size(1) == g.size(1), "teacher_embeddings[", m,
                "]: expected shape [", g.size(0), ", ", g.size(1), "], got ", e.sizes());
    TORCH_CHECK(e.scalar_type() == acc && e.is_contiguous(), "teacher_embeddings[", m,
                "]: expected a contiguous tensor of dtype ", acc, " (the accumulation dtype), got ", e.scalar_type());
    TORCH_CHECK(e.device() == g.device(), "teacher_embeddings[", m, "]: expected device ", g.device(), ", got ",
                e.device());
  }
  TORCH_CHECK(eps >= 0, "eps: expected a non-negative number, got ", eps);
}

// Each sample's C*H*W values are dense (contiguous or channels_last map) and the teacher map shares the
// student map's strides, so one flat index walks both; the optional embeddings as above.
inline int64_t check_feature_kd_args(at::TensorList students, at::TensorList teachers, const at::Tensor& weights,
                                     const std::optional<at::TensorList>& embeddings, double eps) {
  const int64_t M = static_cast<int64_t>(students.size());
  TORCH_CHECK(M >= 1, "student_maps: expected at least one map");
  TORCH_CHECK(static_cast<int64_t>(teachers.size()) == M, "teacher_maps: expected ", M, " maps, got ",
              teachers.size());
  const int64_t B = students[0].dim() == 4 ? students[0].size(0) : -1;
  for (int64_t m = 0; m < M; ++m) {
    const auto &g = students[m], &f = teachers[m];
    TORCH_CHECK(g.dim() == 4 && g.size(0) == B, "student_maps[", m, "]: expected shape [", B,
                ", C, H, W], got ", g.sizes());
    TORCH_CHECK(f.sizes() == g.sizes(), "teacher_maps[", m, "]: expected shape ", g.sizes(), ", got ", f.sizes());
    TORCH_CHECK(is_float_dtype(g.scalar_type()), "student_maps[", m, "]: expected a floating dtype, got ",
                g.scalar_type());
    TORCH_CHECK(g.scalar_type() == students[0].scalar_type() && f.scalar_type() == g.scalar_type(),
                "teacher_maps[", m, "]: expected dtype ", students[0].scalar_type(), " like student_maps[0]");
    TORCH_CHECK(g.device() == students[0].device() && f.device() == g.device(), "teacher_maps[", m,
                "]: expected device ", students[0].device());
    const int64_t per_sample = g.size(1) * g.size(2) * g.size(3);
    TORCH_CHECK(g.is_non_overlapping_and_dense() && (g.size(0) <= 1 || per_sample == 0 || g.stride(0) == per_sample),
                "student_maps[", m, "]: expected each sample's values dense (contiguous or channels_last)");
    TORCH_CHECK(same_walk(f, g), "teacher_maps[", m, "]: expected the strides of student_maps[", m, "] ",
                g.strides(), " (size-1 dimensions aside), got ", f.strides());
  }
  check_weights_arg("weights", weights, B, M, acc_dtype(students[0].scalar_type()), students[0].device());
  if (embeddings.has_value()) check_feature_kd_embeddings(students, *embeddings, eps);
  return B;
}

inline int64_t check_pooled_cosine_args(at::TensorList maps, at::TensorList embeddings, double eps) {
  const int64_t M = static_cast<int64_t>(maps.size());
  TORCH_CHECK(M >= 1, "student_maps: expected at least one map");
  TORCH_CHECK(static_cast<int64_t>(embeddings.size()) == M, "teacher_embeddings: expected ", M,
              " embeddings, got ", embeddings.size());
  const int64_t B = maps[0].dim() == 4 ? maps[0].size(0) : -1;
  for (int64_t m = 0; m < M; ++m) {
    const auto &g = maps[m], &e = embeddings[m];
    TORCH_CHECK(g.dim() == 4 && g.size(0) == B, "student_maps[", m, "]: expected shape [", B, ", C, H, W], got ",
                g.sizes());
    TORCH_CHECK(is_float_dtype(g.scalar_type()) && g.scalar_type() == maps[0].scalar_type(), "student_maps[", m,
                "]: expected the floating dtype of student_maps[0]");
    TORCH_CHECK(g.is_contiguous() || g.is_contiguous(at::MemoryFormat::ChannelsLast), "student_maps[", m,
                "]: expected a contiguous or channels_last map");
    TORCH_CHECK(e.dim() == 2 && e.size(0) == B && e.size(1) == g.size(1), "teacher_embeddings[", m,
                "]: expected shape [", B, ", ", g.size(1), "], got ", e.sizes());
    TORCH_CHECK(e.scalar_type() == g.scalar_type() && e.is_contiguous(), "teacher_embeddings[", m,
                "]: expected a contiguous tensor of dtype ", g.scalar_type());
    TORCH_CHECK(g.device() == maps[0].device() && e.device() == g.device(), "teacher_embeddings[", m,
                "]: expected device ", maps[0].device());
  }
  TORCH_CHECK(eps >= 0, "eps: expected a non-negative number, got ", eps);
  return B;
}

// mtkd_fast::agent_stats: logits as for logit_kd (B may be 0; no weights); student_maps either empty (no
// cosine: cos is 0) or one map per teacher, of the logits' dtype, each [B, C_m, H_m, W_m] contiguous or
// channels_last, with one teacher embedding [B, C_m] per map in the accumulation dtype, contiguous.
inline LogitDims check_agent_stats_args(const at::Tensor& student, at::TensorList teachers, const at::Tensor& targets,
                                        at::TensorList maps, at::TensorList embeddings, double temperature,
                                        double eps) {
  TORCH_CHECK(student.dim() == 2 && student.size(1) >= 2,
              "student_logits: expected shape [B, K] with K >= 2, got ", student.sizes());
  const auto [B, K, M] = check_logits_and_targets(student, teachers, targets);
  check_temperature_arg(temperature);
  TORCH_CHECK(eps >= 0, "eps: expected a non-negative number, got ", eps);
  const int64_t n_maps = static_cast<int64_t>(maps.size());
  TORCH_CHECK(n_maps == 0 || n_maps == M, "student_maps: expected ", M, " maps (one per teacher) or none, got ",
              n_maps);
  TORCH_CHECK(static_cast<int64_t>(embeddings.size()) == n_maps, "teacher_embeddings: expected ", n_maps,
              " embeddings (one per map), got ", embeddings.size());
  const auto acc = acc_dtype(student.scalar_type());
  for (int64_t m = 0; m < n_maps; ++m) {
    const auto &g = maps[m], &e = embeddings[m];
    TORCH_CHECK(g.dim() == 4 && g.size(0) == B, "student_maps[", m, "]: expected shape [", B, ", C, H, W], got ",
                g.sizes());
    TORCH_CHECK(g.scalar_type() == student.scalar_type(), "student_maps[", m, "]: expected dtype ",
                student.scalar_type(), " like student_logits, got ", g.scalar_type());
    TORCH_CHECK(g.is_contiguous() || g.is_contiguous(at::MemoryFormat::ChannelsLast), "student_maps[", m,
                "]: expected a contiguous or channels_last map");
    TORCH_CHECK(g.device() == student.device(), "student_maps[", m, "]: expected device ", student.device(),
                ", got ", g.device());
    TORCH_CHECK(e.dim() == 2 && e.size(0) == B && e.size(1) == g.size(1), "teacher_embeddings[", m,
                "]: expected shape [", B, ", ", g.size(1), "], got ", e.sizes());
    TORCH_CHECK(e.scalar_type() == acc && e.is_contiguous(), "teacher_embeddings[", m,
                "]: expected a contiguous tensor of dtype ", acc, " (the accumulation dtype), got ", e.scalar_type());
    TORCH_CHECK(e.device() == student.device(), "teacher_embeddings[", m, "]: expected device ", student.device(),
                ", got ", e.device());
  }
  return {B, K, M};
}

inline void check_reward_args(const at::Tensor& sce, const at::Tensor& kl, const at::Tensor& wl,
                              const std::optional<at::Tensor>& mse, const std::optional<at::Tensor>& wf) {
  TORCH_CHECK(kl.dim() == 2, "kl: expected shape [B, M], got ", kl.sizes());
  const int64_t B = kl.size(0), M = kl.size(1);
  const auto acc = kl.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "kl: expected float32 or float64, got ", acc);
  TORCH_CHECK(kl.is_contiguous(), "kl: expected a contiguous tensor");
  TORCH_CHECK(sce.dim() == 1 && sce.size(0) == B && sce.scalar_type() == acc && sce.is_contiguous() &&
                  sce.device() == kl.device(),
              "student_ce: expected a contiguous [", B, "] tensor of dtype ", acc, " on ", kl.device());
  check_weights_arg("logit_weights", wl, B, M, acc, kl.device());
  TORCH_CHECK(mse.has_value() == wf.has_value(), "mse, feature_weights: give both or neither");
  if (mse.has_value()) {
    check_weights_arg("mse", *mse, B, M, acc, kl.device());
    check_weights_arg("feature_weights", *wf, B, M, acc, kl.device());
  }
}

}  // namespace mtkd
