"""FeatureTransfer (docs/method.md section 1): the fast order equals the plain order within float rounding.

Checked in float64 on random inputs of odd sizes, forward and gradients (input and every parameter) and
BatchNorm running statistics, for upsampling, downsampling (including non-divisible adaptive pooling),
equal sizes and a mix of resolutions, in train and eval mode. The plain order is itself checked against
docs/method.md section 1 written out with torch.nn.functional calls. The authors' chained resizing
(docs/method.md section 8, item 7;
``chained_resize=True``) is checked against their loop written out the same way, on both paths.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mtkd_fast.models import FeatureTransfer

CASES = {
    # student (C, H, W), teachers [(C, H, W)]
    "up": ((12, 4, 4), [(7, 8, 8), (5, 8, 8), (9, 6, 6)]),
    "down": ((12, 9, 9), [(7, 4, 4), (5, 4, 4), (6, 3, 3)]),
    "equal": ((11, 5, 5), [(7, 5, 5), (3, 5, 5)]),
    "mixed": ((10, 6, 6), [(4, 8, 8), (5, 6, 6), (3, 3, 3), (6, 8, 8), (7, 4, 10)]),
    "mtkd_rl_cifar": ((24, 4, 4), [(16, 8, 8), (16, 8, 8), (8, 8, 8), (8, 8, 8)]),
    "up_large_source": ((6, 9, 9), [(4, 12, 12), (5, 12, 12), (3, 10, 11)]),  # resize by upsample_bilinear2d
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: FeatureTransfer, seed: int) -> FeatureTransfer:
    """Non-trivial BN affine parameters and running statistics, so a mix-up between teachers would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in module.heads:
            conv, bn = head.transfer[0], head.transfer[1]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=conv.weight.dtype))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g, dtype=conv.bias.dtype))
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g, dtype=bn.weight.dtype) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g, dtype=bn.bias.dtype))
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=bn.running_mean.dtype))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=bn.running_var.dtype) + 0.5)
    return module


