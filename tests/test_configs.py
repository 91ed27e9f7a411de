"""configs/: the paper's runs, one YAML per run (issue 25). Every file parses with only TrainConfig fields (and a
teacher config's "model"), the MTKD-RL students carry the top-1 the authors report (checked against the table in
docs/method.md), the students read the checkpoints the teacher configs write, and every config runs one training
step through the CLI as written (only the data, run length, batch and device changed) on random data of its
shape: CIFAR-100 32x32 images with 100 classes; ImageNet-layout 224x224 crops with the real teachers, two classes."""

import glob
import json
import os
import pickle
import re
import shlex

import numpy as np
import pytest
import torch

from mtkd_fast import cli
from mtkd_fast.models import create_model
from mtkd_fast.train.config import TEACHER_MODEL_KEY, TrainConfig, read_config, teacher_config
from mtkd_fast.train.trainer import STUDENT_BEST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"),
                                                              recursive=True))
CIFAR = [p for p in CONFIGS if p.startswith(os.path.join("configs", "cifar100", ""))]
IMAGENET = [p for p in CONFIGS if p.startswith(os.path.join("configs", "imagenet", ""))]


def _one_step(batch: int) -> list:
    """The run-length, batch and device changes that make a config one step on a CPU; nothing else changes."""
    return ["--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", str(batch), "--device", "cpu",
            "--no-progress"]


# the names docs/method.md's table (the authors' README) gives the zoo's students
PAPER_NAMES = {"RegNetX-200MF": "RegNetX_200MF", "MobileNetV2": "MobileNetV2", "ShuffleNetV2": "ShuffleV2",
               "ResNet-56": "resnet56"}
TOP1 = re.compile(r"^# authors' top-1: (\d+\.\d+) \(([^,]+), (dynamic|plain);", re.M)


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """The PNGs (tested elsewhere) would take most of a one-step run's time here."""
    from mtkd_fast import _optional

    monkeypatch.setattr(_optional, "pyplot", lambda purpose: None)


def _values(path: str) -> dict:
    return read_config(os.path.join(ROOT, path), extra=(TEACHER_MODEL_KEY,))


def _is_teacher(path: str) -> bool:
    return TEACHER_MODEL_KEY in _values(path)


