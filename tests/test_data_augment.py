"""Replayable augmentation: view_params is a pure function of (seed, view, index) with the right
distribution, and the batched in-memory augmentation equals an independent per-sample torchvision one."""

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

from mtkd_fast.data import PadCrop, ResizedCrop, build_dataset, build_loader, pixel_box, view_params
from mtkd_fast.data.augment import hash_uniforms


def test_view_params_is_a_pure_function_of_seed_view_index():
    idx = np.array([0, 7, 123456, 2**40 + 3, 7])
    for recipe in (PadCrop(4), ResizedCrop()):
        a = view_params(3, 2, idx, recipe, image_size=(32, 32))
        b = view_params(3, 2, idx[::-1].copy(), recipe, image_size=(32, 32))  # order does not matter
        for fa, fb in zip(a, b):
            np.testing.assert_array_equal(fa, fb[::-1])
        assert a.top[1] == a.top[4] and a.flip[1] == a.flip[4]
        # scalar and batched calls agree
        one = view_params(3, 2, 123456, recipe, image_size=(32, 32))
        assert one == tuple(f[2].item() for f in a)
    # a change of seed, view or index changes the draws
    u = hash_uniforms(0, 0, np.arange(1000), 4)
    for other in (hash_uniforms(1, 0, np.arange(1000), 4), hash_uniforms(0, 1, np.arange(1000), 4),
                  hash_uniforms(0, 0, np.arange(1, 1001), 4)):
        assert (u != other).mean() > 0.99


def test_pad_crop_distribution():
    n = 90_000
    p = view_params(11, 5, np.arange(n), PadCrop(4), image_size=(32, 28))
    assert p.top.min() == -4 and p.top.max() == 4 and p.left.min() == -4 and p.left.max() == 4
    assert (p.height == 32).all() and (p.width == 28).all()
    counts = np.bincount(p.top + 4, minlength=9)
    # each of the 9 offsets has probability 1/9: 10000 expected, sd ~ 94
    assert np.abs(counts - n / 9).max() < 500, counts
    assert abs(p.flip.mean() - 0.5) < 0.01
    # top, left and flip are independent (joint frequencies match the product)
    both = np.mean((p.top == 0) & (p.left == 0) & p.flip)
    assert abs(both - 0.5 / 81) < 0.002
    assert not view_params(0, 0, np.arange(50), PadCrop(4, flip=False), image_size=(8, 8)).flip.any()


def test_resized_crop_distribution_and_pixel_box():
    recipe = ResizedCrop(size=224)
    n = 20_000
    p = view_params(0, 1, np.arange(n), recipe)
    for f in (p.top, p.left, p.height, p.width):
        assert ((f * 4096) == np.round(f * 4096)).all()  # on the 1/4096 grid
    assert (p.top >= 0).all() and (p.top + p.height <= 1).all() and (p.left + p.width <= 1).all()
    area = p.height * p.width
    ratio = p.width / p.height
    whole = (p.height == 1) & (p.width == 1)
    assert whole.mean() < 0.02  # the fallback is rare
    ok = ~whole
    assert area[ok].min() >= 0.08 - 1e-3 and area.max() <= 1.0
    assert ratio[ok].min() >= 0.75 - 2e-3 and ratio[ok].max() <= 4 / 3 + 2e-3
    assert abs(np.mean(np.log(ratio[ok]))) < 0.02  # log-uniform ratio, symmetric around 1
    assert abs(p.flip.mean() - 0.5) < 0.02
    # pixel_box rounds edges half up, like DALI: e.g. top 0.25 of 78 rows = 19.5 -> 20, bottom 58.5 -> 59
    from mtkd_fast.data import ViewParams

    assert pixel_box(ViewParams(0.25, 0.125, 0.5, 0.5, False), 78, 70) == (20, 9, 39, 35)
    assert pixel_box(ViewParams(0.0, 0.0, 1.0, 1.0, False), 375, 500) == (0, 0, 375, 500)


