"""The fused ops' self-check (mtkd_fast.selftest) and `mtkd-fast selftest`, on the CPU kernels: the real ops
pass; a deliberately broken stand-in (wrong values, wrong gradients only, or an op that raises) is caught with
its numbers, `backend="auto"` falls back to the reference for the device (one warning), and the command exits
1. The automatic check runs for CUDA devices; the tests add "cpu" to the checked device types."""

import warnings

import pytest
import torch

from mtkd_fast import MTKDLoss, cli, ops, reference, selftest

pytestmark = pytest.mark.skipif(not ops.available("cpu"), reason="compiled extension not built (make build)")


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    selftest.reset()
    yield
    selftest.reset()


@pytest.fixture()
def auto_on_cpu(monkeypatch):
    monkeypatch.setattr(selftest, "AUTO_CHECK_DEVICE_TYPES", ("cuda", "cpu"))


def _wrong_loss(monkeypatch, factor=1.5):
    real = ops.mtkd_logit_kd

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * factor)

    monkeypatch.setattr(ops, "mtkd_logit_kd", broken)


def _wrong_gradient_only(monkeypatch):
    """Right values, gradients of the student maps off by 0.1 (a backward kernel bug)."""
    real = ops.mtkd_feature_kd

    def broken(student_maps, teacher_maps, weights, beta=5.0):
        out = real(student_maps, teacher_maps, weights, beta)
        shift = sum(0.1 * g.sum() for g in student_maps)
        return out._replace(loss=out.loss + (shift - shift.detach()))

    monkeypatch.setattr(ops, "mtkd_feature_kd", broken)


