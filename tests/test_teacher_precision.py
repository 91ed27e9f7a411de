"""One teacher-precision policy (issue 22; docs/training.md "Teacher precision"): ``resolve_precision(choice, device,
strategy)`` decides for train, cache build, the benchmarks and the demo; a cache built with default settings is
accepted by every strategy's default run; an explicit mismatch is refused naming ``teacher_precision``; runs
and caches record what was used."""

import json
import os

import pytest
import torch

pytest.importorskip("mtkd_fast.cache")

from mtkd_fast import models  # noqa: E402
from mtkd_fast import teachers as T  # noqa: E402
from mtkd_fast.cache import CacheMismatchError, build_cache, open_teacher_source  # noqa: E402
from mtkd_fast.teachers import LiveTeachers, resolve_precision  # noqa: E402
from mtkd_fast.train import TrainConfig, train  # noqa: E402
from mtkd_fast.train.config import STRATEGIES  # noqa: E402

DISTILLING = [s for s in STRATEGIES if s != "none"]


@pytest.fixture(params=[True, False], ids=["native_bf16", "no_native_bf16"])
def fast_bf16(request, monkeypatch):
    """Both kinds of CPU: the policy must agree with itself on each."""
    monkeypatch.setattr(T, "cpu_has_fast_bf16", lambda: request.param)
    return request.param


def _nets(seed=0):
    torch.manual_seed(seed)
    return [models.create_model("resnet8", 10).eval(), models.create_model("resnet14", 10).eval()]


def _dataset():
    from mtkd_fast.data import build_dataset

    return build_dataset("bundled", split="train", augment=True, seed=0, limit_per_class=1)


def _cache(tmp_path, precision, nets, **options):
    path = str(tmp_path / f"cache_{precision}_{'_'.join(options)}")
    m = build_cache(path, _dataset(), nets, views=1, teacher_names=["resnet8", "resnet14"], batch_size=16,
                    progress=False, teacher_precision=precision, **options)
    return path, m


# ---- the resolver ---------------------------------------------------------------------------------------------------

@pytest.fixture(params=["decided", "none_kept"])
def table(request, monkeypatch):
    """The policy as decided (MTKD-RL kept in fp32 by the paired study) and as it would be with no strategy kept:
    both code paths of every check below."""
    if request.param == "none_kept":
        monkeypatch.setattr(T, "AUTO_FP32_STRATEGIES", ())
    return T.AUTO_FP32_STRATEGIES


def _auto(strategy, fast):
    """What "auto" must give, written out from docs/training.md "Teacher precision"."""
    if strategy in T.AUTO_FP32_STRATEGIES or (strategy is None and T.AUTO_FP32_STRATEGIES):
        return "fp32"
    return "bf16" if fast else "fp32"


def test_the_decided_policy():
    assert T.AUTO_FP32_STRATEGIES == ("mtkd_rl",)  # the paired study (docs/training.md): harm for MTKD-RL


def test_auto_follows_the_table_and_the_device(table, fast_bf16):
    for strategy in DISTILLING + [None]:
        want = _auto(strategy, fast_bf16)
        assert resolve_precision("auto", "cpu", strategy) == want, strategy
        for explicit in ("fp32", "bf16"):  # an explicit choice is the user's, whatever the table says
            assert resolve_precision(explicit, "cpu", strategy) == explicit
        live = LiveTeachers(_nets(), strategy=strategy)
        assert live.precision_used == want and live.precision_reason.startswith("auto: ")
        if strategy in table:
            assert f"strategy {strategy!r}" in live.describe()
    # no strategy given (a cache, or the engine on its own): what every strategy's auto accepts
    assert resolve_precision("auto", "cpu") == ("fp32" if table else "bf16" if fast_bf16 else "fp32")


def test_bad_choices_name_the_argument():
    with pytest.raises(ValueError, match=r"^precision: expected one of"):
        resolve_precision("fp64", "cpu", "mtkd_rl")
    with pytest.raises(ValueError, match=r"^precision: 'fp16' is not supported for teachers on a CPU"):
        resolve_precision("fp16", "cpu", "aver")


# ---- every command gives the same answer ----------------------------------------------------------------------------