def _run(module: FeatureTransfer, x: torch.Tensor, plain: bool, upstream: list[torch.Tensor]):
    x = x.clone().requires_grad_(True)
    outs = module.forward_plain(x) if plain else module(x)
    loss = sum((o * u).sum() for o, u in zip(outs, upstream))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return outs, x.grad, grads


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_order_equals_plain_order(case, train):
    student_shape, teacher_shapes = CASES[case]
    torch.manual_seed(sorted(CASES).index(case))
    plain = _randomise(FeatureTransfer(student_shape, teacher_shapes).double(), seed=3).train(train)
    fast = copy.deepcopy(plain)
    x = torch.randn(5, *student_shape, dtype=torch.float64)
    upstream = [torch.randn(5, *s, dtype=torch.float64) for s in teacher_shapes]

    outs_p, gx_p, grads_p = _run(plain, x, plain=True, upstream=upstream)
    outs_f, gx_f, grads_f = _run(fast, x, plain=False, upstream=upstream)

    for m, (a, b) in enumerate(zip(outs_p, outs_f)):
        assert b.shape == (5, *teacher_shapes[m])
        assert (a > 0).any() and (a == 0).any()  # the ReLU is active on both sides: a meaningful comparison
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-10, atol=1e-10)
    assert gx_p.abs().max() > 0
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-10, atol=1e-10, msg=name)
    for (name, a), (_, b) in zip(plain.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("momentum", [0.3, None], ids=["momentum_differs", "cumulative"])
def test_fast_order_with_batchnorms_that_cannot_share_a_call(momentum):
    """BatchNorm settings that one batch_norm call cannot express fall back to one call per teacher."""
    student_shape, teacher_shapes = CASES["up"]
    plain = _randomise(FeatureTransfer(student_shape, teacher_shapes).double(), seed=7).train()
    plain.heads[1].transfer[1].momentum = momentum
    fast = copy.deepcopy(plain)
    x = torch.randn(3, *student_shape, dtype=torch.float64)
    upstream = [torch.randn(3, *s, dtype=torch.float64) for s in teacher_shapes]
    for _ in range(2):  # twice: the cumulative average depends on the batch counter
        outs_p, gx_p, _ = _run(plain, x, plain=True, upstream=upstream)
        outs_f, gx_f, _ = _run(fast, x, plain=False, upstream=upstream)
    for a, b in zip(outs_p, outs_f):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-10, atol=1e-10)
    for (name, a), (_, b) in zip(plain.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


def test_float32_orders_agree_within_rounding():
    student_shape, teacher_shapes = (64, 4, 4), [(96, 8, 8), (96, 8, 8), (64, 8, 8), (64, 8, 8)]
    torch.manual_seed(0)
    plain = FeatureTransfer(student_shape, teacher_shapes).train()
    fast = copy.deepcopy(plain)
    x = torch.randn(8, *student_shape)
    for a, b in zip(plain.forward_plain(x), fast(x)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["up", "down", "mixed"])
def test_plain_order_is_the_spec(case):
    """forward_plain against docs/method.md section 1 written out with functional calls (train-mode BN: batch
    statistics)."""
    student_shape, teacher_shapes = CASES[case]
    module = _randomise(FeatureTransfer(student_shape, teacher_shapes).double(), seed=5).train()
    x = torch.randn(4, *student_shape, dtype=torch.float64)
    outs = module.forward_plain(x)
    h_s = student_shape[1]
    for m, (c, h, w) in enumerate(teacher_shapes):
        if h_s >= h:
            resized = F.adaptive_avg_pool2d(x, (h, w))
        else:
            resized = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        conv, bn = module.heads[m].transfer[0], module.heads[m].transfer[1]
        y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], resized) + conv.bias[None, :, None, None]
        mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        expected = torch.relu((y - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None]
                              + bn.bias[None, :, None, None])
        torch.testing.assert_close(outs[m], expected, rtol=1e-10, atol=1e-10)


def test_fast_path_plan():
    """Teachers sharing a resolution form one group (one matrix product); convolution at the smaller size."""
    ft = FeatureTransfer((24, 4, 4), [(16, 8, 8), (16, 8, 8), (8, 8, 8), (8, 2, 2)])
    plan = {g.size: (g.members, g.conv_first, g.pool, g.resize_matrix is not None) for g in ft._groups}
    assert plan == {(8, 8): ((0, 1, 2), True, False, True), (2, 2): ((3,), False, True, False)}
    assert "_resize_matrix0" not in ft.state_dict()


def test_parameter_names_are_the_authors():
    """MTKD-RL models/util.py: TransFeat has embed{i} = Embed(dim_in, dim_out), Embed.transfer = Sequential(
    Conv2d(dim_in, dim_out, 1), BatchNorm2d(dim_out), ReLU)."""
    ft = FeatureTransfer((1024, 4, 4), [(384, 8, 8), (256, 8, 8)])
    shapes = {k: tuple(v.shape) for k, v in ft.state_dict().items()}
    assert shapes == {
        "embed0.transfer.0.weight": (384, 1024, 1, 1),
        "embed0.transfer.0.bias": (384,),
        "embed0.transfer.1.weight": (384,),
        "embed0.transfer.1.bias": (384,),
        "embed0.transfer.1.running_mean": (384,),
        "embed0.transfer.1.running_var": (384,),
        "embed0.transfer.1.num_batches_tracked": (),
        "embed1.transfer.0.weight": (256, 1024, 1, 1),
        "embed1.transfer.0.bias": (256,),
        "embed1.transfer.1.weight": (256,),
        "embed1.transfer.1.bias": (256,),
        "embed1.transfer.1.running_mean": (256,),
        "embed1.transfer.1.running_var": (256,),
        "embed1.transfer.1.num_batches_tracked": (),
    }


