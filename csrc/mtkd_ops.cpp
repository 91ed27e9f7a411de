// The mtkd_fast::* operator schemas (one place for all of them). The kernels live in csrc/cpu/*.cpp
// (TORCH_LIBRARY_IMPL(mtkd_fast, CPU, ...)) and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(mtkd_fast, CUDA, ...));
// fake (meta) implementations and autograd are registered in Python (mtkd_fast/ops.py).
//
// Conventions shared by every kernel:
// - statistics (loss, kl, ce, mse, cos, reward) come out in the accumulation type: float32 for
//   float16/bfloat16/float32 inputs, float64 for float64 inputs;
// - gradients come out in the dtype (and, for maps, the memory layout) of the input they belong to;
// - weights [B, M] are passed in the accumulation type, contiguous (ops.py converts them).
#include <torch/library.h>

TORCH_LIBRARY(mtkd_fast, m) {
  // Logit distillation, docs/method.md sections 2-3, one pass over each row:
  //   loss = mean_i SCE_i + alpha * sum_m mean_i(w_im * KL_im)
  // returns (loss [], kl [B, M], teacher_ce [B, M], student_ce [B], grad_student [B, K] = dloss/dz_s).
  // student_logits [B, K] and each teacher_logits[m] [B, K] contiguous and of one dtype; targets [B] int64.
  m.def(
      "logit_kd(Tensor student_logits, Tensor[] teacher_logits, Tensor targets, Tensor weights, "
      "float temperature, float alpha) -> (Tensor loss, Tensor kl, Tensor teacher_ce, Tensor student_ce, "
      "Tensor grad_student)");
  // Feature distillation of all M (student map, teacher map) pairs in one pass (one launch on CUDA):
  //   loss = beta * sum_m mean_i(w_im * MSE_im)
  // returns (loss [], mse [B, M], cos, grad_student_maps: M tensors, each shaped and laid out like its map).
  // Pair m may have its own [B, C_m, H_m, W_m]; each sample's C*H*W values must be dense (contiguous or
  // channels_last) and the teacher map must have the student map's strides.
  // Given teacher_embeddings (M tensors [B, C_m] in the accumulation dtype; maps contiguous or
  // channels_last), cos [B, M] is pooled_cosine(student_maps, teacher_embeddings, eps) from the same read
  // of the maps (no gradient); without them cos is an empty [0] tensor.
  m.def(
      "feature_kd(Tensor[] student_maps, Tensor[] teacher_maps, Tensor weights, float beta, "
      "Tensor[]? teacher_embeddings=None, float eps=1e-08) -> "
      "(Tensor loss, Tensor mse, Tensor cos, Tensor[] grad_student_maps)");
  // COS_{i,m}: cosine similarity of the spatially averaged student map m [B, C_m] with the teacher
  // embedding m [B, C_m], each norm clamped below by eps (as torch.nn.functional.cosine_similarity). [B, M].
  m.def("pooled_cosine(Tensor[] student_maps, Tensor[] teacher_embeddings, float eps) -> Tensor");
  m.def(
      "pooled_cosine_backward(Tensor grad, Tensor[] student_maps, Tensor[] teacher_embeddings, float eps) -> "
      "(Tensor[] grad_student_maps, Tensor[] grad_teacher_embeddings)");
  // The agent state's statistics (docs/method.md section 2), computed before the teacher weights exist, no gradients:
  // kl [B, M] and teacher_ce [B, M] as logit_kd's, cos [B, M] as pooled_cosine(student_maps,
  // teacher_embeddings, eps). Logits as for logit_kd (B may be 0); student_maps either empty (cos is then 0)
  // or one per teacher, of the logits' dtype, contiguous or channels_last; teacher_embeddings [B, C_m] in the
  // accumulation dtype, contiguous. One pass over each tensor family (one launch each on CUDA).
  m.def(
      "agent_stats(Tensor student_logits, Tensor[] teacher_logits, Tensor targets, Tensor[] student_maps, "
      "Tensor[] teacher_embeddings, float temperature, float eps) -> (Tensor kl, Tensor teacher_ce, Tensor cos)");
  // docs/method.md section 5: l_i = SCE_i + alpha sum_m wl_im KL_im + beta sum_m wf_im MSE_im and
  // r_hat = clamp((r - mean r) / std r, 0, 1) with r = -l (Bessel's std; 0 for B < 2 or std 0).
  m.def(
      "per_sample_loss_reward(Tensor student_ce, Tensor kl, Tensor logit_weights, Tensor? mse, "
      "Tensor? feature_weights, float alpha, float beta) -> (Tensor per_sample_loss, Tensor reward)");
}
