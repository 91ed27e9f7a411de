"""LiveTeachers never runs stale copies of the caller's teachers: a ``load_state_dict``, an in-place edit or a
replaced parameter is seen before the next run, and ``build_cache`` stores the outputs of the weights it hashes
(so a run with other teachers refuses the cache)."""

import pytest
import torch

from mtkd_fast.models import create_model
from mtkd_fast.teachers import LiveTeachers


def _teachers(seed=0):
    out = []
    for m, arch in enumerate(("resnet8", "resnet14")):
        torch.manual_seed(seed * 10 + m)
        out.append(create_model(arch, 10).eval())
    return out


def _reference(models, x):
    """float64, no folding or copies: what the caller's current weights give."""
    with torch.no_grad():
        return torch.stack([m.double()(x.double(), is_feat=True)[1] for m in models]).float()


@pytest.mark.parametrize("fold_bn,channels_last", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("edit", ["load_state_dict", "in_place", "new_parameter"])
def test_outputs_follow_the_callers_weights(fold_bn, channels_last, edit):
    live = LiveTeachers(_teachers(0), precision="fp32", fold_bn=fold_bn, channels_last=channels_last)
    x = torch.randn(3, 3, 32, 32)
    before = live(x).logits
    new = _teachers(1)[0]
    target = live.teachers[0]
    if edit == "load_state_dict":
        target.load_state_dict(new.state_dict())
    elif edit == "in_place":
        with torch.no_grad():
            for p in target.parameters():
                p.mul_(1.5)
    else:  # a new parameter object: seen by refresh() (build_cache calls it), documented
        target.fc.weight = torch.nn.Parameter(target.fc.weight.detach() * -1, requires_grad=False)
        assert live.refresh()
    after = live(x).logits
    expect = _reference([_copy(t) for t in live.teachers], x)
    assert not torch.allclose(after[0], before[0], atol=1e-3)  # not the stale copy
    torch.testing.assert_close(after, expect, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[1], before[1])  # the untouched teacher is the same


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_refresh_force_after_an_edit_through_data():
    live = LiveTeachers(_teachers(0), precision="fp32", fold_bn=True)
    x = torch.randn(2, 3, 32, 32)
    live(x)
    live.teachers[0].fc.weight.data.mul_(2)  # .data bypasses the version counter
    assert live.refresh(force=True)
    torch.testing.assert_close(live(x).logits, _reference([_copy(t) for t in live.teachers], x), rtol=1e-4,
                               atol=1e-4)
    assert not live.refresh()  # nothing changed since


def test_cache_hashes_the_weights_that_ran(tmp_path):
    from mtkd_fast.cache import CacheMismatchError, build_cache, open_teacher_source
    from mtkd_fast.data import build_dataset

    ds = build_dataset("bundled", split="train", augment=True, seed=0, limit_per_class=1)
    live = LiveTeachers(_teachers(0), precision="fp32", fold_bn=True)
    x = torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))])
    live(x)  # the copies are made and used
    live.teachers[0].load_state_dict(_teachers(1)[0].state_dict())  # then the caller loads other weights
    build_cache(str(tmp_path / "c"), ds, live, progress=False, dtype="float32")
    source = open_teacher_source(str(tmp_path / "c"), teachers=LiveTeachers(
        [_copy(t) for t in live.teachers], precision="fp32"), dataset=ds)
    ds.set_view(0)
    cached = source(x, torch.arange(len(ds)), 0).logits
    torch.testing.assert_close(cached, _reference([_copy(t) for t in live.teachers], x), rtol=1e-4, atol=1e-4)
    with pytest.raises(CacheMismatchError):  # the old weights do not match the cache
        open_teacher_source(str(tmp_path / "c"), teachers=LiveTeachers(_teachers(0), precision="fp32"), dataset=ds)