def test_view_params_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        view_params(-1, 0, 0, PadCrop(), image_size=(32, 32))
    with pytest.raises(ValueError, match="view"):
        view_params(0, -2, 0, PadCrop(), image_size=(32, 32))
    with pytest.raises(ValueError, match="index"):
        view_params(0, 0, np.array([3, -1]), PadCrop(), image_size=(32, 32))
    with pytest.raises(ValueError, match="image_size"):
        view_params(0, 0, 0, PadCrop())
    with pytest.raises(TypeError, match="recipe"):
        view_params(0, 0, 0, "flip")


def _reference_view(raw_u8: torch.Tensor, p, base_padding, mean, std):
    """Independent per-sample path: torchvision pad (zeros), crop, flip, normalise on one CHW uint8 image."""
    img = TF.pad(raw_u8, [base_padding] * 4)
    H, W = img.shape[1:]
    img = TF.pad(img, [4] * 4)
    img = TF.crop(img, p.top + 4, p.left + 4, H, W)
    if p.flip:
        img = TF.hflip(img)
    return TF.normalize(img.float() / 255.0, mean, std)


@pytest.mark.parametrize("seed, view", [(0, 0), (5, 3)])
def test_bundled_augmentation_matches_an_independent_reference(seed, view):
    ds = build_dataset("bundled", augment=True, seed=seed, limit_per_class=4)
    ds.set_view(view)
    assert ds.image_shape == (3, 32, 32)
    idx = torch.tensor([0, 3, 17, 39, 22])
    threads_before = torch.get_num_threads()
    images, labels, got_idx = ds.get_batch(idx)
    assert torch.equal(got_idx, idx) and torch.equal(labels, ds.labels[idx])
    for row, i in enumerate(idx.tolist()):
        p = view_params(seed, view, i, ds.recipe, image_size=(32, 32))
        raw = ds.images[i].expand(3, -1, -1)
        ref = _reference_view(raw, p, 2, ds.mean, ds.std)
        torch.testing.assert_close(images[row], ref, rtol=0, atol=1e-6)
        x, y, j = ds[i]  # the per-sample API is the same computation
        torch.testing.assert_close(x, images[row], rtol=0, atol=0)
        assert (y, j) == (int(labels[row]), i)
    assert torch.get_num_threads() == threads_before  # the single-threaded batch ops restore the setting
    # grayscale replicated: the three channels are equal
    torch.testing.assert_close(images[:, 0], images[:, 1], rtol=0, atol=0)
    # another view of the same samples is a different image (for most samples)
    ds.set_view(view + 1)
    other = ds.get_batch(idx)[0]
    assert sum(not torch.equal(a, b) for a, b in zip(images, other)) >= 3


def test_eval_transform_is_deterministic_and_view_independent():
    ds = build_dataset("bundled", split="test", augment=False, limit_per_class=3)
    a = ds.get_batch(torch.arange(len(ds)))[0]
    ds.set_view(7)
    b = ds.get_batch(torch.arange(len(ds)))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # zero padding by 2 (28 -> 32), then the normalisation of the subset's statistics
    raw = ds.images[:, 0].float() / 255.0
    torch.testing.assert_close(a[:, 1, 2:30, 2:30], (raw - ds.mean[0]) / ds.std[0])
    torch.testing.assert_close(a[:, 2, :2, :], torch.full_like(a[:, 2, :2, :], -ds.mean[0] / ds.std[0]))
    with pytest.raises(ValueError, match="view"):
        ds.set_view(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_device_augmentation_equals_cpu():
    ds = build_dataset("bundled", augment=True, seed=2, limit_per_class=10)
    ds.set_view(1)
    cpu = list(build_loader(ds, 16, seed=4, epoch=1))
    gpu = list(build_loader(ds, 16, seed=4, epoch=1, device="cuda"))
    assert len(cpu) == len(gpu)
    for (a, b, c), (x, y, z) in zip(cpu, gpu):
        assert x.is_cuda and y.is_cuda and z.is_cuda
        torch.testing.assert_close(x.cpu(), a, rtol=0, atol=1e-6)
        assert torch.equal(y.cpu(), b) and torch.equal(z.cpu(), c)
