"""Feature transfer of MTKD-RL (docs/method.md section 1): one small trainable module E_m per teacher.

E_m(F_s): resize the student map F_s [B, C_s, H_s, W_s] spatially to the teacher's H_m x W_m (adaptive
average pooling when H_s >= H_m, bilinear with align_corners=False otherwise), then Conv2d(C_s, C_m, 1x1, bias)
-> BatchNorm2d(C_m) -> ReLU.

Which map is resized (docs/method.md section 8, item 7): by default every teacher resizes the ORIGINAL student map
("independent"). The authors' code resizes in a CHAIN: teacher m resizes what teacher m-1 produced, to a square
H_m x H_m, choosing pooling or bilinear by comparing the ORIGINAL H_s with H_m. ``chained_resize=True``
reproduces that exactly. The two agree when all teachers share one map size and differ otherwise (a
low-resolution teacher before a high-resolution one hands the later teacher a degraded map).

Why the fast path is exact: both resizings are linear maps applied to each channel with weights that sum
to 1 per output pixel, and the 1x1 convolution is a linear map over channels plus a bias, so
resize(conv(x)) == conv(resize(x)). ``forward`` therefore applies the convolution at the smaller of the
two resolutions, and runs the convolutions of all teachers that share a resolution as one matrix product
(their weights concatenated); BatchNorm and ReLU then act per teacher as before. With ``chained_resize``
the chain of resizes runs on the student map itself (its C_s channels) and each run of consecutive teachers of
one size (which the chain leaves unchanged between them) shares one convolution call. ``forward_plain`` is the
plain order (per teacher: resize, conv, BN, ReLU, in the selected resize mode), kept as the reference for tests
and benchmarks.

Parameter names are the authors' ``TransFeat`` names (``embed{m}.transfer.0`` the convolution,
``embed{m}.transfer.1`` the BatchNorm), so their feature-transfer weights load unchanged.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_shape(name: str, shape) -> tuple[int, int, int]:
    if (
        not isinstance(shape, (tuple, list, torch.Size))
        or len(shape) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
    ):
        raise ValueError(f"{name}: expected a (C, H, W) triple of positive ints, got {shape!r}")
    return tuple(int(v) for v in shape)


def resize(x: Tensor, size: tuple[int, int], pool: bool) -> Tensor:
    """The resize of docs/method.md section 1: adaptive average pooling (``pool``) or bilinear, align_corners=False."""
    if pool:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class TransferHead(nn.Module):
    """One teacher's E_m without the resize: 1x1 conv (bias) -> BN -> ReLU, named as the authors' Embed."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.transfer = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.transfer(x)


class _ResolutionGroup(NamedTuple):
    size: tuple[int, int]  # the teachers' (H, W)
    members: tuple[int, ...]  # teacher indices
    channels: tuple[int, ...]  # their C_m, in the same order
    pool: bool  # the resize of docs/method.md section 1: pooling (H_s >= H) or bilinear
    conv_first: bool  # convolve at the student's resolution, then resize (cheaper when it is smaller)
    same_size: bool  # no resize at all
    resize_matrix: str | None  # buffer name of the resize as a [H_s*W_s, H*W] matrix, when that is used


# Upsampling a small map is faster as one matrix product with the interpolation weights than through
# upsample_bilinear2d (whose CPU backward is slow for many channels); kept for sources up to 8x8 pixels,
# where the dense matrix stays small.
_MATRIX_RESIZE_MAX_SOURCE_PIXELS = 64


def _resize_matrix(source: tuple[int, int], size: tuple[int, int], pool: bool) -> Tensor:
    """The resize as a [H_s*W_s, H*W] matrix: the resize of docs/method.md section 1 applied to each one-hot source
    pixel."""
    n = source[0] * source[1]
    basis = torch.eye(n, dtype=torch.float64).view(n, 1, *source)
    # float64 (exact weights such as 1/3); forward casts it to the input's dtype
    return resize(basis, size, pool).reshape(n, size[0] * size[1])


