"""ImageNet-layout folders on real JPEGs written from the bundled data by the export tool: the torchvision
path, bad input, and the DALI CPU path against the torchvision path (same order, crop window and flip;
pixels within the decoder/resize tolerance stated below)."""

import shutil

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mtkd_fast.data import build_dataset, build_loader, pixel_box, view_params
from mtkd_fast.data import dali as dali_module
from mtkd_fast.data.export import export_arrays, export_dataset, write_jpeg
from mtkd_fast.data.folder import ImageFolderDataset
from mtkd_fast.data.loader import FolderLoader

needs_dali = pytest.mark.skipif(not dali_module.DALI_AVAILABLE, reason="NVIDIA DALI is not installed")

# Tolerance, in grey levels (0-255), between DALI and PIL/torchvision for the same window: both decode with
# libjpeg-turbo, but DALI decodes only the window (edge rows/columns can differ slightly) and its
# antialiased linear resize differs from PIL's bilinear by rounding. Measured here on the training crops:
# mean 0.17-0.23, max 14, about 0.5% of values off by more than 4; validation (whole image, resize, centre
# crop, same geometry rules): mean 0.11, max 1.
MEAN_TOL, MAX_TOL = 1.0, 24.0
VAL_MEAN_TOL, VAL_MAX_TOL = 0.5, 3.0


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm_jpeg")
    counts = export_dataset("bundled", root, size=(45, 61), limit_per_class=5, progress=False)
    assert counts == {"train": 50, "val": 50}
    return root


@pytest.fixture(scope="module")
def varied_root(tmp_path_factory):
    """JPEGs of several sizes and aspect ratios (the crop rounding depends on them)."""
    root = tmp_path_factory.mktemp("fm_varied")
    src = build_dataset("bundled", augment=False, limit_per_class=3)
    sizes = [(45, 61), (97, 70), (64, 64), (33, 120), (150, 111)]
    for split in ("train", "val"):
        for i in range(len(src)):
            folder = root / split / f"{int(src.labels[i])}_c"
            folder.mkdir(parents=True, exist_ok=True)
            write_jpeg(folder / f"{i:03d}.JPEG", src.images[i].numpy(), quality=92, size=sizes[i % len(sizes)])
    return root


def test_export_writes_an_image_folder_with_the_original_labels(jpeg_root):
    ds = build_dataset("imagefolder", root=jpeg_root, augment=False, image_size=32, resize_size=40)
    src = build_dataset("bundled", augment=False, limit_per_class=5)
    assert ds.class_names[3] == "3_Dress" and ds.num_classes == 10 and len(ds) == 50
    assert torch.bincount(ds.labels).tolist() == [5] * 10
    assert ds.image_shape == (3, 32, 32)
    # the JPEG holds the same picture (up to JPEG loss and the resize)
    k = int(torch.nonzero(ds.labels == 4)[0, 0])
    img = np.asarray(ds.load_rgb(k).convert("L").resize((28, 28)), dtype=np.float64)
    j = int(ds.paths[k].split("/")[-1].split(".")[0])
    assert abs(img - src.images[j, 0].numpy()).mean() < 12
    x, y, i = ds[k]
    assert x.shape == (3, 32, 32) and (y, i) == (4, k)
    val = build_dataset("imagefolder", root=jpeg_root, split="test")  # 'test' finds root/val
    assert val.folder.name == "val" and val.class_names == ds.class_names
    small = build_dataset("imagefolder", root=jpeg_root, limit_per_class=2)
    assert len(small) == 20 and torch.bincount(small.labels).tolist() == [2] * 10


def test_torchvision_views_are_replayable(jpeg_root):
    ds = build_dataset("imagefolder", root=jpeg_root, seed=4, image_size=24, resize_size=28)
    ds.set_view(2)
    a = ds[7][0]
    ds.set_view(3)
    b = ds[7][0]
    ds.set_view(2)
    assert torch.equal(ds[7][0], a) and not torch.equal(a, b)
    loader = build_loader(ds, 16, seed=1, epoch=0, backend="torchvision")
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert torch.equal(torch.cat([i for _, _, i in batches]).sort().values, torch.arange(50))


