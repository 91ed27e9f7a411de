"""Teacher-output cache: content equals live teachers, refusal of mismatched caches, corruption detection,
resumable and rank-split builds, encodings (bfloat16, int8, top-k) and the training path."""

import json
import os
import shutil

import pytest
import torch
from torch import nn

from mtkd_fast.cache import (
    CacheCorruptError,
    CacheMismatchError,
    build_cache,
    open_teacher_source,
    plan_cache,
    storage,
    verify_cache,
    view_for_epoch,
)
from mtkd_fast.teachers import LiveTeachers

pytestmark = pytest.mark.usefixtures("one_thread")


class ReplayableToyDataset(torch.utils.data.Dataset):
    """Stand-in with the mtkd_fast.data contract: view v of sample i is a pure function of (seed, v, i)
    (random crop with padding 2 and a horizontal flip); items are (image, label, index)."""

    def __init__(self, n=37, size=10, classes=7, seed=0, data_seed=0, padding=2):
        g = torch.Generator().manual_seed(1000 + data_seed)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.seed, self.view, self.size, self.padding = seed, 0, size, padding
        self.name = "toy"
        self.recipe = {"crop": size, "padding": padding, "flip": 0.5}
        self.fingerprint = f"toy-{n}-{size}-{classes}-{data_seed}"

    def set_view(self, v):
        self.view = v

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(hash((self.seed, self.view, int(i))) & 0x7FFFFFFF)
        p = self.padding
        x = nn.functional.pad(self.images[i], (p, p, p, p))
        top, left = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
        x = x[:, top:top + self.size, left:left + self.size]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[i]), int(i)


class TinyTeacher(nn.Module):
    def __init__(self, channels, classes=7, stride=1, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, channels, 3, padding=1, stride=stride)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)
        with torch.no_grad():  # non-trivial running statistics, so eval mode matters
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x, is_feat=False):
        f = torch.relu(self.bn(self.conv(x)))
        e = f.mean(dim=(2, 3))
        z = self.fc(e) * 3
        return ([f, e], z) if is_feat else z


def make_teachers(seed=0):
    return [TinyTeacher(5, seed=seed), TinyTeacher(8, stride=2, seed=seed + 1), TinyTeacher(6, seed=seed + 2)]


def build(path, ds=None, teachers=None, **kw):
    kw.setdefault("views", 3)
    kw.setdefault("chunk_size", 8)
    kw.setdefault("batch_size", 5)
    kw.setdefault("progress", False)
    kw.setdefault("teacher_names", ["tiny5", "tiny8s2", "tiny6"])
    return build_cache(str(path), ds or ReplayableToyDataset(), teachers or make_teachers(), **kw)


def live_outputs(ds, teachers, view, idx):
    ds.set_view(view)
    x = torch.stack([ds[i][0] for i in idx])
    return x, LiveTeachers(teachers)(x)


