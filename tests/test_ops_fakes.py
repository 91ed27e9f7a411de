"""The fake (meta) kernels of the mtkd_fast::* ops check the shapes the kernels assume, so a wrong shape on meta
tensors or under torch.compile fails with a message naming the input, and right shapes give the outputs' shapes."""

import pytest
import torch

from mtkd_fast import ops

pytestmark = pytest.mark.skipif(not ops.available("cpu"), reason="needs the compiled extension")
MS = "meta"


def _e(*shape, dtype=torch.float32):
    return torch.empty(*shape, device=MS, dtype=dtype)


def _logits(B=3, K=5, M=2):
    return _e(B, K), [_e(B, K) for _ in range(M)], _e(B, dtype=torch.long), _e(B, M)


def test_registered_only_as_module_level_functions():
    assert not hasattr(ops, "_register")
    assert set(ops._REGISTRATIONS) == set(ops.OP_NAMES)


def test_logit_kd_fake_shapes_and_checks():
    zs, zt, y, w = _logits()
    out = torch.ops.mtkd_fast.logit_kd(zs, zt, y, w, 4.0, 1.0)
    assert [tuple(t.shape) for t in out] == [(), (3, 2), (3, 2), (3,), (3, 5)]
    with pytest.raises(RuntimeError, match=r"teacher_logits\[1\]: expected shape \[B, K\] = \[3, 5\]"):
        torch.ops.mtkd_fast.logit_kd(zs, [zt[0], _e(3, 4)], y, w, 4.0, 1.0)
    with pytest.raises(RuntimeError, match=r"weights: expected shape \[B, M\] = \[3, 2\]"):
        torch.ops.mtkd_fast.logit_kd(zs, zt, y, _e(2, 3), 4.0, 1.0)
    with pytest.raises(RuntimeError, match=r"targets: expected shape \[B\]"):
        torch.ops.mtkd_fast.logit_kd(zs, zt, _e(4, dtype=torch.long), w, 4.0, 1.0)


def test_feature_kd_and_cosine_fakes_check_maps():
    g = [_e(3, 4, 2, 2), _e(3, 6, 1, 3)]
    emb = [_e(3, 4), _e(3, 6)]
    loss, mse, cos, grads = torch.ops.mtkd_fast.feature_kd(g, g, _e(3, 2), 1.0, emb, 1e-8)
    assert mse.shape == cos.shape == (3, 2) and [t.shape for t in grads] == [t.shape for t in g]
    with pytest.raises(RuntimeError, match=r"student_maps\[1\]: expected batch size 3, got 2"):
        torch.ops.mtkd_fast.feature_kd([g[0], _e(2, 6, 1, 3)], g, _e(3, 2), 1.0, None, 1e-8)
    with pytest.raises(RuntimeError, match=r"teacher_maps\[1\]: expected shape \(3, 6, 1, 3\)"):
        torch.ops.mtkd_fast.feature_kd(g, [g[0], _e(3, 6, 3, 1)], _e(3, 2), 1.0, None, 1e-8)
    with pytest.raises(RuntimeError, match=r"weights: expected shape \[B, M\] = \[3, 2\]"):
        torch.ops.mtkd_fast.feature_kd(g, g, _e(3, 3), 1.0, None, 1e-8)
    with pytest.raises(RuntimeError, match=r"teacher_embeddings\[1\]: expected shape \(3, 6\)"):
        torch.ops.mtkd_fast.pooled_cosine(g, [emb[0], _e(3, 5)], 1e-8)


def test_agent_stats_and_reward_fakes_check_shapes():
    zs, zt, y, w = _logits()
    with pytest.raises(RuntimeError, match=r"student_maps: expected 2 maps"):
        torch.ops.mtkd_fast.agent_stats(zs, zt, y, [_e(3, 4, 2, 2)], [_e(3, 4)], 4.0, 1e-8)
    with pytest.raises(RuntimeError, match=r"student_maps\[0\]: expected batch size 3"):
        torch.ops.mtkd_fast.agent_stats(zs, zt, y, [_e(2, 4, 2, 2)] * 2, [_e(2, 4)] * 2, 4.0, 1e-8)
    loss, reward = torch.ops.mtkd_fast.per_sample_loss_reward(_e(3), _e(3, 2), w, _e(3, 2), _e(3, 2), 1.0, 1.0)
    assert loss.shape == reward.shape == (3,)
    with pytest.raises(RuntimeError, match=r"feature_weights: expected shape \[B, M\] = \[3, 2\]"):
        torch.ops.mtkd_fast.per_sample_loss_reward(_e(3), _e(3, 2), w, _e(3, 2), _e(3, 1), 1.0, 1.0)