class FeatureTransfer(nn.Module):
    """E_1..E_M of docs/method.md section 1.

    Args:
        student_shape: (C_s, H_s, W_s) of the student's feats[-2].
        teacher_shapes: M triples (C_m, H_m, W_m), one per teacher's feats[-2].
        chained_resize: resize in the authors' chain (module docstring) instead of each teacher resizing the
            original map; needs square teacher maps, as the chain's target is H_m x H_m.

    ``forward(student_map)`` takes F_s [B, C_s, H_s, W_s] and returns the M maps G_m [B, C_m, H_m, W_m]
    (teachers that share a resolution get channel slices of one tensor: views, not contiguous copies).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shapes: Sequence[Sequence[int]],
                 chained_resize: bool = False):
        super().__init__()
        if not isinstance(chained_resize, bool):
            raise ValueError(f"chained_resize: expected a bool, got {chained_resize!r}")
        self.chained_resize = chained_resize
        self.student_shape = _check_shape("student_shape", student_shape)
        if not isinstance(teacher_shapes, (list, tuple)) or len(teacher_shapes) == 0:
            raise ValueError(f"teacher_shapes: expected a non-empty list of (C, H, W) triples, got {teacher_shapes!r}")
        self.teacher_shapes = [_check_shape(f"teacher_shapes[{m}]", s) for m, s in enumerate(teacher_shapes)]
        c_s, h_s, w_s = self.student_shape
        for m, (c_m, _, _) in enumerate(self.teacher_shapes):
            self.add_module(f"embed{m}", TransferHead(c_s, c_m))

        by_size: dict[tuple[int, int], list[int]] = {}
        for m, (_, h, w) in enumerate(self.teacher_shapes):
            by_size.setdefault((h, w), []).append(m)
        self._groups = []
        for g, ((h, w), members) in enumerate(by_size.items()):
            pool, conv_first, same_size = h_s >= h, h_s * w_s < h * w, (h_s, w_s) == (h, w)
            matrix_name = None
            if conv_first and h_s * w_s <= _MATRIX_RESIZE_MAX_SOURCE_PIXELS:
                matrix_name = f"_resize_matrix{g}"
                # not persistent: derived from the shapes, so it stays out of the state_dict
                self.register_buffer(matrix_name, _resize_matrix((h_s, w_s), (h, w), pool), persistent=False)
            channels = tuple(self.teacher_shapes[m][0] for m in members)
            self._groups.append(_ResolutionGroup((h, w), tuple(members), channels,
                                                 pool, conv_first, same_size, matrix_name))
        # the authors' chain: runs of consecutive teachers of one size share the chain's output at that point
        self._chain: list[tuple[tuple[int, int], bool, tuple[int, ...], tuple[int, ...]]] = []
        if chained_resize:
            for m, (c_m, h, w) in enumerate(self.teacher_shapes):
                if h != w:
                    raise ValueError(f"teacher_shapes[{m}]: chained_resize resizes to a square H_m x H_m as the "
                                     f"authors' code does, so it needs square teacher maps, got {h}x{w}")
                if self._chain and self._chain[-1][0] == (h, h):
                    size, pool, members, channels = self._chain[-1]
                    self._chain[-1] = (size, pool, members + (m,), channels + (c_m,))
                else:
                    self._chain.append(((h, h), h_s >= h, (m,), (c_m,)))

    @property
    def heads(self) -> list[TransferHead]:
        return [getattr(self, f"embed{m}") for m in range(len(self.teacher_shapes))]

    def _check_input(self, student_map: Tensor) -> None:
        if not isinstance(student_map, Tensor):
            raise TypeError(f"student_map: expected a torch.Tensor, got {type(student_map).__name__}")
        if student_map.dim() != 4 or tuple(student_map.shape[1:]) != self.student_shape:
            c, h, w = self.student_shape
            raise ValueError(f"student_map: expected shape [B, {c}, {h}, {w}], got {tuple(student_map.shape)}")

    def forward_plain(self, student_map: Tensor) -> list[Tensor]:
        """The plain order: per teacher, resize, then conv -> BN -> ReLU. Independent: each teacher resizes the
        original map; chained: the resized map carries over to the next teacher (the authors' loop)."""
        self._check_input(student_map)
        h_s = self.student_shape[1]
        if not self.chained_resize:
            return [
                head(resize(student_map, (h, w), pool=h_s >= h))
                for head, (_, h, w) in zip(self.heads, self.teacher_shapes)
            ]
        outputs, current = [], student_map
        for head, (_, h, _) in zip(self.heads, self.teacher_shapes):
            current = resize(current, (h, h), pool=h_s >= h)
            outputs.append(head(current))
        return outputs

    def forward(self, student_map: Tensor) -> list[Tensor]:
        self._check_input(student_map)
        heads = self.heads
        outputs: list[Tensor | None] = [None] * len(heads)
        if self.chained_resize:
            current = student_map
            for size, pool, members, channels in self._chain:
                current = resize(current, size, pool)
                weight = _cat([heads[m].transfer[0].weight for m in members])
                bias = _cat([heads[m].transfer[0].bias for m in members])
                mixed = F.conv2d(current, weight, bias)
                self._normalise(mixed, members, channels, outputs)
            return outputs  # type: ignore[return-value]
        for group in self._groups:
            convs = [heads[m].transfer[0] for m in group.members]
            weight = _cat([c.weight for c in convs])
            bias = _cat([c.bias for c in convs])
            if group.same_size:
                mixed = F.conv2d(student_map, weight, bias)
            elif group.resize_matrix is not None:
                mixed = F.conv2d(student_map, weight, bias)
                b, c, h, w = mixed.shape[0], mixed.shape[1], *group.size
                matrix = getattr(self, group.resize_matrix).to(mixed.dtype)
                mixed = (mixed.reshape(b * c, -1) @ matrix).view(b, c, h, w)
            elif group.conv_first:
                mixed = resize(F.conv2d(student_map, weight, bias), group.size, group.pool)
            else:
                mixed = F.conv2d(resize(student_map, group.size, group.pool), weight, bias)
            self._normalise(mixed, group.members, group.channels, outputs)
        return outputs  # type: ignore[return-value]

    def _normalise(self, mixed: Tensor, members, channels, outputs: list) -> None:
        """BN -> ReLU of the teachers ``members`` on their concatenated conv outputs, into ``outputs``."""
        heads = self.heads
        bns = [heads[m].transfer[1] for m in members]
        normed = _group_batch_norm(mixed, bns)
        if normed is None:  # BatchNorms that cannot share one call: one call each
            for m, part, bn in zip(members, mixed.split(channels, dim=1), bns):
                outputs[m] = F.relu(bn(part))
        else:
            for m, part in zip(members, F.relu(normed).split(channels, dim=1)):
                outputs[m] = part


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _group_batch_norm(x: Tensor, bns: list[nn.BatchNorm2d]) -> Tensor | None:
    """The BatchNorms of one resolution group as ONE batch_norm call over their concatenated channels.

    BatchNorm is per channel, so this is the same computation; the running statistics are updated in
    the concatenated buffers and written back, and each module's batch counter advances as nn.BatchNorm2d
    would. Returns None when the modules differ in settings that one call cannot express.
    """
    first = bns[0]
    if len(bns) == 1:
        return first(x)
    same = all(
        bn.training == first.training and bn.eps == first.eps and bn.momentum == first.momentum
        and bn.affine and bn.track_running_stats
        for bn in bns
    )
    if not same or first.momentum is None or not first.affine or not first.track_running_stats:
        return None
    running_mean = torch.cat([bn.running_mean for bn in bns])
    running_var = torch.cat([bn.running_var for bn in bns])
    out = F.batch_norm(
        x, running_mean, running_var, _cat([bn.weight for bn in bns]), _cat([bn.bias for bn in bns]),
        first.training, first.momentum, first.eps,
    )
    if first.training:
        with torch.no_grad():
            for bn, mean, var in zip(bns, running_mean.split([bn.num_features for bn in bns]),
                                     running_var.split([bn.num_features for bn in bns])):
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.add_(1)
    return out
