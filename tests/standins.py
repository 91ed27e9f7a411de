"""Small stand-in models, feature transfer and teacher source for the trainer tests (no tests here).

They follow the interfaces the trainer relies on (``model(x, is_feat=True) -> (feats, logits)``, a feature
transfer mapping the student's last map to one map per teacher, a ``TeacherSource``) and are tiny, so a
training step costs milliseconds on CPU.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mtkd_fast.teachers import TeacherOutputs


class TinyNet(nn.Module):
    """conv-BN-ReLU, strided conv-BN-ReLU (the last map), pooled embedding, dropout, linear classifier."""

    def __init__(self, num_classes=5, width=6, stride=2, dropout=0.1, norm=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(4, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width) if norm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x, is_feat=False):
        f1 = F.relu(self.bn1(self.conv1(x)))
        f2 = F.relu(self.bn2(self.conv2(f1)))
        emb = f2.mean(dim=(2, 3))
        logits = self.fc(self.drop(emb))
        return ([f1, f2, emb], logits) if is_feat else logits


class TinyTransfer(nn.Module):
    """docs/method.md section 1: resize the student map to each teacher's size, then 1x1 conv -> BN -> ReLU."""

    def __init__(self, student_shape, teacher_shapes, norm=True):
        super().__init__()
        self.sizes = [tuple(s[1:]) for s in teacher_shapes]
        self.student_hw = tuple(student_shape[1:])
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(student_shape[0], s[0], 1), nn.BatchNorm2d(s[0]) if norm else nn.Identity(),
                          nn.ReLU())
            for s in teacher_shapes
        )

    def forward(self, x):
        out = []
        for size, head in zip(self.sizes, self.heads):
            if x.shape[-2:] == size:
                y = x
            elif x.shape[-2] >= size[0]:
                y = F.adaptive_avg_pool2d(x, size)
            else:
                y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            out.append(head(y))
        return out


class ExactTeachers(nn.Module):
    """A TeacherSource that keeps the teachers' dtype (LiveTeachers returns float32): float64 parity tests."""

    def __init__(self, teachers):
        super().__init__()
        self.teachers = nn.ModuleList(teachers).eval().requires_grad_(False)

    @property
    def num_teachers(self):
        return len(self.teachers)

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images, indices=None, view=0):
        outs = [t(images, is_feat=True) for t in self.teachers]
        return TeacherOutputs(torch.stack([z for _, z in outs]), [f[-1] for f, _ in outs], [f[-2] for f, _ in outs])


def make_setup(num_classes=5, teacher_widths=(6, 8, 7), teacher_strides=(2, 1, 4), student_width=5, seed=0,
               dtype=torch.float32, hw=8, norm=True):
    """Student, teachers (different map sizes), feature transfer and agent input sizes."""
    torch.manual_seed(seed)
    student = TinyNet(num_classes, student_width, norm=norm).to(dtype)
    teachers = [TinyNet(num_classes, w, s, dropout=0.0).to(dtype) for w, s in zip(teacher_widths, teacher_strides)]
    x = torch.randn(2, 3, hw, hw, dtype=dtype)
    with torch.no_grad():
        s_shape = tuple(student.eval()(x, is_feat=True)[0][-2].shape[1:])
        t_shapes = [tuple(t.eval()(x, is_feat=True)[0][-2].shape[1:]) for t in teachers]
    student.train()
    transfer = TinyTransfer(s_shape, t_shapes, norm=norm).to(dtype)
    sizes = [w + num_classes + 3 for w in teacher_widths]
    return student, teachers, transfer, sizes


def make_batches(num_batches, batch_size, num_classes=5, seed=0, dtype=torch.float32, hw=8):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(num_batches):
        images = torch.randn(batch_size, 3, hw, hw, generator=g, dtype=dtype)
        labels = torch.randint(0, num_classes, (batch_size,), generator=g)
        out.append((images, labels, torch.arange(b * batch_size, (b + 1) * batch_size)))
    return out