def test_bad_folders_get_clear_errors(tmp_path, jpeg_root):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("imagefolder", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="root"):
        build_dataset("imagefolder")
    root = tmp_path / "copy"
    shutil.copytree(jpeg_root, root)
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match="val"):
        build_dataset("imagefolder", root=root, split="val")
    # an empty class folder is an error naming it
    (root / "train" / "9_Ankle_boot" / "notes.txt").write_text("not an image")
    for f in (root / "train" / "9_Ankle_boot").glob("*.JPEG"):
        f.unlink()
    with pytest.raises(ValueError, match="9_Ankle_boot"):
        build_dataset("imagefolder", root=root)
    shutil.rmtree(root / "train" / "9_Ankle_boot")
    # train and val with different classes: the error lists the difference
    shutil.copytree(jpeg_root / "val", root / "val")
    with pytest.raises(ValueError, match=r"only in val: \['9_Ankle_boot'\]"):
        build_dataset("imagefolder", root=root, split="val")
    with pytest.raises(ValueError, match="differ"):
        build_dataset("imagefolder", root=root, split="train")
    # non-image files are ignored and counted
    shutil.rmtree(root / "val" / "9_Ankle_boot")
    (root / "train" / "0_T-shirt_top" / "README").write_text("x")
    ds = build_dataset("imagefolder", root=root)
    assert ds.ignored_files == 1 and len(ds) == 45
    (root / "train" / "stray.JPEG").write_bytes(b"")  # a file beside the class folders is not a class
    assert build_dataset("imagefolder", root=root).num_classes == 9
    with pytest.raises(ValueError, match="on_bad_image"):
        build_dataset("imagefolder", root=root, on_bad_image="ignore")


@pytest.fixture()
def broken_root(tmp_path, jpeg_root):
    """A copy of the export with one truncated JPEG and one that is not a JPEG at all."""
    root = tmp_path / "broken"
    shutil.copytree(jpeg_root, root)
    files = sorted((root / "train").rglob("*.JPEG"))
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) // 2])
    files[20].write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 2)
    return root, [str(files[3]), str(files[20])]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_jpegs_raise_naming_the_file(broken_root, num_workers):
    root, bad = broken_root
    ds = build_dataset("imagefolder", root=root, image_size=24, resize_size=28)
    with pytest.raises(ValueError, match="cannot decode") as info:
        for _ in build_loader(ds, 50, shuffle=False, num_workers=num_workers, backend="torchvision"):
            pass
    assert bad[0] in str(info.value) or bad[1] in str(info.value)


def test_corrupt_jpegs_skipped_are_counted_and_reported(broken_root, capsys):
    root, bad = broken_root
    ds = build_dataset("imagefolder", root=root, image_size=24, resize_size=28, on_bad_image="skip")
    loader = build_loader(ds, 8, shuffle=True, seed=3)  # 'skip' selects the torchvision path
    assert isinstance(loader, FolderLoader)
    seen = torch.cat([i for _, _, i in loader])
    assert len(seen) == 48 and sorted(loader.skipped) == sorted(bad)
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err


@needs_dali
@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_dali_cpu_matches_torchvision_order_window_and_pixels(varied_root, rank, world_size):
    ds = build_dataset("imagefolder", root=varied_root, seed=7, image_size=24, resize_size=28)
    ds.set_view(3)
    kw = dict(seed=2, epoch=1, rank=rank, world_size=world_size, num_workers=2)
    via_dali = list(build_loader(ds, 8, backend="dali", **kw))
    via_tv = list(build_loader(ds, 8, backend="torchvision", **kw))
    assert len(via_dali) == len(via_tv) == len(build_loader(ds, 8, backend="dali", **kw))
    scale = 255 * torch.tensor(ds.std).view(1, 3, 1, 1)  # back to grey levels
    diffs = []
    for (x, y, i), (x2, y2, i2) in zip(via_dali, via_tv):
        assert torch.equal(i, i2) and torch.equal(y, y2) and x.shape == x2.shape == (len(i), 3, 24, 24)
        diffs.append(((x - x2).abs() * scale).flatten(1))
    diffs = torch.cat(diffs)
    assert diffs.mean() < MEAN_TOL and diffs.max() < MAX_TOL, (diffs.mean(), diffs.max())
    # the window and flip are the same ones: moving the torchvision window by one pixel, or flipping it,
    # matches DALI worse than the window view_params chose
    x_dali, _, idx = via_dali[0]
    mean, std = ds.mean, ds.std
    for row, i in enumerate(idx.tolist()[:4]):
        img = ds.load_rgb(i)
        p = view_params(ds.seed, 3, i, ds.recipe)
        top, left, h, w = pixel_box(p, img.height, img.width)

        def err(dy, dx, flip):
            t, l, hh, ww = max(0, top + dy), max(0, left + dx), h, w
            out = TF.resized_crop(img, t, l, min(hh, img.height - t), min(ww, img.width - l), [24, 24],
                                  InterpolationMode.BILINEAR, antialias=True)
            out = TF.hflip(out) if flip else out
            ref = TF.normalize(TF.to_tensor(out), mean, std)
            return float(((ref - x_dali[row]).abs() * scale[0]).mean())

        best = err(0, 0, p.flip)
        assert best < MEAN_TOL
        for dy, dx, flip in ((1, 0, p.flip), (0, 1, p.flip), (-1, 0, p.flip), (0, -1, p.flip), (0, 0, not p.flip)):
            if (top + dy < 0) or (left + dx < 0):
                continue
            assert err(dy, dx, flip) > best, (i, dy, dx, flip)


