"""The strategy registry (issue 25): a strategy written in one place (here, this file) and registered by name trains
through ``Trainer``, ``train`` and ``Distiller`` with the weights and loss of a float64 reference; every registered
strategy declares what it needs and runs on exactly that; a class without its declaration is refused."""

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import re
import sys

import pytest
import torch
from standins import ExactTeachers, make_batches, make_setup

import mtkd_fast.train.strategies as S
from mtkd_fast import Distiller, cli, distiller, reference
from mtkd_fast.train import TrainConfig, Trainer, make_strategy, train
from mtkd_fast.train import config as C
from mtkd_fast.train.strategies import NEEDS, WeightStrategy, get_strategy, list_strategies, register_strategy

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64
TOY = "softmax_confidence"


class SoftmaxConfidence(WeightStrategy):
    """The toy method: w_im = softmax_m(-TCE_im / T), the teachers more right about sample i weigh more (logits
    and features). Everything a new strategy is: a declaration, option checks, a constructor and weights()."""

    requires = frozenset({"teachers", "teacher_ce"})
    options = ("temperature",)

    @classmethod
    def check_options(cls, values):  # a limit on a shared option (belongs in __init__): here to see who runs it
        if values["temperature"] > 50:
            raise ValueError(f"temperature: the toy strategy takes at most 50, got {values['temperature']}")

    def __init__(self, temperature):
        self.temperature = float(temperature)

    def weights(self, epoch, teacher_logits, teacher_ce, state, student_logits=None, student_maps=None, labels=None):
        w = torch.softmax(-teacher_ce / self.temperature, dim=1)
        return w, w, None


@contextlib.contextmanager
def _restored_registry():
    """The registry as it was after the block (it is global: other test modules iterate it)."""
    saved = dict(S._REGISTRY)
    try:
        yield
    finally:
        S._REGISTRY.clear()
        S._REGISTRY.update(saved)


@contextlib.contextmanager
def _registered(name, cls):
    """``cls`` registered as ``name`` inside the block only."""
    with _restored_registry():
        register_strategy(name)(cls)
        yield cls


@pytest.fixture
def toy():
    with _registered(TOY, SoftmaxConfidence) as cls:
        yield cls


def _expected(teacher_logits, labels, temperature):
    """The toy's weights in float64 from the teachers' logits [M, B, K]."""
    tce = reference.teacher_cross_entropy(teacher_logits.to(F64), labels)
    return torch.softmax(-tce / temperature, dim=1)


def _reference_loss(z_s, labels, t, maps, w, cfg):
    """docs/method.md section 3 in float64: mean SCE + alpha sum_m mean(w KL) + beta sum_m mean(w MSE)."""
    d = lambda x: x.detach().to(F64)  # noqa: E731
    return reference.total_loss(reference.cross_entropy_per_sample(d(z_s), labels),
                                reference.kl_per_sample(d(z_s), d(t.logits), cfg.temperature), w,
                                reference.feature_mse_per_sample([d(g) for g in maps], [d(f) for f in t.feature_maps]),
                                w, cfg.alpha, cfg.beta)


def test_a_strategy_registered_in_one_file_trains_through_the_trainer(toy):
    student, teachers, transfer, _ = make_setup(seed=7, dtype=F64)
    student.drop.p = 0.0  # the step's forward and the one below see the same logits
    cfg = TrainConfig(student="tiny", teachers=["a", "b", "c"], strategy=TOY, temperature=2.5, alpha=0.7, beta=1.5,
                      loss_backend="reference", progress=False)
    source = ExactTeachers(teachers)
    trainer = Trainer(cfg, student, source, transfer)
    assert isinstance(trainer.strategy, SoftmaxConfidence) and trainer.strategy.temperature == 2.5
    assert trainer.agent is None
    trainer.begin_epoch(0)
    seen = []
    for x, y, idx in make_batches(3, 7, seed=8, dtype=F64):  # odd batch, M = 3, K = 5
        student.train(), transfer.train()
        with torch.no_grad():  # the logits and maps the step will see (same parameters, train-mode BN)
            s_feats, z_s = student(x, is_feat=True)
            maps = transfer(s_feats[-2])
        before = [p.clone() for p in student.parameters()]
        out = trainer.train_step(x, y, idx, 0)
        t = source(x)
        w = _expected(t.logits, y, 2.5)
        torch.testing.assert_close(out["logit_weights"], w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out["feature_weights"], w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out["loss"], _reference_loss(z_s, y, t, maps, w, cfg), rtol=1e-10, atol=1e-12)
        assert out["reward"] is None
        assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # it trained
        seen.append(w)
    assert float(seen[0].std()) > 1e-3 and not torch.allclose(seen[0], seen[1])  # per sample, per batch
    metrics = trainer.end_epoch()
    assert metrics["wl_a"] + metrics["wl_b"] + metrics["wl_c"] == pytest.approx(1.0, abs=1e-9)


