"""LiveTeachers: frozen teachers' outputs usable as constants in the student's graph."""

import pytest
import torch
from standins import TinyNet

from mtkd_fast.teachers import LiveTeachers, TeacherOutputs


def test_live_teachers_outputs_and_frozen_state():
    torch.manual_seed(0)
    nets = [TinyNet(width=4, stride=1), TinyNet(width=6, stride=1)]
    live = LiveTeachers(nets, precision="fp32", fold_bn=False)
    live.train()  # a trainer calling .train() must not unfreeze the teachers' batch norm
    assert all(not n.training for n in nets)
    x = torch.randn(3, 3, 8, 8)
    out = live(x, torch.arange(3), 0)
    assert isinstance(out, TeacherOutputs) and live.num_teachers == 2
    assert out.logits.shape == (2, 3, 5)
    assert [m.shape for m in out.feature_maps] == [(3, 4, 8, 8), (3, 6, 8, 8)]
    for m, n in enumerate(nets):
        feats, z = n(x, is_feat=True)
        torch.testing.assert_close(out.logits[m], z)
        torch.testing.assert_close(out.embeddings[m], feats[-1])
    assert not any(p.requires_grad for p in live.parameters())
    # usable as constants in autograd (not inference tensors)
    w = torch.randn(5, requires_grad=True)
    (out.logits * w).sum().backward()
    assert w.grad is not None


def test_live_teachers_needs_two():
    with pytest.raises(ValueError, match="teachers"):
        LiveTeachers([TinyNet(width=4, stride=1)])
