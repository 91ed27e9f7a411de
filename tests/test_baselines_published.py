"""The as-published baselines (issue 27): ``camkd_weight_grad`` and ``aekd_solver="libsvm"`` reproduce the CA-MKD
code's step (Rorozhl/CA-MKD: helper/loops.py, distiller_zoo/CAMKD.py and KD.py, helper/optimization.py) to float64
rounding. Each test writes the authors' lines out again in float64 and compares the loss and every gradient of a
Distiller step with them; the defaults are shown to differ from that code where docs/training.md says they do."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtkd_fast import Distiller
from mtkd_fast._optional import MissingExtra
from mtkd_fast.train import TrainConfig
from mtkd_fast.train.strategies import aekd_weights, libsvm_simplex, min_norm_simplex

pytestmark = pytest.mark.usefixtures("one_thread")
sklearn_svm = pytest.importorskip("sklearn.svm")

T, ALPHA, BETA = 4.0, 1.0, 5.0


# ---------------------------------------------------------------------- the authors' lines, float64
def _distill_kl(y_s, y_t, is_ca=False):
    """distiller_zoo/KD.py DistillKL."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    if is_ca:
        return (nn.KLDivLoss(reduction="none")(p_s, p_t) * (T ** 2)).sum(-1)
    return nn.KLDivLoss(reduction="batchmean")(p_s, p_t) * (T ** 2)


def _camkd_code_loss(logit_s, trans_feat_s_list, mid_feat_t_list, logit_t_list, heads, target, detach_weight):
    """loops.py's CAMKD ensemble branch plus its 'inter' feature branch (CalWeight's classifier outputs and
    distiller_zoo/CAMKD.py), after the first epoch: gamma * loss_cls + alpha * loss_div + beta * loss_kd."""
    M = len(logit_t_list)
    loss_cls = nn.CrossEntropyLoss()(logit_s, target)
    loss_t = torch.stack([nn.CrossEntropyLoss(reduction="none")(lt, target) for lt in logit_t_list], dim=0)
    attention = (1.0 - F.softmax(loss_t, dim=0)) / (M - 1)
    loss_div = torch.stack([_distill_kl(logit_s, lt, is_ca=True) for lt in logit_t_list], dim=0)
    bsz = loss_div.shape[1]
    loss_div = (torch.mul(attention, loss_div).sum()) / (1.0 * bsz * M)
    # CalWeight: each teacher's classifier on the pooled transformed student map
    output_feat_t_list = [head(F.adaptive_avg_pool2d(f, 1).flatten(1)) for f, head in zip(trans_feat_s_list, heads)]
    loss_t = torch.stack([nn.CrossEntropyLoss(reduction="none")(o, target) for o in output_feat_t_list], dim=0)
    weight = (1.0 - F.softmax(loss_t, dim=0)) / (M - 1)
    if detach_weight:  # what mtkd_fast does by default, not the code
        weight = weight.detach()
    loss_st = torch.stack([nn.MSELoss(reduction="none")(s, t).reshape(bsz, -1).mean(-1)
                           for s, t in zip(trans_feat_s_list, mid_feat_t_list)], dim=0)
    loss_kd = torch.mul(weight, loss_st).sum() / (1.0 * bsz * M)
    return loss_cls + ALPHA * loss_div + BETA * loss_kd


def _find_optimal_svm(vecs, nu, is_norm=False):
    """helper/optimization.py find_optimal_svm, method "ssvm-precomputed"."""
    m = vecs.shape[0]
    vec_mean = torch.mean(vecs.reshape(vecs.shape[0], vecs.shape[1], -1), dim=1)
    vec_norm = vec_mean.norm(dim=1, keepdim=True)
    if is_norm:
        vec_mean = vec_mean * (1 / vec_norm)
    G = torch.matmul(vec_mean, vec_mean.permute(1, 0))
    if nu == -1:
        nu = 1 / m
    elif nu > 1:
        nu = 1
    elif nu < 1 / m:
        nu = 1 / m
    ret = np.zeros(m)
    svm = sklearn_svm.OneClassSVM(kernel="precomputed", nu=nu, tol=1e-6)
    svm.fit(G.detach().numpy())
    ret[svm.support_] = svm.dual_coef_ / (m * nu)
    return torch.from_numpy(ret).float()


