"""LiveTeachers: frozen teachers' outputs usable as constants in the student's graph."""

import pytest
import torch
from torch import nn

from mtkd_fast.teachers import LiveTeachers, TeacherOutputs


class TinyNet(nn.Module):
    def __init__(self, channels, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x, is_feat=False):
        f = torch.relu(self.bn(self.conv(x)))
        e = f.mean(dim=(2, 3))
        z = self.fc(e)
        return ([f, e], z) if is_feat else z


def test_live_teachers_outputs_and_frozen_state():
    torch.manual_seed(0)
    nets = [TinyNet(4), TinyNet(6)]
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
        LiveTeachers([TinyNet(4)])