def test_train_cache_build_bench_and_demo_agree(tmp_path, table, fast_bf16):
    from mtkd_fast.bench.epoch import BenchSpec, Run, build_teachers, random_dataset
    from mtkd_fast.demo import DemoSettings
    from mtkd_fast.train.run import _teacher_source

    nets = _nets()
    for strategy in DISTILLING:
        cfg = TrainConfig(teachers=["resnet8", "resnet14"], strategy=strategy)
        assert _teacher_source(cfg, nets, torch.device("cpu")).precision_used == _auto(strategy, fast_bf16)
    _, m = _cache(tmp_path, "auto", nets)  # the demo builds its cache this way too (DemoSettings' "auto")
    assert m["teacher_precision"] == _auto(None, fast_bf16)
    spec = BenchSpec(students=("resnet8",), teachers=("resnet8", "resnet14"), steps=1, batch_size=4,
                     configs=("mtkd_rl_live",), device="cpu", memory_steps=0, progress=False).resolved()
    run = Run("mtkd_rl_live", spec, "resnet8", random_dataset(spec), build_teachers(spec, "cpu"))
    assert run.teacher_precision.split()[0] == _auto("mtkd_rl", fast_bf16)
    assert DemoSettings().teacher_precision == "auto"
    with pytest.raises(ValueError, match=r"^teacher_precision: expected one of"):
        DemoSettings(teacher_precision="int8").validate()


# ---- (cache built with X, train asks Y) ---------------------------------------------------------------------------

@pytest.mark.parametrize("built", ["auto", "fp32", "bf16"])
def test_every_cache_and_run_precision_pair(tmp_path, built, table, fast_bf16):
    """Accepted when the run asks exactly the precision the cache's teachers ran in, or "auto" (any cache, except
    that a strategy kept in fp32 takes only an fp32 one); refused, naming teacher_precision, otherwise. A default
    cache is accepted by every strategy's default run. With the teachers given (LiveTeachers) and without (a
    run with only --teacher-cache)."""
    nets = _nets()
    path, m = _cache(tmp_path, built, nets)
    cached = resolve_precision(built, "cpu", None)
    assert m["teacher_precision"] == cached
    for asked in ("auto", "fp32", "bf16"):
        for strategy in DISTILLING:
            ok = asked == cached or (asked == "auto" and (strategy not in table or cached == "fp32"))
            if built == asked == "auto":
                assert ok, strategy
            for teachers in (None, LiveTeachers(nets, precision=asked, strategy=strategy)):
                opts = {} if teachers is not None else {"precision": asked, "strategy": strategy}
                if ok:
                    assert open_teacher_source(path, teachers=teachers, **opts).teacher_precision == cached
                elif asked == "auto":
                    with pytest.raises(CacheMismatchError, match=rf"^teacher_precision: auto keeps float32 teachers "
                                                                 rf"for strategy '{strategy}'.*'{cached}'"):
                        open_teacher_source(path, teachers=teachers, **opts)
                else:
                    with pytest.raises(CacheMismatchError,
                                       match=rf"^teacher_precision: .*cache has '{cached}', given '{asked}'"):
                        open_teacher_source(path, teachers=teachers, **opts)


# ---- what runs log and record -------------------------------------------------------------------------------------

def _checkpoints(tmp_path, nets):
    paths = []
    for i, net in enumerate(nets):
        paths.append(str(tmp_path / f"t{i}.pth"))
        torch.save({"model": net.state_dict()}, paths[-1])
    return paths