def _aekd_code_loss(logit_s, logit_t_list, target, nu):
    """loops.py's AEKD ensemble branch (the register_hook gradients of each teacher's batch KD loss, svm_norm off),
    then gamma * loss_cls + alpha * loss_div. Returns (loss, scale)."""
    grads, loss_div_list = [], []
    for logit_t in logit_t_list:
        loss_s = _distill_kl(logit_s, logit_t)
        grads.append(torch.autograd.grad(loss_s, logit_s, retain_graph=True)[0])
        loss_div_list.append(loss_s)
    scale = _find_optimal_svm(torch.stack(grads), nu=nu)
    loss_div = torch.dot(scale.double(), torch.stack(loss_div_list))  # the float32 scale, in this float64 step
    return nn.CrossEntropyLoss()(logit_s, target) + ALPHA * loss_div, scale


# ---------------------------------------------------------------------- CA-MKD
def _camkd_case(seed=0, B=7, K=9, C=5, HW=4, teacher_channels=(6, 3, 8)):
    g = torch.Generator().manual_seed(seed)
    M = len(teacher_channels)
    z = (torch.randn(B, K, generator=g, dtype=torch.float64) * 2).requires_grad_()
    s = torch.randn(B, C, HW, HW, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, K, (B,), generator=g)
    tl = torch.randn(M, B, K, generator=g, dtype=torch.float64) * 3
    tmaps = [torch.randn(B, c, HW - 1, HW - 1, generator=g, dtype=torch.float64) for c in teacher_channels]
    torch.manual_seed(seed)
    heads = [nn.Linear(c, K).double() for c in teacher_channels]
    for h in heads:
        h.requires_grad_(False)  # frozen teachers
    return z, s, y, tl, tmaps, heads


def _camkd_step(weight_grad, case):
    z, s, y, tl, tmaps, heads = case
    torch.manual_seed(123)
    d = Distiller("camkd", student_map_shape=s.shape[1:], teacher_map_shapes=[t.shape[1:] for t in tmaps],
                  temperature=T, alpha=ALPHA, beta=BETA, loss_backend="reference", teacher_heads=heads,
                  camkd_weight_grad=weight_grad).double()
    d.begin_epoch(1)  # the code's feature term starts after its first epoch
    out = d(z, y, tl, None, s, tmaps)
    params = list(d.feature_transfer.parameters())
    grads = torch.autograd.grad(out.loss, [z, s, *params])
    return d, out.loss.detach(), grads


def _camkd_code_step(d, case, detach_weight):
    z, s, y, tl, tmaps, heads = case
    trans = d.feature_transfer(s)
    loss = _camkd_code_loss(z, trans, tmaps, list(tl), heads, y, detach_weight)
    params = list(d.feature_transfer.parameters())
    return loss.detach(), torch.autograd.grad(loss, [z, s, *params])


@pytest.mark.parametrize("seed", [0, 1])
def test_camkd_weight_grad_is_the_code_step(seed):
    case = _camkd_case(seed)
    d, loss, grads = _camkd_step(True, case)
    d.train()  # BatchNorm in the transfer: the same mode, statistics already updated once by the step above
    ref_loss, ref_grads = _camkd_code_step(d, case, detach_weight=False)
    # the transfer's BatchNorm running stats moved once more, but training mode uses the batch statistics
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_camkd_default_detaches_the_feature_weights():
    case = _camkd_case(2)
    d, loss, grads = _camkd_step(False, case)
    _, detached = _camkd_code_step(d, case, detach_weight=True)
    ref_loss, code = _camkd_code_step(d, case, detach_weight=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)  # same value either way
    for got, want in zip(grads, detached):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    # and the detached step is not the code's: the student map's gradient differs
    assert not torch.allclose(grads[1], code[1], rtol=1e-6, atol=1e-9)


def test_camkd_weight_grad_reaches_the_trainer_config():
    cfg = TrainConfig(teachers=["a", "b"], strategy="camkd", camkd_weight_grad=True)
    assert cfg.camkd_weight_grad is True and TrainConfig(teachers=["a", "b"]).camkd_weight_grad is False
    with pytest.raises(ValueError, match="^camkd_weight_grad: expected"):
        TrainConfig(teachers=["a", "b"], camkd_weight_grad="yes")


# ---------------------------------------------------------------------- AEKD
def _aekd_case(seed, B, K, M, scale_s, spread):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, K, generator=g, dtype=torch.float64) * scale_s
    z = (base + torch.randn(B, K, generator=g, dtype=torch.float64) * spread).requires_grad_()
    tl = base[None] + torch.randn(M, B, K, generator=g, dtype=torch.float64) * spread
    y = torch.randint(0, K, (B,), generator=g)
    return z, tl, y