def files_bytes(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "c"
    build(path)
    return path


def test_cached_outputs_equal_live_teachers(built):
    ds, teachers = ReplayableToyDataset(), make_teachers()
    src = open_teacher_source(str(built), teachers=teachers, dataset=ds)
    assert src.num_teachers == 3 and src.views == 3
    idx = torch.tensor([36, 0, 17, 8, 8, 23])
    for view in range(3):
        x, live = live_outputs(ds, teachers, view, idx.tolist())
        out = src(x, idx, view)
        torch.testing.assert_close(out.logits, live.logits, rtol=1e-3, atol=1e-3)
        for a, b in zip(out.embeddings + out.feature_maps, live.embeddings + live.feature_maps):
            assert a.dtype == torch.float32 and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # float16 rounding
    # another view of the same samples really is another image: outputs differ
    _, v0 = live_outputs(ds, teachers, 0, idx.tolist())
    assert not torch.allclose(src(None, idx, 1).logits, v0.logits, atol=1e-3)


def test_manifest_records_what_the_cache_was_made_from(built):
    m = json.load(open(os.path.join(built, "manifest.json")))
    assert m["views"] == 3 and m["dataset"]["num_samples"] == 37 and m["dataset"]["recipe"]["padding"] == 2
    assert [t["feature_map_shape"] for t in m["teachers"]] == [[5, 10, 10], [8, 5, 5], [6, 10, 10]]
    assert m["arrays"]["t1.feature_maps"] == {"dtype": "float16", "shape": [3, 37, 8, 5, 5],
                                              "file": "t1.feature_maps.bin"}
    assert len(m["checksums"]["t0.logits"]) == 3 and len(m["checksums"]["t0.logits"][0]) == 5  # V x chunks
    assert not os.path.exists(os.path.join(built, "chunks")) and not os.path.exists(os.path.join(built, "layout.json"))
    # docs/cache.md's storage formula gives the bytes on disk
    per_sample = sum(storage.per_sample_bytes(7, t["embedding_dim"], t["feature_map_shape"]) for t in m["teachers"])
    on_disk = sum(os.path.getsize(os.path.join(built, a["file"])) for a in m["arrays"].values())
    assert on_disk == m["total_bytes"] == 3 * 37 * per_sample


def test_refuses_other_teacher_checkpoint(built):
    teachers = make_teachers()
    with torch.no_grad():
        teachers[1].fc.bias[0] += 1e-3
    with pytest.raises(CacheMismatchError, match=r"teachers\[1\]\.weights_sha256"):
        open_teacher_source(str(built), teachers=teachers)
    with pytest.raises(CacheMismatchError, match=r"teachers \(length\)"):
        open_teacher_source(str(built), teachers=make_teachers()[:2])


@pytest.mark.parametrize("change, field", [
    (dict(data_seed=1), "dataset.fingerprint"),
    (dict(n=36), "dataset.num_samples"),
    (dict(seed=5), "dataset.seed"),
    (dict(padding=3), "dataset.recipe.padding"),
])
def test_refuses_other_dataset_or_recipe(built, change, field):
    with pytest.raises(CacheMismatchError, match=field.replace(".", r"\.")):
        open_teacher_source(str(built), dataset=ReplayableToyDataset(**change))


def test_resume_refuses_other_settings(tmp_path):
    with pytest.raises(_Interrupt):
        build(tmp_path / "c", teachers=_interrupting_teachers(after_calls=2))
    with pytest.raises(CacheMismatchError, match=r"views"):
        build(tmp_path / "c", views=2)
    build(tmp_path / "d", views=1)
    with pytest.raises(CacheMismatchError, match=r"teachers\[0\]\.feature_map_encoding"):
        build(tmp_path / "d", views=1, feature_dtype="int8")


def test_bad_arguments_name_themselves(built, tmp_path):
    src = open_teacher_source(str(built))
    with pytest.raises(ValueError, match="view"):
        src(None, torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="indices"):
        src(None, torch.tensor([37]), 0)
    with pytest.raises(ValueError, match="views"):
        build(tmp_path / "x", views=0)
    with pytest.raises(ValueError, match="feature_dtype"):
        build(tmp_path / "x", feature_dtype="int4")
    with pytest.raises(ValueError, match="topk"):
        build(tmp_path / "x", topk=8)
    with pytest.raises(FileNotFoundError, match="path"):
        open_teacher_source(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="view_schedule"):
        build(tmp_path / "x", view_schedule="random")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_array_is_detected(built, tmp_path):
    c = _copy(built, tmp_path / "c")
    f = c / "t2.feature_maps.bin"
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 2)
    with pytest.raises(CacheCorruptError, match=r"t2\.feature_maps\.bin.*truncated"):
        open_teacher_source(str(c))
    report = verify_cache(str(c))
    assert not report["ok"] and "truncated" in report["problems"][0]