@needs_dali
def test_dali_validation_pipeline_matches_torchvision(varied_root):
    ds = build_dataset("imagefolder", root=varied_root, split="val", augment=False, image_size=24, resize_size=28)
    scale = 255 * torch.tensor(ds.std).view(1, 3, 1, 1)
    for (x, y, i), (x2, y2, i2) in zip(build_loader(ds, 16, shuffle=False, backend="dali"),
                                       build_loader(ds, 16, shuffle=False, backend="torchvision")):
        assert torch.equal(i, i2) and torch.equal(y, y2)
        d = (x - x2).abs() * scale
        assert d.mean() < VAL_MEAN_TOL and d.max() < VAL_MAX_TOL, (d.mean(), d.max())


@needs_dali
def test_dali_names_the_unreadable_file(broken_root):
    root, bad = broken_root
    ds = build_dataset("imagefolder", root=root, image_size=24, resize_size=28)
    loader = build_loader(ds, 10, shuffle=False)
    assert isinstance(loader, dali_module.DaliLoader)  # 'auto' picks DALI when it is installed
    with pytest.raises(ValueError, match="DALI could not decode") as info:
        for _ in loader:
            pass
    assert bad[0] in str(info.value)


def test_without_dali_the_user_is_told_once(jpeg_root, monkeypatch, capsys):
    import mtkd_fast.data as data

    monkeypatch.setattr(dali_module, "DALI_AVAILABLE", False)
    monkeypatch.setattr(data, "_told_no_dali", set())
    ds = build_dataset("imagefolder", root=jpeg_root, image_size=24, resize_size=28)
    assert isinstance(build_loader(ds, 8), FolderLoader)
    assert isinstance(build_loader(ds, 8), FolderLoader)
    assert capsys.readouterr().err.count("DALI is not installed") == 1
    with pytest.raises(ValueError, match="dali"):
        build_loader(ds, 8, backend="dali")


@needs_dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dali_gpu_decode_matches_cpu_decode(varied_root):
    ds = build_dataset("imagefolder", root=varied_root, seed=1, image_size=24, resize_size=28)
    cpu = list(build_loader(ds, 8, seed=3, backend="dali"))
    gpu = list(build_loader(ds, 8, seed=3, backend="dali", device="cuda"))
    scale = 255 * torch.tensor(ds.std).view(1, 3, 1, 1)
    for (x, y, i), (x2, y2, i2) in zip(cpu, gpu):
        assert x2.is_cuda and torch.equal(i, i2.cpu()) and torch.equal(y, y2.cpu())
        d = (x - x2.cpu()).abs() * scale
        assert d.mean() < MEAN_TOL and d.max() < MAX_TOL  # nvJPEG vs libjpeg-turbo IDCT rounding


def test_export_arrays_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        export_arrays(np.zeros((3, 8, 8), np.uint8), [0, 1], ["a", "b"], tmp_path, "train", progress=False)
    with pytest.raises(ValueError, match="labels"):
        export_arrays(np.zeros((2, 8, 8), np.uint8), [0, 2], ["a", "b"], tmp_path, "train", progress=False)
    with pytest.raises(ValueError, match="uint8"):
        write_jpeg(tmp_path / "x.JPEG", np.zeros((8, 8), np.float32))
    assert isinstance(ImageFolderDataset, type)


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=needs_dali), "arrays"])
def test_channels_last_gives_the_same_values(jpeg_root, backend):
    if backend == "arrays":
        ds = build_dataset("bundled", seed=1, limit_per_class=3)
        kw = {}
    else:
        ds = build_dataset("imagefolder", root=jpeg_root, seed=1, image_size=24, resize_size=28)
        kw = {"backend": backend}
    plain = list(build_loader(ds, 16, seed=2, **kw))
    last = build_loader(ds, 16, seed=2, channels_last=True, **kw)
    assert len(last) == len(plain)
    for (x, y, i), (x2, y2, i2) in zip(plain, last):
        assert x2.is_contiguous(memory_format=torch.channels_last) and x2.shape == x.shape
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)


def test_data_check_lists_the_unreadable_images(broken_root, capsys):
    from mtkd_fast.cli import main

    root, bad = broken_root
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "train: 50 images, 2 unreadable" in out and "val: 50 images, 0 unreadable" in out
    assert bad[0] in out and bad[1] in out
    assert main(["data", "check", str(root), "--split", "val", "--workers", "1"]) == 0