def _inputs(seed=0, B=6, K=9, M=3):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, K, generator=g, requires_grad=True)
    zt = torch.randn(M, B, K, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    w = torch.rand(B, M, generator=g)
    return zs, zt, y, w


def test_the_real_kernels_pass_every_op_dtype_and_layout():
    report = selftest.check_device("cpu", selftest.ALL_DTYPES)
    assert report.ok, report.format(only_failures=True)
    ops_seen = {r.op for r in report.results}
    assert set(selftest.CHECKS) <= ops_seen
    layouts = {(r.op, r.layout) for r in report.results}
    assert ("mtkd_feature_kd", "channels_last") in layouts and ("pooled_cosine", "channels_last") in layouts
    assert {r.dtype for r in report.results} == {"float32", "float64", "float16", "bfloat16"}
    assert any(r.output.startswith("grad") for r in report.results if r.op == "pooled_cosine")
    assert all(r.max_abs_err <= r.tol for r in report.results)


def test_a_wrong_value_is_reported_with_its_numbers(monkeypatch):
    _wrong_loss(monkeypatch)
    report = selftest.check_device("cpu")
    assert not report.ok
    bad = report.failures
    assert {(r.op, r.output) for r in bad} >= {("mtkd_logit_kd", "loss")}
    assert all(r.op == "mtkd_logit_kd" for r in bad)  # the other ops still pass
    r = next(r for r in bad if r.output == "loss")
    assert r.max_abs_err > r.tol > 0 and r.scale > 0
    assert "MISMATCH" in report.format(only_failures=True) and f"{r.max_abs_err:.3e}" in report.format()


def test_a_wrong_gradient_alone_is_caught(monkeypatch):
    _wrong_gradient_only(monkeypatch)
    report = selftest.check_device("cpu")
    bad = report.failures
    assert bad and all(r.op == "mtkd_feature_kd" and r.output.startswith("grad") for r in bad)
    assert {r.layout for r in bad} == {"contiguous", "channels_last"}


def test_an_op_that_raises_is_a_failure(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ops, "pooled_cosine", broken)
    report = selftest.check_device("cpu")
    assert not report.ok and not report.failures
    assert report.errors[0][0] == "pooled_cosine" and "illegal memory access" in report.format()


def test_auto_falls_back_to_the_reference_with_one_warning(monkeypatch, auto_on_cpu):
    _wrong_loss(monkeypatch)
    loss_fn = MTKDLoss(backend="auto")
    with pytest.warns(selftest.SelfTestWarning, match=r"mtkd_logit_kd .*loss .*max\|err\|") as record:
        assert loss_fn.resolve_backend(torch.device("cpu")) == "reference"
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once: no second warning, no second check
        assert loss_fn.resolve_backend(torch.device("cpu")) == "reference"
        zs, zt, y, w = _inputs()
        out = loss_fn(zs, zt, y, w)
    expected = reference.mtkd_logit_kd(zs, zt, y, w, loss_fn.temperature, loss_fn.alpha)
    torch.testing.assert_close(out.loss, expected.loss)  # the broken op's 1.5x is not used
    # an explicit "fused" keeps the fused backend (the user asked for it), "reference" stays reference
    assert MTKDLoss(backend="fused").resolve_backend(torch.device("cpu")) == "fused"
    assert MTKDLoss(backend="reference").resolve_backend(torch.device("cpu")) == "reference"


def test_auto_keeps_the_fused_kernels_when_they_pass(auto_on_cpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error", selftest.SelfTestWarning)
        assert MTKDLoss(backend="auto").resolve_backend(torch.device("cpu")) == "fused"
        assert selftest.device_ok("cpu", (torch.float32, torch.bfloat16))


def test_the_dtype_in_use_is_checked(monkeypatch, auto_on_cpu):
    """A kernel broken for bfloat16 only: float32 inputs keep the fused path, bfloat16 ones fall back."""
    real = ops.mtkd_logit_kd

    def broken_bf16(student_logits, *args, **kwargs):
        out = real(student_logits, *args, **kwargs)
        return out._replace(kl=out.kl * 2) if student_logits.dtype == torch.bfloat16 else out

    monkeypatch.setattr(ops, "mtkd_logit_kd", broken_bf16)
    loss_fn = MTKDLoss(backend="auto")
    assert loss_fn.resolve_backend(torch.device("cpu"), (torch.float32,)) == "fused"
    with pytest.warns(selftest.SelfTestWarning, match="bfloat16"):
        assert loss_fn.resolve_backend(torch.device("cpu"), (torch.bfloat16,)) == "reference"


def test_cpu_is_not_checked_automatically_by_default(monkeypatch):
    _wrong_loss(monkeypatch)
    assert selftest.device_ok("cpu")  # the CPU kernels run in the test suite; only CUDA is checked on first use
    assert MTKDLoss(backend="auto").resolve_backend(torch.device("cpu")) == "fused"


def test_selftest_command(monkeypatch, capsys):
    assert cli.main(["selftest", "--device", "cpu", "--dtypes", "float32", "bfloat16"]) == 0
    assert "selftest cpu: ok" in capsys.readouterr().out
    _wrong_loss(monkeypatch)
    assert cli.main(["selftest", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "mtkd_logit_kd" in out and "max|err|" in out


def test_selftest_command_rejects_a_bad_device(capsys):
    assert cli.main(["selftest", "--device", "tpu:7"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        assert cli.main(["selftest", "--device", "cuda:0"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not (torch.cuda.is_available() and ops.available("cuda")), reason="needs a CUDA device")
def test_cuda_kernels_pass_the_selftest():
    report = selftest.check_device("cuda", selftest.ALL_DTYPES)
    assert report.ok, report.format(only_failures=True)
    assert selftest.device_ok("cuda", (torch.float32, torch.float16, torch.bfloat16))


def test_a_compiled_loss_uses_the_eager_check(monkeypatch, auto_on_cpu):
    """torch.compile(fullgraph=True) traces resolve_backend: the check ran eagerly first, and a failed device
    keeps the reference inside the compiled graph too."""
    _wrong_loss(monkeypatch)
    loss_fn = MTKDLoss(backend="auto")
    zs, zt, y, w = _inputs()
    with pytest.warns(selftest.SelfTestWarning):
        eager = loss_fn(zs, zt, y, w).loss
    compiled = torch.compile(lambda z: loss_fn(z, zt, y, w).loss, fullgraph=True)
    torch.testing.assert_close(compiled(zs), eager)
    torch.testing.assert_close(eager, reference.mtkd_logit_kd(zs, zt, y, w, 4.0, 1.0).loss)