@pytest.mark.parametrize(
    "student_shape,teacher_shapes,match",
    [
        ((12, 4), [(7, 8, 8)], "student_shape"),
        ((12, 4, 0), [(7, 8, 8)], "student_shape"),
        ((12, 4, 4), [], "teacher_shapes"),
        ((12, 4, 4), [(7, 8, 8), (7, 8.0, 8)], r"teacher_shapes\[1\]"),
    ],
)
def test_bad_shapes(student_shape, teacher_shapes, match):
    with pytest.raises(ValueError, match=match):
        FeatureTransfer(student_shape, teacher_shapes)


def test_bad_input_shape():
    ft = FeatureTransfer((12, 4, 4), [(7, 8, 8)])
    with pytest.raises(ValueError, match=r"student_map: expected shape \[B, 12, 4, 4\], got \(2, 12, 5, 5\)"):
        ft(torch.randn(2, 12, 5, 5))
    with pytest.raises(ValueError, match="student_map"):
        ft.forward_plain(torch.randn(12, 4, 4))


@pytest.mark.parametrize("case", ["up", "down"])
def test_channels_last_student_map(case):
    student_shape, teacher_shapes = CASES[case]
    module = _randomise(FeatureTransfer(student_shape, teacher_shapes).double(), seed=9).eval()
    x = torch.randn(3, *student_shape, dtype=torch.float64)
    expected = module.forward_plain(x)
    for a, b in zip(expected, module(x.contiguous(memory_format=torch.channels_last))):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["up", "down", "mixed"])
def test_fast_order_equals_plain_order_on_cuda(case):
    student_shape, teacher_shapes = CASES[case]
    plain = _randomise(FeatureTransfer(student_shape, teacher_shapes).double(), seed=11).train().cuda()
    fast = copy.deepcopy(plain)
    x = torch.randn(4, *student_shape, dtype=torch.float64, device="cuda")
    upstream = [torch.randn(4, *s, dtype=torch.float64, device="cuda") for s in teacher_shapes]
    outs_p, gx_p, grads_p = _run(plain, x, plain=True, upstream=upstream)
    outs_f, gx_f, grads_f = _run(fast, x, plain=False, upstream=upstream)
    for a, b in zip(outs_p, outs_f):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-10, atol=1e-10)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-10, atol=1e-10, msg=name)


# ---------------------------------------------------------------- chained resizing (docs/method.md section 8, item 7)

CHAIN_CASES = {
    # teachers of two map resolutions, in both orders, around a student map between them and beside them
    "low_then_high": ((10, 6, 6), [(4, 3, 3), (5, 8, 8), (3, 8, 8)]),
    "high_then_low": ((10, 6, 6), [(5, 8, 8), (3, 8, 8), (4, 3, 3)]),
    "down_low_then_high": ((9, 8, 8), [(4, 2, 2), (6, 8, 8)]),
    "down_high_then_low": ((9, 8, 8), [(6, 8, 8), (4, 2, 2)]),
    "up_alternating": ((7, 3, 3), [(4, 5, 5), (3, 9, 9), (5, 5, 5)]),
}


def _spec_transfer(module: FeatureTransfer, x: torch.Tensor, chained: bool) -> list[torch.Tensor]:
    """E_m written from docs/method.md section 1 with functional calls (train-mode BN).
    Chained: the authors' loop, where the
    student map variable is overwritten per teacher, the target is square t_H x t_H, and pool-or-interpolate
    compares the ORIGINAL student height with t_H."""
    s_h = x.shape[2]
    feat_s, outs = x, []
    for m, (c, t_h, t_w) in enumerate(module.teacher_shapes):
        source = feat_s if chained else x
        size = (t_h, t_h) if chained else (t_h, t_w)
        if s_h >= t_h:
            resized = F.adaptive_avg_pool2d(source, size)
        else:
            resized = F.interpolate(source, size=size, mode="bilinear", align_corners=False)
        if chained:
            feat_s = resized
        conv, bn = module.heads[m].transfer[0], module.heads[m].transfer[1]
        y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], resized) + conv.bias[None, :, None, None]
        mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        outs.append(torch.relu((y - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None]
                               + bn.bias[None, :, None, None]))
    return outs


