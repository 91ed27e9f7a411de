"""Non-finite inputs propagate or are refused, never masked ("mask only exact zeros"): a NaN or +inf teacher or
student logit gives NaN for that row on the fused CPU kernels and the reference alike, as plain PyTorch does; a
-inf logit (probability exactly 0) still contributes 0; ``check_finite`` names the tensor and the teacher; the
temperature has a documented finite range; training that goes non-finite stops with one line."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtkd_fast import MTKDLoss, ops
from mtkd_fast import reference as ref
from mtkd_fast._validation import TEMPERATURE_RANGE

F64 = torch.float64
BACKENDS = ["reference"] + (["fused"] if ops.available("cpu") else [])


def _inputs(B=5, K=7, M=3, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, K, generator=g, dtype=dtype) * 2
    zt = torch.randn(M, B, K, generator=g, dtype=dtype) * 2
    y = torch.randint(0, K, (B,), generator=g)
    w = torch.rand(B, M, generator=g, dtype=dtype) + 0.1
    return zs, zt, y, w


def _plain_kl(zs, zt, T):
    """KL_{i,m} with plain PyTorch's kl_div: xlogy on the target probabilities (0 only for an exact 0), no other
    masking."""
    log_ps = F.log_softmax(zs.double() / T, -1)
    cols = [F.kl_div(log_ps, F.softmax(t.double() / T, -1), reduction="none").sum(-1) for t in zt]
    return T * T * torch.stack(cols, 1)


def _logit_kd(backend, zs, zt, y, w, T=4.0):
    return (ops if backend == "fused" else ref).mtkd_logit_kd(zs, zt, y, w, T, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_nan_or_inf_teacher_logit_gives_nan_row(backend, bad, dtype):
    zs, zt, y, w = _inputs(dtype=dtype)
    zt[1, 2, 4] = bad  # teacher 1, sample 2
    out = _logit_kd(backend, zs, zt, y, w)
    plain = _plain_kl(zs, zt, 4.0)
    assert torch.isnan(plain[2, 1])  # what plain PyTorch says
    assert torch.isnan(out.kl[2, 1]) and torch.isnan(out.loss)
    mask = torch.ones_like(plain, dtype=torch.bool)
    mask[2, 1] = False  # every other (sample, teacher) is untouched
    torch.testing.assert_close(out.kl[mask].double(), plain[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_student_logit_gives_nan_row(backend, bad):
    zs, zt, y, w = _inputs()
    zs[3, 0] = bad
    zs.requires_grad_(True)
    out = _logit_kd(backend, zs, zt, y, w)
    assert torch.isnan(out.kl[3]).all() and torch.isnan(out.student_ce[3]) and torch.isnan(out.loss)
    assert torch.isfinite(out.kl[[0, 1, 2, 4]]).all()
    out.loss.backward()
    assert torch.isnan(zs.grad[3]).all() and torch.isfinite(zs.grad[[0, 1, 2, 4]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_teacher_logit_is_an_exact_zero_probability(backend):
    """xlogy: p_t = 0 contributes 0 (never 0 * -inf), so the row stays finite and matches the float64 oracle."""
    zs, zt, y, w = _inputs(B=4, K=9)
    zt[0, 1, 3] = float("-inf")
    out = _logit_kd(backend, zs, zt, y, w)
    assert torch.isfinite(out.kl).all() and torch.isfinite(out.loss)
    expect = _plain_kl(zs, zt, 4.0)
    torch.testing.assert_close(out.kl.double(), expect, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not ops.available("cpu"), reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_agent_stats_propagate_non_finite_teacher(bad):
    zs, zt, y, _ = _inputs(B=6, K=11, M=2, dtype=torch.float32)
    zt[0, 5, 10] = bad
    stats = ops.agent_stats(zs, zt, y, None, None, 4.0)
    exp = ref.agent_stats(zs.double(), zt.double(), y, None, None, 4.0)
    assert torch.isnan(stats.kl[5, 0]) and torch.isnan(exp.kl[5, 0])
    assert torch.isnan(stats.teacher_ce[5, 0]) and torch.isnan(exp.teacher_ce[5, 0])
    keep = torch.ones(6, 2, dtype=torch.bool)
    keep[5, 0] = False
    torch.testing.assert_close(stats.kl[keep].double(), exp.kl[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mtkdloss_nan_teacher_gives_nan_loss(backend):
    zs, zt, y, w = _inputs()
    zt[2, 0, 1] = float("nan")
    out = MTKDLoss(backend=backend)(zs, zt, y, w)
    assert torch.isnan(out.loss) and torch.isnan(out.per_sample_loss[0])
    assert torch.isfinite(out.per_sample_loss[1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_names_tensor_and_teacher(backend):
    zs, zt, y, w = _inputs()
    crit = MTKDLoss(backend=backend, check_finite=True)
    bad = zt.clone()
    bad[2, 0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"^teacher_logits\[2\]: expected finite values, found 1 NaN/Inf"):
        crit(zs, bad, y, w)
    bad_zs = zs.clone()
    bad_zs[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^student_logits: expected finite"):
        crit(bad_zs, zt, y, w)
    maps = [torch.randn(5, 3, 2, 2, dtype=F64) for _ in range(3)]
    tmaps = [m.clone() for m in maps]
    emb = [torch.randn(5, 3, dtype=F64) for _ in range(3)]
    emb[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^teacher_embeddings\[1\]: expected finite"):
        crit(zs, zt, y, w, maps, tmaps, w, emb)


@pytest.mark.parametrize("T", [1e30, float("inf"), float("nan"), 0.0, -1.0, 1e-3, 101.0])
def test_temperature_outside_the_documented_range_is_refused(T):
    lo, hi = TEMPERATURE_RANGE
    zs, zt, y, w = _inputs()
    with pytest.raises(ValueError, match=rf"^temperature: expected a number in \[{lo:g}, {hi:g}\]"):
        MTKDLoss(temperature=T)
    with pytest.raises(ValueError, match="^temperature:"):
        ref.mtkd_logit_kd(zs, zt, y, w, T)
    if ops.available("cpu"):
        with pytest.raises(ValueError, match="^temperature:"):
            ops.mtkd_logit_kd(zs, zt, y, w, T)
        with pytest.raises(RuntimeError, match="temperature: expected a number in"):  # the op's own check
            torch.ops.mtkd_fast.logit_kd(zs, list(zt), y, w, T, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_range_ends_give_finite_losses(backend):
    """The ends of the range are usable: finite loss and gradients (T = 1e30 was not: NaN, 1e21 gradients)."""
    zs, zt, y, w = _inputs(dtype=torch.float32)
    for T in TEMPERATURE_RANGE:
        x = zs.clone().requires_grad_(True)
        out = _logit_kd(backend, x, zt, y, w, T)
        out.loss.backward()
        assert math.isfinite(float(out.loss.detach())) and torch.isfinite(x.grad).all()
        assert float(x.grad.abs().max()) < 1e3


# ---- training that goes non-finite ----------------------------------------------------------------------------

def _teacher_files(tmp_path, nan_in=None):
    from mtkd_fast.models import create_model

    paths = []
    for m, arch in enumerate(("resnet8", "resnet14")):
        torch.manual_seed(m)
        state = create_model(arch, 10).state_dict()
        if m == nan_in:
            state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
        p = tmp_path / f"{arch}.pth"
        torch.save({"model": state}, p)
        paths.append(str(p))
    return paths


def test_nan_teacher_checkpoint_is_refused_naming_the_file(tmp_path):
    """Through the console script: before this, NaN teacher weights ended in the agent's BCE traceback."""
    from safety_cli import TINY, one_line_error, run

    files = _teacher_files(tmp_path, nan_in=1)
    out = tmp_path / "run"
    proc = run(["train", "--student", "resnet8", "--teachers", "resnet8", "resnet14", "--teacher-checkpoints",
                *files, "--strategy", "mtkd_rl", "--agent-step", "1", "--epochs", "2", "--out-dir", out] + TINY,
               timeout=300)
    err = one_line_error(proc)
    assert proc.returncode == 1, proc.stderr
    assert err == (f"mtkd-fast train: error: teacher_checkpoints[1]: {files[1]}: the weights hold NaN/Inf values "
                   "(in fc.weight); the file is not a usable model")
    assert not (out / "checkpoint_last.pt").exists()


