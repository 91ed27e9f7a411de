"""Config files are checked with the same rules and messages as flags: types, ranges and choices."""

import json

import pytest

from mtkd_fast import cli
from mtkd_fast.train import TrainConfig


@pytest.mark.parametrize("values,message", [
    ({"lr": "0.1"}, "lr: expected a number, got '0.1'"),
    ({"epochs": 2.5}, "epochs: expected an integer, got 2.5"),
    ({"epochs": "3"}, "epochs: expected an integer, got '3'"),
    ({"teachers": "resnet8"}, "teachers: expected a list of strings, got 'resnet8'"),
    ({"milestones": [1, "2"]}, "milestones: expected a list of integers"),
    ({"dynamic": "yes"}, "dynamic: expected true or false, got 'yes'"),
    ({"limit_per_class": 1.5}, "limit_per_class: expected an integer"),
    ({"temperature": float("inf")}, "temperature: expected a finite number"),
    ({"temperature": 0}, "temperature: expected a number in [0.01, 100]"),
    ({"data_root": 3}, "data_root: expected a string"),
])
def test_config_file_values_are_validated(tmp_path, capsys, values, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"student": "resnet8", "teachers": ["resnet8", "resnet14"], **values}))
    rc = cli.main(["train", "--config", str(path), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(ValueError, match=message.split(":")[0]):
        TrainConfig.load(str(path))


def test_flags_and_file_give_the_same_message(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"teachers": ["resnet8", "resnet14"], "temperature": float("inf")}))
    rc_file = cli.main(["train", "--config", str(path), "--out-dir", str(tmp_path / "o")])
    from_file = capsys.readouterr().err.split("error: ", 1)[1]
    rc_flag = cli.main(["train", "--teachers", "resnet8", "resnet14", "--temperature", "inf", "--out-dir",
                        str(tmp_path / "o")])
    from_flag = capsys.readouterr().err.split("error: ", 1)[1]
    assert rc_file == rc_flag == 2 and from_file == from_flag and from_file.startswith("temperature:")


def test_valid_config_file_still_loads(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"teachers": ["resnet8", "resnet14"], "lr": 1, "milestones": [2, 4],
                                "limit_per_class": None, "amp": None, "dynamic": True}))
    cfg = TrainConfig.load(str(path))
    assert (cfg.lr, cfg.milestones, cfg.dynamic) == (1, [2, 4], True)