def test_corrupted_array_is_detected(built, tmp_path):
    c = _copy(built, tmp_path / "c")
    f = c / "t0.logits.bin"
    with open(f, "r+b") as fh:  # flip one byte of view 1, sample 20 (chunk 2)
        fh.seek((1 * 37 + 20) * 7 * 2 + 3)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0x10]))
    report = verify_cache(str(c))
    assert not report["ok"] and len(report["problems"]) == 1
    assert "view 1, chunk 2" in report["problems"][0]
    src = open_teacher_source(str(c))  # lazy verification: clean chunks read fine, the damaged one is refused
    src(None, torch.tensor([20]), 0)
    src(None, torch.tensor([3, 30]), 1)
    with pytest.raises(CacheCorruptError, match="view 1, chunk 2"):
        src(None, torch.tensor([3, 21]), 1)
    with pytest.raises(CacheCorruptError, match="view 1, chunk 2"):
        open_teacher_source(str(c), verify="full")
    assert verify_cache(str(built))["ok"]


class _Interrupt(RuntimeError):
    pass


class _InterruptingTeacher(nn.Module):
    """Delegates to a teacher, raising after a number of calls (a crash in the middle of a chunk)."""

    def __init__(self, inner, counter):
        super().__init__()
        self.inner, self.counter = inner, counter

    def forward(self, x, is_feat=False):
        self.counter[0] -= 1
        if self.counter[0] < 0:
            raise _Interrupt("simulated interruption")
        return self.inner(x, is_feat=is_feat)

    def state_dict(self, *a, **k):  # same identity as the wrapped teacher
        return self.inner.state_dict(*a, **k)


def _interrupting_teachers(after_calls):
    """The teachers, the first of which raises on its (after_calls + 1)-th forward pass."""
    teachers = make_teachers()
    return [_InterruptingTeacher(teachers[0], [after_calls])] + teachers[1:]


def test_interrupted_build_resumes_identical(built, tmp_path):
    path = tmp_path / "c"
    # 1 shape probe + chunk 0 (8 samples: 2 batches) + 1 batch into chunk 1: the teacher raises mid-chunk
    with pytest.raises(_Interrupt):
        build(path, teachers=_interrupting_teachers(after_calls=1 + 2 + 1))
    recs = sorted(os.listdir(path / "chunks"))
    assert recs == ["v00000_c0000000.json"] and not (path / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="resume"):
        open_teacher_source(str(path))
    build(path)  # resume
    assert files_bytes(path) == files_bytes(built)
    assert verify_cache(str(path))["ok"]


def test_ranks_split_the_work_and_end_identical(built, tmp_path):
    path = tmp_path / "c"
    assert build(path, rank=1, world_size=2) is None
    assert not (path / "manifest.json").exists()
    m = build(path, rank=0, world_size=2, wait_timeout_s=5)
    assert m["views"] == 3
    assert files_bytes(path) == files_bytes(built)
    # a finished cache opened by the builder again is returned as is
    assert build(path)["checksums"] == m["checksums"]


def test_bfloat16_and_int8_encodings(tmp_path):
    ds, teachers = ReplayableToyDataset(n=20), make_teachers()
    build(tmp_path / "b", ds, teachers, views=1, dtype="bfloat16")
    build(tmp_path / "q", ds, teachers, views=1, feature_dtype="int8")
    idx = torch.arange(20)
    x, live = live_outputs(ds, teachers, 0, idx.tolist())
    out_b = open_teacher_source(str(tmp_path / "b"))(x, idx, 0)
    torch.testing.assert_close(out_b.logits, live.logits, rtol=1e-2, atol=1e-2)
    out_q = open_teacher_source(str(tmp_path / "q"))(x, idx, 0)
    torch.testing.assert_close(out_q.logits, live.logits, rtol=1e-3, atol=1e-3)
    for q, f in zip(out_q.feature_maps, live.feature_maps):
        amax = f.abs().amax(dim=(2, 3), keepdim=True)
        assert bool(((q - f).abs() <= amax / 127 * 0.5 * 1.01 + 1e-6).all())  # half a step of its channel's scale
        assert float((q - f).abs().max()) > 0  # it is really quantised
    m = json.load(open(tmp_path / "q" / "manifest.json"))
    assert m["arrays"]["t0.feature_maps"]["dtype"] == "int8"
    assert m["arrays"]["t0.feature_maps.scale"]["shape"] == [1, 20, 5]


