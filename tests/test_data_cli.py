"""``mtkd-fast data info`` and ``mtkd-fast data export-jpeg``."""

import json

from mtkd_fast.cli import main


def test_data_info_prints_the_dataset_description(capsys):
    assert main(["data", "info", "--limit-per-class", "2", "--split", "test"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "bundled" and info["num_samples"] == 20 and info["num_classes"] == 10
    assert info["samples_per_class"] == {"min": 2, "max": 2} and info["image_shape"] == [3, 32, 32]
    assert info["recipe"]["kind"] == "pad_crop" and len(info["fingerprint"]) == 64


def test_data_export_jpeg_then_read_it_back(tmp_path, capsys):
    out = tmp_path / "jpeg"
    assert main(["data", "export-jpeg", str(out), "--limit-per-class", "1", "--size", "40x30"]) == 0
    assert "wrote 10 train and 10 val" in capsys.readouterr().out
    assert len(list((out / "train").rglob("*.JPEG"))) == 10
    assert main(["data", "info", "--dataset", "imagefolder", "--root", str(out), "--split", "val"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_samples"] == 10 and info["class_names"][0] == "0_T-shirt_top"


def test_data_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "info", "--dataset", "imagefolder", "--root", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["data", "export-jpeg", str(tmp_path / "x"), "--size", "big"]) == 2
    assert "--size" in capsys.readouterr().err
