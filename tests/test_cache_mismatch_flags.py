"""A teacher cache that does not match the run is refused in one line that names the flag to change, with the
value that makes it match (issue 25: `cache has 300, given 10000; pass --limit-per-class 30`), and following that
advice makes the run go."""

import re

import pytest
import torch

from mtkd_fast import cli, data
from mtkd_fast.cache import CacheMismatchError, open_teacher_source
from mtkd_fast.models import create_model

TEACHERS = ["resnet8", "resnet14"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two saved teachers and a cache of them on 2 images per class (fp32, one view)."""
    d = tmp_path_factory.mktemp("mismatch")
    files = []
    for seed, arch in enumerate(TEACHERS):
        torch.manual_seed(seed)
        files.append(str(d / f"{arch}.pth"))
        torch.save({"model": create_model(arch, 10).state_dict()}, files[-1])
    cache = str(d / "cache")
    assert cli.main(["cache", "build", "--out", cache, "--dataset", "bundled", "--limit-per-class", "2", "--teachers",
                     *TEACHERS, "--checkpoints", *files, "--views", "1", "--teacher-precision", "fp32",
                     "--device", "cpu", "--no-progress"]) == 0
    return d, files, cache


def _train(built, extra, out="run"):
    d, files, cache = built
    return ["train", "--student", "resnet8", "--teachers", *TEACHERS, "--teacher-checkpoints", *files,
            "--teacher-cache", cache, "--dataset", "bundled", "--limit-per-class", "2", "--epochs", "1",
            "--max-steps-per-epoch", "1", "--batch-size", "8", "--device", "cpu", "--no-progress",
            "--out-dir", str(d / out)] + extra


def _refusal(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("mtkd-fast train: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one line, the last
    return errors[0]


@pytest.mark.parametrize("change, expected", [
    (["--limit-per-class", "3"], r"dataset\.num_samples: cache has 20, given 30; pass --limit-per-class 2 \(the "
                                 r"cache's 20 images\), or rebuild the cache with the run's --limit-per-class$"),
    (["--data-seed", "4"], r"dataset\.seed: cache has 0, given 4; pass --data-seed 0, or rebuild the cache with "
                           r"--seed 4$"),
    (["--teacher-precision", "bf16"], r"cache has 'fp32', given 'bf16'; pass --teacher-precision fp32, or rebuild"),
    (["--teachers", *TEACHERS, "resnet8"], r"cache has 2, given 3; pass --teachers resnet8 resnet14 with their "
                                           r"--teacher-checkpoints"),
])
def test_a_mismatch_names_the_flag_and_its_value(built, capsys, change, expected):
    d, files, _ = built
    if change[0] == "--teachers":  # a third teacher (MTKD needs at least two, so the run has more than the cache)
        change = change + ["--teacher-checkpoints", *files, files[0]]
    assert cli.main(_train(built, change, out="refused")) == 2
    assert re.search(expected, _refusal(capsys))
    assert not (d / "refused" / "checkpoint_last.pt").exists()


def test_another_checkpoint_names_which_one(built, capsys):
    d, files, _ = built
    torch.manual_seed(7)
    other = str(d / "other.pth")
    torch.save({"model": create_model("resnet14", 10).state_dict()}, other)
    assert cli.main(_train(built, ["--teacher-checkpoints", files[0], other], out="refused")) == 2
    line = _refusal(capsys)
    assert "teachers[1].weights_sha256" in line
    assert "as --teacher-checkpoints' second (resnet14; the cache's teachers, in order: resnet8 resnet14)" in line


@pytest.mark.parametrize("change", [["--limit-per-class", "3"], ["--data-seed", "4"]])
def test_the_advice_makes_the_run_go(built, capsys, change):
    """Run with the mismatch, take the flag and value the refusal names, append them: the run trains."""
    argv = _train(built, change, out=f"advised{change[0]}")
    assert cli.main(argv) == 2
    flag, value = re.search(r"pass (--[a-z-]+) (\d+)", _refusal(capsys)).groups()
    assert cli.main(argv + [flag, value]) == 0, capsys.readouterr().err


class _Renamed:
    """The bundled subset described as another dataset, or with another augmentation recipe."""

    def __init__(self, ds, **changes):
        self.ds, self.changes = ds, changes

    def __len__(self):
        return len(self.ds)

    def describe(self):
        d = self.ds.describe()
        return {**d, **{k: (v(d[k]) if callable(v) else v) for k, v in self.changes.items()}}


def test_dataset_name_and_recipe(built):
    _, _, cache = built
    ds = data.build_dataset("bundled", split="train", augment=True, seed=0, limit_per_class=2)
    open_teacher_source(cache, dataset=ds)  # the matching data passes
    with pytest.raises(CacheMismatchError, match=r"dataset\.name: cache has 'bundled', given 'cifar100'; pass "
                                                 r"--dataset bundled, or rebuild the cache with the run's --dataset "
                                                 r"cifar100"):
        open_teacher_source(cache, dataset=_Renamed(ds, name="cifar100"))
    with pytest.raises(CacheMismatchError, match=r"dataset\.recipe\.\w+: .*no option of the run sets it .*rebuild the "
                                                 r"cache$"):
        open_teacher_source(cache, dataset=_Renamed(ds, recipe=lambda r: {k: [v, 1] for k, v in r.items()}))


def test_a_build_into_a_cache_of_other_settings_names_the_flag(built, capsys):
    d, files, cache = built
    argv = ["cache", "build", "--out", cache, "--dataset", "bundled", "--limit-per-class", "2", "--teachers", *TEACHERS,
            "--checkpoints", *files, "--views", "1", "--teacher-precision", "fp32", "--device", "cpu", "--no-progress"]
    assert cli.main(argv + ["--views", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("made with a different views: cache has 1, this build has 3; choose another path (or pass "
                        "--views 1 to reuse it)"), err
    assert cli.main(argv + ["--no-fold-bn"]) == 2
    assert "(or pass --fold-bn to reuse it)" in capsys.readouterr().err
    assert cli.main(argv) == 0  # the same settings: the finished cache is reused