def _aekd_step(case, solver, nu=None):
    z, tl, y = case
    d = Distiller("aekd", temperature=T, alpha=ALPHA, loss_backend="reference", aekd_solver=solver, aekd_nu=nu)
    d.begin_epoch(1)
    out = d(z, y, tl)
    return out, torch.autograd.grad(out.loss, z)[0]


@pytest.mark.parametrize("seed,B,K,M,scale_s,spread,nu", [
    (0, 64, 100, 3, 6.0, 0.02, None),  # the CIFAR shape, a student close to its teachers: a tiny Gram matrix
    (1, 13, 10, 3, 1.0, 3.0, None),  # well-scaled gradients
    (2, 9, 7, 4, 1.0, 2.0, 0.4),
    (3, 5, 11, 2, 2.0, 1.5, None),
])
def test_aekd_libsvm_is_the_code_step(seed, B, K, M, scale_s, spread, nu):
    case = _aekd_case(seed, B, K, M, scale_s, spread)
    z, tl, y = case
    out, grad = _aekd_step(case, "libsvm", nu)
    code_nu = nu if nu is not None else 1 / (0.6 * M)  # train_student.py: nu = 1 / (C M), C = 0.6
    ref_loss, scale = _aekd_code_loss(z, list(tl), y, code_nu)
    ref_grad = torch.autograd.grad(ref_loss, z)[0]
    torch.testing.assert_close(out.logit_weights[0], scale.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logit_weights, scale.double().expand(B, M), rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_aekd_libsvm_stops_at_its_start_on_a_tiny_gram_where_exact_does_not():
    """At the CIFAR shape with a student near its teachers the Gram matrix is below libsvm's tolerance: the code's
    weights are its starting point (nu M = 1/0.6: 1 and 2/3 on the first two teachers, over nu M), whatever the
    gradients say; the exact solver finds the minimum, here with weight on the last teacher too."""
    case = _aekd_case(0, 64, 100, 3, 6.0, 0.02)
    z, tl, y = case
    libsvm = aekd_weights(z, tl, T, solver="libsvm")
    exact = aekd_weights(z, tl, T, solver="exact")
    assert libsvm.dtype == torch.float32 and exact.dtype == torch.float64
    v = (T * (F.softmax(z.detach() / T, -1)[None] - F.softmax(tl / T, -1)) / z.shape[0]).mean(1)
    assert (v @ v.T).abs().max() < 1e-6  # the regime the issue describes
    torch.testing.assert_close(libsvm, torch.tensor([0.6, 0.4, 0.0]), rtol=0, atol=1e-6)
    assert exact[2] > 0.05
    gram = v @ v.T
    assert exact @ gram @ exact < libsvm.double() @ gram @ libsvm.double() * 0.99


def test_libsvm_agrees_with_exact_on_well_scaled_gradients():
    g = torch.Generator().manual_seed(5)
    for M in (2, 3, 4):
        vecs = torch.randn(M, 6, generator=g, dtype=torch.float64)
        gram = vecs @ vecs.T
        nu = 1 / (0.6 * M) if M > 1 else 1.0
        nu = min(max(nu, 1 / M), 1.0)
        a = libsvm_simplex(gram, nu)
        b = min_norm_simplex(gram, cap=1 / (nu * M))
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-4)


def test_libsvm_without_scikit_learn_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.svm", None)  # import fails as if scikit-learn were missing
    with pytest.raises(MissingExtra, match=r"^aekd_solver='libsvm' needs sklearn, which is not installed: "
                                           r"pip install mtkd_fast\[baselines\]$"):
        libsvm_simplex(torch.eye(3, dtype=torch.float64), 0.5)


def test_aekd_solver_is_checked():
    with pytest.raises(ValueError, match=r"^aekd_solver: expected one of \['exact', 'libsvm'\], got 'svm'"):
        Distiller("aekd", aekd_solver="svm")
    with pytest.raises(ValueError, match="^aekd_solver: expected one of"):
        TrainConfig(teachers=["a", "b"], aekd_solver="svm")
    with pytest.raises(ValueError, match="^aekd_solver: expected one of"):
        aekd_weights(torch.zeros(2, 3), torch.zeros(2, 2, 3), T, solver="svm")