def _text(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _reported_top1() -> dict:
    """{(zoo student, dynamic): top-1} from docs/method.md section 8, item 5 (the authors' README table)."""
    text = _text(os.path.join("docs", "method.md"))
    table = text[text.index("student          dynamic   plain"):]
    rows = {}
    for line in table.splitlines()[1:]:
        match = re.match(r"^\s+(\S+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s*$", line)
        if not match:
            break
        student = PAPER_NAMES[match.group(1)]
        rows[(student, True)], rows[(student, False)] = float(match.group(2)), float(match.group(3))
    return rows


def test_there_is_one_config_per_run_of_the_paper():
    assert len(CONFIGS) == len(set(CONFIGS)) and IMAGENET
    teachers = sorted(_values(p)[TEACHER_MODEL_KEY] for p in CIFAR if _is_teacher(p))
    assert teachers == sorted(["resnet32x4", "wrn_28_4", "RegNetY_400MF", "RegNetX_400MF"])
    runs = sorted((_values(p)["student"], _values(p)["strategy"], _values(p).get("dynamic", False))
                  for p in CIFAR if not _is_teacher(p))
    students = sorted(set(PAPER_NAMES.values()))
    expected = sorted([(s, "mtkd_rl", d) for s in students for d in (True, False)] +
                      [(s, m, False) for s in students for m in ("aver", "ebkd", "camkd", "aekd")])
    assert runs == expected
    out_dirs = [(_values(p)["out_dir"]) for p in CONFIGS]
    assert len(set(out_dirs)) == len(out_dirs), "two configs write one out_dir"


@pytest.mark.parametrize("path", CONFIGS)
def test_every_key_is_an_option_and_every_value_valid(path):
    values = _values(path)
    if TEACHER_MODEL_KEY in values:
        options = {k: v for k, v in values.items() if k != TEACHER_MODEL_KEY}
        config = teacher_config(values[TEACHER_MODEL_KEY], **options)
        # the file spells out the recipe teacher_config encodes (lr by model, weight decay)
        default = teacher_config(values[TEACHER_MODEL_KEY])
        assert (config.lr, config.weight_decay, config.strategy) == (default.lr, default.weight_decay, "none")
    else:
        config = TrainConfig.load(os.path.join(ROOT, path))
    assert config.data_root is None, "the data's place is the user's --data-root"
    assert not config.resume and not config.overwrite


def test_an_unknown_key_is_named_in_one_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(_text(CIFAR[0]) + "learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"^config: unknown option\(s\) \['learning_rate'\]") as info:
        read_config(str(bad), extra=(TEACHER_MODEL_KEY,))
    assert "\n" not in str(info.value)
    teacher = next(p for p in CIFAR if _is_teacher(p))
    with pytest.raises(ValueError, match="run it with mtkd-fast train-teacher --config"):
        TrainConfig.load(os.path.join(ROOT, teacher))


def test_mtkd_rl_students_carry_the_authors_top1():
    reported = _reported_top1()
    assert len(reported) == 8
    seen = {}
    for path in CIFAR:
        values = _values(path)
        if values.get("strategy") != "mtkd_rl":
            continue
        found = TOP1.findall(_text(path))
        assert len(found) == 1, f"{path}: no (or several) \"# authors' top-1: N (name, dynamic|plain; ...\" line"
        top1, name, variant = found[0]
        key = (values["student"], bool(values["dynamic"]))
        assert PAPER_NAMES[name] == values["student"] and (variant == "dynamic") == key[1], path
        seen[key] = float(top1)
    assert seen == reported


def test_students_read_what_the_teacher_configs_write_and_share_one_recipe():
    written = {_values(p)[TEACHER_MODEL_KEY]: os.path.join(_values(p)["out_dir"], STUDENT_BEST)
               for p in CIFAR if _is_teacher(p)}
    students = [p for p in CIFAR if not _is_teacher(p)]
    method_keys = {"strategy", "dynamic", "warmup_weights", "agent_update", "agent_step", "agent_lr",
                   "camkd_weight_grad", "aekd_solver", "aekd_nu", "out_dir", "student"}
    shared = None
    for path in students:
        values = _values(path)
        assert values["teacher_checkpoints"] == [written[t] for t in values["teachers"]], path
        rest = {k: v for k, v in values.items() if k not in method_keys}
        shared = rest if shared is None else shared
        assert rest == shared, f"{path} differs from the other students' recipe"


def _fake_cifar100(root, n_train=8, n_test=4, seed=0):
    """A cifar-100-python folder of random images with random labels out of the 100 classes."""
    rng = np.random.default_rng(seed)
    os.makedirs(root)
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 100, size=n).tolist()
        with open(os.path.join(root, split), "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * n}, f)
    with open(os.path.join(root, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{k}".encode() for k in range(100)]}, f)
    return root


def _run(argv, capsys):
    """Runs a verb; returns its log (stderr: the verbs keep logs there and print only their result on stdout)."""
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    json.loads(out)  # the result, machine-readable
    return err


@pytest.fixture(scope="module")
def cifar_workspace(tmp_path_factory):
    """A folder with random CIFAR-100-shaped data, in which the teacher configs have each run one step (writing
    their checkpoints where the student configs read them)."""
    work = tmp_path_factory.mktemp("cifar_runs")
    data = _fake_cifar100(str(work / "cifar-100-python"))
    return str(work), data


def test_teacher_configs_run_one_step_each(cifar_workspace, monkeypatch, capsys):
    work, data = cifar_workspace
    monkeypatch.chdir(work)
    for path in (p for p in CIFAR if _is_teacher(p)):
        values = _values(path)
        _run(["train-teacher", "--config", os.path.join(ROOT, path), "--data-root", data] + _one_step(4), capsys)
        saved = torch.load(os.path.join(values["out_dir"], STUDENT_BEST), weights_only=True)
        create_model(values[TEACHER_MODEL_KEY], 100).load_state_dict(saved["model"])  # the teacher, 100 classes


@pytest.mark.parametrize("path", [p for p in CIFAR if not _is_teacher(p)])
def test_student_config_runs_one_step(path, cifar_workspace, monkeypatch, capsys):
    work, data = cifar_workspace
    monkeypatch.chdir(work)
    values = _values(path)
    for name, ckpt in zip(values["teachers"], values["teacher_checkpoints"]):
        if not os.path.isfile(ckpt):  # this test run alone: the random teachers the teacher configs would write
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            torch.save({"model": create_model(name, 100).state_dict()}, ckpt)
    if values.get("aekd_solver") == "libsvm":
        pytest.importorskip("sklearn", reason="aekd_solver libsvm needs mtkd_fast[baselines]")
    _run(["train", "--config", os.path.join(ROOT, path), "--data-root", data] + _one_step(4), capsys)
    config = read_config(os.path.join(values["out_dir"], "config.json"))
    # the run is the config as written except for the overrides above
    changed = {k for k in values if config[k] != values[k]}
    assert changed <= {"epochs", "batch_size"}, changed
    assert os.path.isfile(os.path.join(values["out_dir"], STUDENT_BEST))


def _cache_command(path: str) -> list:
    """The `mtkd-fast cache build` command a config's comments give (continued with backslashes)."""
    lines, taking = [], False
    for line in _text(path).splitlines():
        body = line[1:].strip() if line.startswith("#") else None
        if body is not None and (taking or body.startswith("mtkd-fast cache build")):
            taking = body.endswith("\\")
            lines.append(body.rstrip("\\"))
            if not taking:
                break
    assert lines, f"{path}: no `mtkd-fast cache build` command in its comments"
    return shlex.split(" ".join(lines))[1:]


def _fake_imagefolder(root, classes=2, per_class=2, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(48 + 8 * i, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"img{i}.JPEG"), quality=90)
    return root


def _trained_like(model):
    """Zero the last BatchNorm scale of every residual block (torchvision's zero_init_residual): at random init
    ResNet-101's pooled embedding reaches about 1.8e5, past float16's range, so the float16 cache would hold inf,
    unlike a trained teacher's."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for m in model.modules():
        if isinstance(m, Bottleneck):
            torch.nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, BasicBlock):
            torch.nn.init.zeros_(m.bn2.weight)
    return model


@pytest.fixture(scope="module")
def imagenet_workspace(tmp_path_factory):
    """Random ImageNet-layout data (two classes), teacher weights where the configs name them, and the teacher
    cache built by the command the configs' comments give (one cache serves them all)."""
    commands = {tuple(_cache_command(p)) for p in IMAGENET}
    assert len(commands) == 1, "the ImageNet configs give different cache commands"
    work = tmp_path_factory.mktemp("imagenet_runs")
    data = _fake_imagefolder(str(work / "imagenet"))
    values = _values(IMAGENET[0])
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for name, ckpt in zip(values["teachers"], values["teacher_checkpoints"]):
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            # a bare state_dict, as torchvision's files are
            torch.save(_trained_like(create_model(name, 2)).state_dict(), ckpt)
        argv = list(commands.pop())
        argv[argv.index("--data-root") + 1] = data
        assert argv[:2] == ["cache", "build"] and argv[argv.index("--out") + 1] == values["teacher_cache"]
        assert cli.main(argv + ["--no-progress"]) == 0
    finally:
        os.chdir(cwd)
    return str(work), data


@pytest.mark.parametrize("path", IMAGENET)
def test_imagenet_config_runs_one_step_from_its_cache(path, imagenet_workspace, monkeypatch, capsys):
    work, data = imagenet_workspace
    monkeypatch.chdir(work)
    values = _values(path)
    backend = [] if values.get("data_backend") != "dali" or _dali() else ["--data-backend", "torchvision"]
    out = _run(["train", "--config", os.path.join(ROOT, path), "--data-root", data] + _one_step(2) + backend,
               capsys)
    assert f"teachers: cache {values['teacher_cache']}" in out
    config = read_config(os.path.join(values["out_dir"], "config.json"))
    assert {k for k in values if config[k] != values[k]} <= {"epochs", "batch_size", "data_backend"}
    assert os.path.isfile(os.path.join(values["out_dir"], STUDENT_BEST))


def _dali() -> bool:
    from mtkd_fast.data import dali_available

    return bool(dali_available("cpu"))


def test_train_teacher_config_names_its_model_and_flags_override_it(tmp_path, monkeypatch, capsys):
    import mtkd_fast.train as T

    calls = {}
    monkeypatch.setattr(T, "train_teacher", lambda model, **kw: calls.update(model=model, **kw) or {"final": {}})
    path = os.path.join(ROOT, next(p for p in CIFAR if _is_teacher(p)))
    values = _values(path)
    assert cli.main(["train-teacher", "--config", path, "--lr", "0.02"]) == 0
    assert calls.pop("model") == values[TEACHER_MODEL_KEY] and calls.pop("lr") == 0.02
    assert calls == {k: v for k, v in values.items() if k not in (TEACHER_MODEL_KEY, "lr")}
    assert cli.main(["train-teacher", "--config", path, "--model", "resnet8"]) == 0
    assert calls["model"] == "resnet8"
    capsys.readouterr()
    for text, message in (("epochs: 3\n", "model: give --model MODEL, or a --config file with a \"model\" entry"),
                          ("model: resnet8\nstudent: resnet8\n", "gives 'student'; a train-teacher config names"),
                          ("model: resnet8\nlearning_rate: 0.1\n", "config: unknown option(s) ['learning_rate']")):
        bad = tmp_path / "t.yaml"
        bad.write_text(text)
        assert cli.main(["train-teacher", "--config", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mtkd-fast train-teacher: error: ") and message in err and "\n" not in err, err


def test_the_docs_table_lists_every_config_with_its_top1():
    text = _text(os.path.join("docs", "training.md"))
    section = text[text.index("## The paper's runs (configs/)"):]
    section = section[:section.index("\n## ", 1)]
    listed = set()
    for head, alternatives, tail in re.findall(r"`(configs/[^`{]*)\{([^}]*)\}([^`]*\.yaml)`", section):
        listed |= {f"{head}{a}{tail}" for a in alternatives.split(",")}
    assert listed == {p.replace(os.sep, "/") for p in CONFIGS}
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| (\d+\.\d+) / (\d+\.\d+) \|$", section, re.M)
    assert {(s, d): float(t) for s, dyn, plain in rows for d, t in ((True, dyn), (False, plain))} == \
        _reported_top1()
