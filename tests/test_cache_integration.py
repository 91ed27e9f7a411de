"""The cache with the real data pipeline, model zoo, CLI and trainer: cached outputs equal live teachers on
the bundled data's augmented views, and a short MTKD-RL run from the cache follows the live-teacher run."""

import json

import pytest
import torch

from mtkd_fast import models
from mtkd_fast.cache import CacheMismatchError, build_cache, open_teacher_source, view_for_epoch
from mtkd_fast.cli import main
from mtkd_fast.data import build_dataset, build_loader
from mtkd_fast.teachers import LiveTeachers

TEACHERS = ["resnet8", "wrn_16_1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def bundled(seed=0, limit=4):
    return build_dataset("bundled", split="train", augment=True, seed=seed, limit_per_class=limit)


def teachers(seed=0):
    torch.manual_seed(seed)
    return [models.create_model(name, 10).eval() for name in TEACHERS]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundled") / "cache"
    build_cache(str(path), bundled(), teachers(), views=2, teacher_names=TEACHERS, chunk_size=16, batch_size=7,
                progress=False)
    return path


def test_cached_equals_live_on_bundled_views(cache_dir):
    ds, ts = bundled(), teachers()
    src = open_teacher_source(str(cache_dir), teachers=ts, dataset=ds)
    live = LiveTeachers(ts)
    for view in range(2):
        ds.set_view(view)
        for images, labels, idx in build_loader(ds, 13, shuffle=True, seed=3, epoch=view):
            got, want = src(images, idx, view), live(images)
            torch.testing.assert_close(got.logits, want.logits, rtol=2e-3, atol=2e-3)
            for a, b in zip(got.embeddings + got.feature_maps, want.embeddings + want.feature_maps):
                torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_refuses_other_bundled_seed_or_subset(cache_dir):
    with pytest.raises(CacheMismatchError, match=r"dataset\.seed"):
        open_teacher_source(str(cache_dir), dataset=bundled(seed=1))
    with pytest.raises(CacheMismatchError, match=r"dataset\.num_samples"):
        open_teacher_source(str(cache_dir), dataset=bundled(limit=3))
    with pytest.raises(CacheMismatchError, match=r"teachers\[0\]\.weights_sha256"):
        open_teacher_source(str(cache_dir), teachers=teachers(seed=1))


def test_cli_build_info_verify(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["cache", "build", "--out", str(out), "--dataset", "bundled", "--limit-per-class", "2", "--teachers",
            *TEACHERS, "--views", "2", "--feature-dtype", "int8", "--chunk-size", "8", "--device", "cpu",
            "--no-progress", "--random-teachers"]
    assert main(args) == 0
    assert "2 view(s) x 20 samples" in capsys.readouterr().out
    assert main(["cache", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "teachers[1] wrn_16_1" in text and "feature maps int8" in text
    assert main(["cache", "verify", str(out), "--no-progress"]) == 0
    with open(out / "t1.embeddings.bin", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    assert main(["cache", "verify", str(out), "--no-progress"]) == 1
    assert "checksum mismatch in view 0, chunk 0" in capsys.readouterr().out
    assert main(["cache", "info", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["views"] == 2
    assert main(["cache", "build", "--out", str(tmp_path / "d"), "--teachers", *TEACHERS, "--checkpoints", "x"]) == 2


def _run(source, ds, view_of, epochs=3, batch=8):
    from mtkd_fast.train import TrainConfig, Trainer

    torch.manual_seed(0)
    cfg = TrainConfig(student="resnet8", teachers=TEACHERS, strategy="mtkd_rl", epochs=epochs, batch_size=batch,
                      lr=0.01, progress=False, loss_backend="reference", device="cpu")
    student = models.create_model("resnet8", 10)
    ds.set_view(0)
    x = torch.stack([ds[i][0] for i in range(2)])
    probe = source(x, torch.arange(2), 0)
    with torch.no_grad():
        s_shape = tuple(student(x, is_feat=True)[0][-2].shape[1:])
    ft = models.FeatureTransfer(student_shape=s_shape, teacher_shapes=[tuple(f.shape[1:]) for f in probe.feature_maps])
    from mtkd_fast.agent import MTKDAgent

    agent = MTKDAgent([int(e.shape[1]) + 10 + 3 for e in probe.embeddings], 2)
    tr = Trainer(cfg, student, source, ft, agent, device="cpu")
    w0 = torch.cat([p.detach().flatten() for p in student.parameters()])
    losses = []
    for epoch in range(epochs):
        view = view_of(epoch)
        ds.set_view(view)
        loader = build_loader(ds, batch, shuffle=True, seed=0, epoch=epoch)
        tr.begin_epoch(epoch, len(loader))
        for images, labels, idx in loader:
            losses.append(float(tr.train_step(images, labels, idx, view)["loss"]))
        tr.end_epoch()
    return torch.tensor(losses), torch.cat([p.detach().flatten() for p in student.parameters()]) - w0


def test_training_from_cache_matches_live_teachers(cache_dir):
    """3 epochs of MTKD-RL (warm-up epoch, agent updates, epoch 2 replays view 0) from the cache and from live
    teachers shown the same views. Float16 rounding of the teacher outputs is the only difference at step 0;
    training amplifies it a little (even float32 teachers run in other batches drift ~1e-3), so epochs are
    compared by mean loss, against the gap a wrong replay (cache read at the other view) makes."""
    ds = bundled()
    src = open_teacher_source(str(cache_dir), teachers=teachers(), dataset=ds)
    cached_loss, cached_w = _run(src, ds, lambda e: view_for_epoch(src, e))
    live_loss, live_w = _run(LiveTeachers(teachers()), ds, lambda e: view_for_epoch(src, e))
    wrong_loss, wrong_w = _run(_SwappedViews(src), ds, lambda e: view_for_epoch(src, e))
    torch.testing.assert_close(cached_loss[0], live_loss[0], rtol=1e-4, atol=1e-4)
    per_epoch = lambda x: x.view(3, -1).mean(1)  # noqa: E731
    gap = (per_epoch(cached_loss) - per_epoch(live_loss)).abs()
    wrong_gap = (per_epoch(wrong_loss) - per_epoch(live_loss)).abs()
    assert float(gap.max()) < 0.01 * float(live_loss.min())
    assert float(gap.max()) < 0.5 * float(wrong_gap.min()), (gap, wrong_gap)
    # the student's weight updates: the cache's differ from the live run's far less than a wrong replay's do
    dist, wrong_dist = float((cached_w - live_w).norm()), float((wrong_w - live_w).norm())
    assert dist < 0.5 * wrong_dist, (dist, wrong_dist)


class _SwappedViews:
    """The cache read at view 1 - v while the student sees view v."""

    def __init__(self, src):
        self.src, self.num_teachers = src, src.num_teachers

    def __call__(self, images, indices, view):
        return self.src(images, indices, 1 - view)