def test_int8_round_trip_on_odd_maps():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 7, 3, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 5.0])[None, :, None, None]
    q, s = storage.quantize_int8(x)
    y = storage.dequantize_int8(q, s, "cpu")
    step = torch.from_numpy(s).float()[:, :, None, None]
    assert bool(((y - x).abs() <= step * 0.5 * 1.01 + 1e-12).all())
    assert bool((y[:, 3] == 0).all())


def test_topk_reconstruction_keeps_top_probabilities_and_tail_mass():
    g = torch.Generator().manual_seed(1)
    B, K, k, T = 5, 101, 9, 4.0
    z = torch.randn(B, K, generator=g) * 3
    vals, idx, tail = storage.topk_encode(z, k, T, "float32")
    r = storage.topk_decode(vals, idx, tail, K, T, "float32", "cpu")
    p, q = torch.softmax(z / T, 1), torch.softmax(r / T, 1)
    it = torch.from_numpy(idx).long()
    torch.testing.assert_close(q.gather(1, it), p.gather(1, it), rtol=1e-5, atol=1e-6)
    mask = torch.ones(B, K, dtype=torch.bool).scatter_(1, it, False)
    torch.testing.assert_close((q * mask).sum(1), (p * mask).sum(1), rtol=1e-5, atol=1e-6)
    full = storage.topk_decode(*storage.topk_encode(z, K, T, "float32"), K, T, "float32", "cpu")
    torch.testing.assert_close(full, z)


def test_topk_cache_and_budget_drop_fields_computed_live(tmp_path):
    ds, teachers = ReplayableToyDataset(n=20), make_teachers()
    full = plan_cache(ds, teachers, views=2)["total_bytes"]
    # a budget that fits everything but the largest feature map (teacher 2: 6x10x10 > 5x10x10 > 8x5x5)
    m = build(tmp_path / "c", ds, teachers, views=2, topk=3, budget_bytes=full - 2 * 20 * 600)
    assert [t["stored"] for t in m["teachers"]] == [["logits", "embeddings", "feature_maps"]] * 2 + \
        [["logits", "embeddings"]]
    with pytest.raises(ValueError, match=r"teachers\[2\].*feature_maps"):
        open_teacher_source(str(tmp_path / "c"))
    src = open_teacher_source(str(tmp_path / "c"), teachers=LiveTeachers(teachers))
    idx = torch.tensor([19, 4, 11])
    x, live = live_outputs(ds, teachers, 1, idx.tolist())
    out = src(x, idx, 1)
    torch.testing.assert_close(out.feature_maps[2], live.feature_maps[2])  # computed live: exact
    torch.testing.assert_close(out.feature_maps[0], live.feature_maps[0], rtol=1e-3, atol=1e-3)
    top = live.logits.topk(3, dim=2)
    torch.testing.assert_close(out.logits.gather(2, top.indices), top.values, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="budget"):
        build(tmp_path / "d", ds, teachers, views=2, budget_bytes=100)


def test_view_for_epoch(tmp_path, built):
    src = open_teacher_source(str(built))
    assert [view_for_epoch(src, e) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    m = build(tmp_path / "s", ReplayableToyDataset(n=9), views=4, view_schedule="shuffled", schedule_seed=3)
    seq = [view_for_epoch(m, e) for e in range(12)]
    for c in range(3):  # every cycle of V epochs sees every view once
        assert sorted(seq[4 * c:4 * c + 4]) == [0, 1, 2, 3]
    assert seq != list(range(4)) * 3 and seq == [view_for_epoch(m, e) for e in range(12)]