@pytest.mark.parametrize("case", sorted(CHAIN_CASES))
def test_chained_resize_is_the_authors_loop_on_both_paths(case):
    student_shape, teacher_shapes = CHAIN_CASES[case]
    plain = _randomise(FeatureTransfer(student_shape, teacher_shapes, chained_resize=True).double(), seed=13).train()
    fast = copy.deepcopy(plain)
    x = torch.randn(5, *student_shape, dtype=torch.float64)
    expected = _spec_transfer(plain, x, chained=True)
    upstream = [torch.randn(5, *s, dtype=torch.float64) for s in teacher_shapes]
    outs_p, gx_p, grads_p = _run(plain, x, plain=True, upstream=upstream)
    outs_f, gx_f, grads_f = _run(fast, x, plain=False, upstream=upstream)
    for m, (e, a, b) in enumerate(zip(expected, outs_p, outs_f)):
        assert b.shape == (5, *teacher_shapes[m])
        assert (e > 0).any() and (e == 0).any()
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, e, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-10, atol=1e-10)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-10, atol=1e-10, msg=name)
    for (name, a), (_, b) in zip(plain.named_buffers(), fast.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", sorted(CHAIN_CASES))
def test_independent_resize_is_the_spec_loop_and_differs_from_the_chain(case):
    """Same cases, default mode: every teacher resizes the original map; where a later teacher sits after a
    teacher of another resolution, the chain gives it a different map (unless that resize was the identity)."""
    student_shape, teacher_shapes = CHAIN_CASES[case]
    module = _randomise(FeatureTransfer(student_shape, teacher_shapes).double(), seed=13).train()
    x = torch.randn(4, *student_shape, dtype=torch.float64)
    independent, chained = _spec_transfer(module, x, chained=False), _spec_transfer(module, x, chained=True)
    for a, b, e in zip(module.forward_plain(x), module(x), independent):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, e, rtol=1e-10, atol=1e-10)
    differs = [not torch.allclose(i, c) for i, c in zip(independent, chained)]
    # pooling 8x8 -> 8x8 is the identity, so a full-size teacher first leaves the chain's later input unchanged
    assert differs == [False] * len(differs) if case == "down_high_then_low" else (not differs[0] and any(differs))


def test_chained_equals_independent_when_teachers_share_a_size():
    student_shape, teacher_shapes = (12, 4, 4), [(7, 8, 8), (5, 8, 8), (9, 8, 8)]
    chained = _randomise(FeatureTransfer(student_shape, teacher_shapes, chained_resize=True).double(), seed=2).train()
    independent = _randomise(FeatureTransfer(student_shape, teacher_shapes).double(), seed=2).train()
    x = torch.randn(3, *student_shape, dtype=torch.float64)
    for a, b in zip(chained(x), independent(x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_chain_plan_and_square_maps():
    ft = FeatureTransfer((6, 4, 4), [(3, 8, 8), (2, 8, 8), (4, 2, 2), (5, 8, 8)], chained_resize=True)
    assert [(size, pool, members) for size, pool, members, _ in ft._chain] == [
        ((8, 8), False, (0, 1)), ((2, 2), True, (2,)), ((8, 8), False, (3,))]
    with pytest.raises(ValueError, match=r"teacher_shapes\[1\]: chained_resize .* square"):
        FeatureTransfer((6, 4, 4), [(3, 8, 8), (2, 4, 8)], chained_resize=True)
    with pytest.raises(ValueError, match="chained_resize"):
        FeatureTransfer((6, 4, 4), [(3, 8, 8)], chained_resize="yes")