def test_nan_student_in_checkpoint_is_refused_on_resume(tmp_path, capsys):
    from safety_cli import TINY

    from mtkd_fast import cli

    out = tmp_path / "run"
    args = ["train", "--student", "resnet8", "--strategy", "none", "--out-dir", str(out)] + TINY
    assert cli.main(args + ["--epochs", "1"]) == 0
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    ckpt["student"]["fc.weight"].fill_(float("nan"))
    torch.save(ckpt, out / "checkpoint_last.pt")
    capsys.readouterr()
    assert cli.main(args + ["--epochs", "2", "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"mtkd-fast train: error: {out / 'checkpoint_last.pt'} (student): the weights hold NaN/Inf "
                   "values (in fc.weight); the file is not a usable model")


@pytest.mark.parametrize("poison_from,expect", [
    (2, "at epoch 1, step 1; stopped before saving: no checkpoint was written yet"),
    (3, "at epoch 2, step 1; stopped before saving: the last good checkpoint is {last} (epoch 1)"),
])
def test_non_finite_training_stops_in_one_line(tmp_path, capsys, monkeypatch, poison_from, expect):
    """Whatever makes the loss NaN during training (here the teachers' outputs, from call ``poison_from`` on):
    one line naming the epoch, the step and the last good checkpoint, which stays as it was."""
    from safety_cli import TINY, error_line

    from mtkd_fast import cli
    from mtkd_fast.teachers import LiveTeachers

    files = _teacher_files(tmp_path)
    calls = {"n": 0}
    real = LiveTeachers._forward

    def poisoned(self, images, which=None):
        out = real(self, images, which)
        calls["n"] += 1
        if calls["n"] >= poison_from:  # call 1 probes the shapes, call 2 is epoch 1's step, call 3 epoch 2's
            out.logits.fill_(float("nan"))
        return out

    monkeypatch.setattr(LiveTeachers, "_forward", poisoned)
    out = tmp_path / "run"
    rc = cli.main(["train", "--student", "resnet8", "--teachers", "resnet8", "resnet14", "--teacher-checkpoints",
                   *files, "--strategy", "mtkd_rl", "--agent-step", "1", "--epochs", "3", "--out-dir", str(out)]
                  + TINY)
    err = error_line(capsys.readouterr().err)  # one line, after the epochs' log lines
    assert rc == 1, err
    last = out / "checkpoint_last.pt"
    assert err.startswith("mtkd-fast train: error: training: the loss or the weights became NaN/Inf ")
    assert expect.format(last=last) in err, err
    if poison_from == 2:
        assert not last.exists()
    else:
        saved = torch.load(last, weights_only=True)
        assert saved["epoch"] == 1 and all(torch.isfinite(v).all() for v in saved["student"].values()
                                           if v.is_floating_point())


def test_eval_of_a_nan_checkpoint_is_refused(tmp_path):
    """It reported a top-1 of 10% (argmax of NaN rows) for a model that only outputs NaN."""
    from safety_cli import one_line_error, run

    from mtkd_fast.models import create_model

    state = create_model("resnet8", 10).state_dict()
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], float("nan"))
    path = tmp_path / "nan.pth"
    torch.save({"model": state}, path)
    proc = run(["eval", "--model", "resnet8", "--checkpoint", path, "--limit-per-class", "2"])
    err = one_line_error(proc)
    assert proc.returncode == 1 and "top1" not in proc.stdout
    assert err == f"mtkd-fast eval: error: {path}: the weights hold NaN/Inf values (in conv1.weight); the file is " \
                  "not a usable model"