def _run(tmp_path, name, **changes):
    cfg = TrainConfig(student="resnet8", dataset="bundled", limit_per_class=1, batch_size=5, epochs=1,
                      max_steps_per_epoch=1, progress=False, out_dir=str(tmp_path / name), **changes)
    train(cfg)
    with open(os.path.join(cfg.out_dir, "teachers.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_runs_log_and_record_the_precision(tmp_path, capsys):
    nets = _nets()
    ckpts = _checkpoints(tmp_path, nets)
    cached = resolve_precision("auto", "cpu", None)
    path, _ = _cache(tmp_path, "auto", nets)
    # a cache and no teachers: the log says what the cached outputs were computed in
    rec = _run(tmp_path, "cache_only", teacher_cache=path)
    out = capsys.readouterr().out
    assert f"outputs computed in {cached}" in out and "computed live" not in out
    assert rec == {"teacher_precision": "auto", "strategy": "mtkd_rl", "source": "cache", "cache": path,
                   "precision_used": cached, "fold_bn": True}
    # a logits-only cache: the maps and embeddings are computed live, and the log and the record say in what
    lpath, _ = _cache(tmp_path, "fp32", nets, fields=("logits",))
    rec = _run(tmp_path, "logits_only", teacher_cache=lpath, teachers=["resnet8", "resnet14"],
               teacher_checkpoints=ckpts, teacher_precision="fp32")
    out = capsys.readouterr().out
    assert "outputs computed in fp32" in out
    assert "embeddings and feature_maps of teachers [0, 1] left out of it, computed live in fp32" in out
    assert rec["live_teachers"] == [0, 1] and rec["live_precision_used"] == "fp32" and rec["precision_used"] == "fp32"
    # live teachers: the record has the resolved precision next to the choice
    rec = _run(tmp_path, "live", teachers=["resnet8", "resnet14"], teacher_checkpoints=ckpts, strategy="aver")
    assert rec["source"] == "live" and rec["teacher_precision"] == "auto"
    assert rec["precision_used"] == resolve_precision("auto", "cpu", "aver")
    # an explicit mismatch is refused before training, naming the option
    other = "fp32" if cached == "bf16" else "bf16"
    with pytest.raises(CacheMismatchError, match=r"^teacher_precision: "):
        _run(tmp_path, "mismatch", teacher_cache=path, teacher_precision=other)


def test_cache_build_cli_prints_the_precision(tmp_path, capsys):
    from mtkd_fast import cli

    ckpts = _checkpoints(tmp_path, _nets())
    rc = cli.main(["cache", "build", "--out", str(tmp_path / "c"), "--dataset", "bundled", "--limit-per-class", "1",
                   "--teachers", "resnet8", "resnet14", "--checkpoints", *ckpts, "--no-progress",
                   "--batch-size", "16"])
    out = capsys.readouterr().out
    want = resolve_precision("auto", "cpu", None)
    assert rc == 0 and f"teachers ran in {want}" in out
    with open(tmp_path / "c" / "manifest.json") as f:
        assert json.load(f)["teacher_precision"] == want


def test_precision_study_verdict_is_the_paired_two_standard_error_rule():
    import math
    import statistics

    from repo_tools import load_tool

    study = load_tool("precision_study")
    g = torch.Generator().manual_seed(3)
    base = (70 + 5 * torch.rand(7, generator=g)).tolist()  # seeds differ far more than the pairs do

    def rows(strategy, diffs):
        return [r for s, (b, d) in enumerate(zip(base, diffs)) for r in (
            {"strategy": strategy, "seed": s, "precision": "fp32", "test_top1": b},
            {"strategy": strategy, "seed": s, "precision": "bf16", "test_top1": b + d})]

    harm = [-0.9, -1.2, -0.7, -1.1, -1.0]
    noise = [0.8, -1.3, 0.4, -0.2, 0.6, -0.9, 0.1]
    unpaired = rows("camkd", [0.5])[:1]  # an fp32 run whose bf16 partner is missing: left out
    out = {r["strategy"]: r for r in study.summarise(rows("mtkd_rl", harm) + rows("aver", noise) + unpaired)}
    assert set(out) == {"mtkd_rl", "aver"}
    for name, diffs in (("mtkd_rl", harm), ("aver", noise)):
        r = out[name]
        assert r["seeds"] == len(diffs)
        assert math.isclose(r["diff_mean"], statistics.fmean(diffs), abs_tol=1e-9)
        assert math.isclose(r["diff_se"], statistics.stdev(diffs) / math.sqrt(len(diffs)), abs_tol=1e-9)
    assert out["mtkd_rl"]["verdict"].startswith("harm") and out["aver"]["verdict"].startswith("no harm")
    # just inside two standard errors is not harm
    d = [-1.0, 0.0, -1.0, 0.0]  # mean -0.5, SE 0.2887: -0.5 > -0.577
    assert study.summarise(rows("ebkd", d))[0]["verdict"].startswith("no harm")
    assert "| mtkd_rl | 5 |" in study.format_table(list(out.values()))


def test_info_says_what_auto_picks_per_strategy(capsys, table, fast_bf16):
    from mtkd_fast import cli

    assert cli.main(["info"]) == 0
    auto = json.loads(capsys.readouterr().out)["teacher_precision_auto"]
    assert auto["cpu"] == {**{s: _auto(s, fast_bf16) for s in DISTILLING}, "cache": _auto(None, fast_bf16)}
    assert auto["cpu_native_bf16"] is fast_bf16
