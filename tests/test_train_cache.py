"""train(config) reading teacher outputs from a teacher-output cache (mtkd_fast.cache) instead of live teachers."""

import csv

import pytest
import torch

pytest.importorskip("mtkd_fast.cache")

from mtkd_fast.cache import build_cache  # noqa: E402
from mtkd_fast.data import build_dataset  # noqa: E402
from mtkd_fast.models import create_model  # noqa: E402
from mtkd_fast.train import TrainConfig, train  # noqa: E402


@pytest.mark.slow
def test_train_from_teacher_cache(tmp_path):
    ds = build_dataset("bundled", split="train", augment=True, seed=0, limit_per_class=2)
    torch.manual_seed(0)
    teachers = [create_model("resnet8", 10).eval(), create_model("resnet14", 10).eval()]
    build_cache(str(tmp_path / "cache"), ds, teachers, views=2, teacher_names=["resnet8", "resnet14"],
                dtype="float32", progress=False, batch_size=16)
    cfg = TrainConfig(student="resnet8", teacher_cache=str(tmp_path / "cache"), dataset="bundled", limit_per_class=2,
                      batch_size=8, epochs=2, max_steps_per_epoch=2, agent_step=1, progress=False,
                      out_dir=str(tmp_path / "run"))
    result = train(cfg)
    rows = list(csv.DictReader(open(result["csv"])))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # no --teachers: the columns take the names the cache recorded
    assert float(rows[0]["wl_resnet14"]) == 1.0 and float(rows[1]["wl_resnet14"]) != 1.0
