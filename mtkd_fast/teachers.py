"""Where a training step gets its teachers' outputs from: live frozen teachers, or (``mtkd_fast.cache``) a
teacher-output cache. Both implement the :class:`TeacherSource` protocol, so the trainer does not care which.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import torch
from torch import Tensor, nn


class TeacherOutputs(NamedTuple):
    """What one batch needs from the M teachers (docs/method.md section 1)."""

    logits: Tensor  # [M, B, K]
    embeddings: list[Tensor]  # M tensors [B, D_m] (feats[-1], the pooled embedding)
    feature_maps: list[Tensor]  # M tensors [B, C_m, H_m, W_m] (feats[-2], the last feature map)


class TeacherSource(Protocol):
    """Gives the teachers' outputs for a batch.

    ``images`` is the augmented batch as the student sees it, ``indices`` the dataset indices of its samples
    and ``view`` the augmentation view it was made with (see ``mtkd_fast.data``): a cache looks outputs up by
    (index, view), live teachers run on the images.
    """

    num_teachers: int

    def __call__(self, images: Tensor, indices: Tensor, view: int) -> TeacherOutputs: ...


class LiveTeachers(nn.Module):
    """Runs M frozen teachers (eval mode, no gradients, inference mode) on each batch.

    Args:
        teachers: the M teacher models; each returns ``(feats, logits)`` when called with ``is_feat=True``.
        autocast_dtype: optional torch.bfloat16/torch.float16 to run the teachers under autocast; outputs are
            returned as float32.
        channels_last: run the teachers on a channels_last copy of the batch (faster convolutions on most
            backends).
    """

    def __init__(self, teachers: Sequence[nn.Module], autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False):
        super().__init__()
        if len(teachers) < 2:
            raise ValueError(f"teachers: expected at least 2 teacher models, got {len(teachers)}")
        self.teachers = nn.ModuleList(teachers)
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)
        if channels_last:
            self.teachers.to(memory_format=torch.channels_last)
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last

    @property
    def num_teachers(self) -> int:
        return len(self.teachers)

    def train(self, mode: bool = True):  # teachers stay frozen in eval mode whatever the trainer does
        return super().train(False)

    @torch.inference_mode()
    def forward(self, images: Tensor, indices: Tensor | None = None, view: int = 0) -> TeacherOutputs:
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        logits, embeddings, maps = [], [], []
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            for t in self.teachers:
                feats, z = t(x, is_feat=True)
                logits.append(z.float())
                embeddings.append(feats[-1].float())
                maps.append(feats[-2].float())
        # clone out of inference mode so the outputs can be used in autograd graphs (as constants)
        with torch.inference_mode(False):
            return TeacherOutputs(
                torch.stack(logits).clone(),
                [e.clone() for e in embeddings],
                [f.clone() for f in maps],
            )