def test_a_registered_strategy_trains_through_train_end_to_end(toy, tmp_path):
    cfg = TrainConfig(student="resnet8", teachers=["resnet8", "resnet14"], strategy=TOY, dataset="bundled",
                      limit_per_class=2, batch_size=8, epochs=1, max_steps_per_epoch=2, progress=False, device="cpu",
                      out_dir=str(tmp_path / "run"))
    result = train(cfg)
    row = next(csv.DictReader(open(result["csv"])))
    wl = [float(row["wl_resnet8"]), float(row["wl_resnet14"])]
    assert sum(wl) == pytest.approx(1.0, abs=1e-5) and min(wl) > 0 and wl[0] != wl[1]
    assert float(row["train_kd"]) > 0
    assert json.load(open(tmp_path / "run" / "config.json"))["strategy"] == TOY


def test_a_registered_strategy_runs_in_the_distiller(toy):
    g = torch.Generator().manual_seed(3)
    B, M, K = 7, 3, 11
    z_s = torch.randn(B, K, generator=g, dtype=F64, requires_grad=True)
    z_t = torch.randn(M, B, K, generator=g, dtype=F64) * 2
    labels = torch.randint(0, K, (B,), generator=g)
    d = Distiller(TOY, temperature=3.0, alpha=0.6, loss_backend="reference")
    assert d.agent is None and isinstance(d.strategy, SoftmaxConfidence)
    out = d(z_s, labels, z_t)
    w = _expected(z_t, labels, 3.0)
    torch.testing.assert_close(out.logit_weights, w, rtol=1e-12, atol=1e-14)
    expected = reference.total_loss(reference.cross_entropy_per_sample(z_s.detach(), labels),
                                    reference.kl_per_sample(z_s.detach(), z_t, 3.0), w, alpha=0.6)
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-12, atol=1e-14)
    out.loss.backward()
    assert z_s.grad is not None and float(z_s.grad.abs().sum()) > 0
    # from_config and the make_strategy wrapper build it with its option
    student, teachers, _, _ = make_setup(seed=9, dtype=F64)
    built = Distiller.from_config(TrainConfig(teachers=["a", "b", "c"], strategy=TOY, temperature=1.5), student,
                                  teachers, example_input=make_batches(1, 2, dtype=F64)[0][0])
    assert built.strategy.temperature == 1.5 and built.feature_transfer is not None
    assert make_strategy(TOY, temperature=6.0).temperature == 6.0


def test_the_registry_gives_the_choices_and_checks_the_options(toy, monkeypatch):
    assert TOY in list_strategies() and TOY in C.STRATEGIES and TOY in distiller.STRATEGIES
    assert list_strategies(distils=False) == ("none",)
    assert TrainConfig(teachers=["a", "b"], strategy=TOY).strategy == TOY
    with pytest.raises(ValueError, match="^temperature: the toy strategy takes at most 50, got 60"):
        TrainConfig(teachers=["a", "b"], strategy=TOY, temperature=60.0)
    with pytest.raises(ValueError, match="^temperature: the toy strategy takes at most 50"):
        Distiller(TOY, temperature=60.0)
    monkeypatch.setenv("COLUMNS", "2000")
    # the CLI's help lists it among --strategy's choices
    verbs = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert f",{TOY}}}" in verbs.choices["train"].format_help()


def test_a_strategy_leaves_the_choices_with_its_registration():
    with _registered(TOY, SoftmaxConfidence):
        assert TrainConfig(teachers=["a", "b"], strategy=TOY).strategy == TOY
    assert TOY not in list_strategies() and TOY not in C.STRATEGIES
    with pytest.raises(ValueError, match=f"^strategy: expected one of .*got '{TOY}'"):
        TrainConfig(teachers=["a", "b"], strategy=TOY)
    with pytest.raises(ValueError, match=f"^strategy: expected one of .*got '{TOY}'"):
        Distiller(TOY)
    with pytest.raises(ValueError, match="^strategy: expected one of .*got 'none'"):
        Distiller("none")  # no teachers: not a Distiller's strategy


def _docs_example() -> tuple:
    """(module name, code) of docs/training.md's "Adding a strategy" example file."""
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        section = f.read().split("### Adding a strategy", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return re.match(r"# mtkd_fast/train/strategies/(\w+)\.py\n", code).group(1), code


def test_the_docs_one_file_example_is_a_new_strategy_on_the_command_line(tmp_path, monkeypatch, capsys):
    name, code = _docs_example()
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.setattr(S, "__path__", [*S.__path__, str(tmp_path)])  # the package folder, as if the file were in it
    try:
        with _restored_registry():
            S._import_strategy_modules()
            assert list_strategies()[-1] == name and list_strategies()[:6] == S._BUILTIN
            with pytest.raises(ValueError, match=f"^temperature: strategy {name} takes at most 50, got 60"):
                make_strategy(name, temperature=60.0)
            out = tmp_path / "run"
            assert cli.main(["train", "--strategy", name, "--student", "resnet8", "--teachers", "resnet8", "resnet14",
                             "--dataset", "bundled", "--limit-per-class", "2", "--batch-size", "8", "--epochs", "1",
                             "--max-steps-per-epoch", "2", "--device", "cpu", "--no-progress",
                             "--out-dir", str(out)]) == 0
            row = next(csv.DictReader(open(out / "metrics.csv")))
            assert float(row["wl_resnet8"]) + float(row["wl_resnet14"]) == pytest.approx(1.0, abs=1e-5)
            assert float(row["wf_resnet8"]) == pytest.approx(float(row["wl_resnet8"]), abs=1e-6)
            assert float(row["train_kd"]) > 0
        assert name not in list_strategies()
    finally:
        sys.modules.pop(f"{S.__name__}.{name}", None)
    capsys.readouterr()


# ------------------------------------------------------------------ every registered strategy's declaration
def test_the_builtin_strategies_are_registered_in_the_choices_order():
    assert list_strategies() == ("none", "mtkd_rl", "aver", "ebkd", "camkd", "aekd")
    assert tuple(C.STRATEGIES) == list_strategies() and tuple(distiller.STRATEGIES) == list_strategies(True)
    needs = {n: set(get_strategy(n).requires) for n in list_strategies()}
    assert needs == {"none": set(), "aver": {"teachers"}, "ebkd": {"teachers"}, "aekd": {"teachers"},
                     "camkd": {"teachers", "teacher_ce", "teacher_heads"},
                     "mtkd_rl": {"teachers", "teacher_ce", "agent_state", "agent"}}
    rl, camkd = get_strategy("mtkd_rl"), get_strategy("camkd")  # the needs_* flags read the declaration
    assert rl.needs_state and rl.needs_agent and rl.needs_teacher_ce and not rl.needs_teacher_heads
    assert camkd.needs_teacher_heads and not camkd.needs_state and not get_strategy("none").needs_teachers


@pytest.mark.parametrize("name", list_strategies())
def test_every_registered_strategy_declares_what_it_needs_and_runs_on_exactly_that(name):
    cls = get_strategy(name)
    assert cls.name == name
    assert isinstance(cls.requires, frozenset) and cls.requires <= set(NEEDS), cls.requires
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for option in cls.options:  # its options are method options with help (TrainConfig, the Distiller)
        assert option in fields and fields[option].metadata["help"].strip(), option
        assert option in distiller._config_options(), option
    S._check_declaration(name, cls)
    if not cls.needs_teachers:
        return
    # one step through the Distiller, which computes only what the declaration asks for: a strategy reading
    # more (the teachers' CE, the agent state, heads) than it declares fails here
    student, teachers, _, _ = make_setup(seed=11, dtype=F64)
    x, y, _ = make_batches(1, 5, seed=12, dtype=F64)[0]
    d = Distiller.from_config(TrainConfig(teachers=["a", "b", "c"], strategy=name), student, teachers,
                              example_input=x).to(F64)
    assert (d.agent is not None) == cls.needs_agent
    assert (getattr(d.strategy, "teacher_heads", None) is not None) == cls.needs_teacher_heads
    d.begin_epoch(1)
    feats, logits = student(x, is_feat=True)
    out = d(logits, y, ExactTeachers(teachers)(x), student_map=feats[-2])
    assert out.logit_weights.shape == (5, 3) and torch.isfinite(out.loss)
    assert (out.state is not None) == cls.needs_state


def _declared(**attrs):
    """A strategy class with ``attrs`` (requires, options, weights, __init__ ...) as given."""
    return type("Declared", (WeightStrategy,), attrs)


def _weights(self, epoch, teacher_logits, *args, **kwargs):
    w = torch.full(teacher_logits.shape[1::-1], 1.0 / teacher_logits.shape[0])
    return w, w, None


@pytest.mark.parametrize("attrs, error, match", [
    (dict(options=(), weights=_weights), TypeError, "declares no 'requires'"),
    (dict(requires=frozenset({"teachers"}), weights=_weights), TypeError, "declares no 'options'"),
    (dict(requires={"teachers"}, options=(), weights=_weights), TypeError, "requires: expected a frozenset"),
    (dict(requires=frozenset({"teachers", "labels"}), options=(), weights=_weights), TypeError,
     "requires: expected a frozenset of"),
    (dict(requires=frozenset({"teachers", "agent"}), options=(), weights=_weights), TypeError,
     r"requires 'agent', which needs \['agent_state'\] too"),
    (dict(requires=frozenset({"teacher_ce"}), options=(), weights=_weights), TypeError,
     r"requires 'teacher_ce', which needs \['teachers'\] too"),
    (dict(requires=frozenset({"teachers"}), options=("lr",), weights=_weights), TypeError,
     "options: expected a tuple of method option names"),
    (dict(requires=frozenset({"teachers"}), options="temperature", weights=_weights), TypeError,
     "options: expected a tuple"),
    (dict(requires=frozenset({"teachers"}), options=()), TypeError, "requires teachers but defines no weights"),
    (dict(requires=frozenset({"teachers"}), options=("alpha",), weights=_weights), TypeError,
     r"__init__ must take the keyword arguments \['alpha'\]"),
    (dict(requires=frozenset({"teachers", "teacher_heads"}), options=(), weights=_weights,
          __init__=lambda self: None), TypeError, r"keyword arguments \['teacher_heads'\]"),
])
def test_a_class_without_its_declaration_is_refused(attrs, error, match):
    before = list_strategies()
    with pytest.raises(error, match=match):
        register_strategy("declared")(_declared(**attrs))
    assert list_strategies() == before


def test_names_are_checked_and_not_taken_twice():
    before = list_strategies()
    with pytest.raises(TypeError, match="expected a WeightStrategy subclass"):
        register_strategy("plain")(object)
    with pytest.raises(ValueError, match="^name: expected a strategy name"):
        register_strategy("two words")
    with pytest.raises(ValueError, match=r"^name: strategy 'aver' is already registered \(Average\)"):
        register_strategy("aver")(_declared(requires=frozenset({"teachers"}), options=(), weights=_weights))
    assert register_strategy("aver")(get_strategy("aver")) is get_strategy("aver")  # a re-import is no clash
    assert list_strategies() == before
    with pytest.raises(ValueError, match=r"^strategy: expected one of \['none', 'mtkd_rl'.*got 'mmkd'"):
        get_strategy("mmkd")
