"""The DALI image-folder path against the PIL/torchvision path on COLOUR JPEGs (chroma-subsampled 4:2:0,
quality 75) and on a JPEG with an EXIF orientation tag; the probe and its fallback; one pipeline reused
across epochs and validation passes; errors that keep their cause; the data_backend option.

CPU mode runs here (libjpeg-turbo in both paths); the GPU variants ("mixed" nvJPEG decode) skip without a
CUDA device and run in benchmarks/gpu_check.sh.

Tolerances, in grey levels (0-255) after undoing the normalisation:
- CPU, training crops: DALI decodes only the crop window (edge rows/columns of the window can differ) and its
  antialiased linear resize differs from PIL's bilinear by rounding. Measured on these colour JPEGs: mean
  0.32-0.35, max 10 (EXIF-tagged ones: mean 0.27, max 5). Bound: mean < 1, max < 24 (as for the grey JPEGs
  of test_data_folder.py).
- CPU, validation (whole image, resize, centre crop): measured mean 0.14, max 1. Bound: mean < 0.5, max < 4.
- GPU (nvJPEG with fancy upsampling vs libjpeg-turbo): IDCT rounding on top of the above. Bound: mean < 1.5,
  max < 32. Without fancy upsampling the chroma of these JPEGs (colour blocks 3 px wide) is upsampled by
  pixel replication instead of interpolation, an error of tens of levels on every colour edge.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import mtkd_fast.data as data
from mtkd_fast.data import build_dataset, build_loader
from mtkd_fast.data import dali as dali_module
from mtkd_fast.data.loader import FolderLoader

needs_dali = pytest.mark.skipif(not dali_module.DALI_AVAILABLE, reason="NVIDIA DALI is not installed")
needs_gpu = pytest.mark.skipif(not (dali_module.DALI_AVAILABLE and torch.cuda.is_available()),
                               reason="needs NVIDIA DALI and a CUDA device")

TRAIN_MEAN_TOL, TRAIN_MAX_TOL = 1.0, 24.0
VAL_MEAN_TOL, VAL_MAX_TOL = 0.5, 4.0
GPU_MEAN_TOL, GPU_MAX_TOL = 1.5, 32.0
SIZES = [(45, 61), (97, 70), (64, 64), (33, 120), (150, 111)]
ORIENTATION = 0x0112  # the EXIF orientation tag


def _colour_image(rng, h, w):
    """Smooth colour gradients plus 3-pixel colour blocks: strong chroma edges, which 4:2:0 subsampling and
    the decoder's chroma upsampling change."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([128 + 100 * np.sin(xx / 7.0), 128 + 100 * np.cos(yy / 5.0), 255 * xx / max(w - 1, 1)], -1)
    blocks = rng.integers(0, 256, size=(-(-h // 3), -(-w // 3), 3)).repeat(3, 0).repeat(3, 1)[:h, :w]
    return np.clip(0.5 * base + 0.5 * blocks, 0, 255).astype(np.uint8)


def _write(path, rgb, exif=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {"exif": exif} if exif is not None else {}
    Image.fromarray(rgb).save(path, format="JPEG", quality=75, subsampling=2, **kw)  # subsampling=2: 4:2:0


@pytest.fixture(scope="module")
def colour_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            for j in range(7):
                h, w = SIZES[(c * 7 + j) % len(SIZES)]
                _write(root / split / f"class{c}" / f"{j:02d}.JPEG", _colour_image(rng, h, w))
    return root


@pytest.fixture(scope="module")
def exif_root(tmp_path_factory):
    """Non-square colour JPEGs tagged 'rotate 90 CW' (orientation 6) and 'mirror' (2); PIL ignores the tag."""
    root = tmp_path_factory.mktemp("exif")
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for j, orientation in enumerate((6, 2, 8, 6)):
            exif = Image.Exif()
            exif[ORIENTATION] = orientation
            _write(root / split / "only" / f"{j}.JPEG", _colour_image(rng, 40, 72), exif=exif)
    return root


def _grey_levels(ds, a, b):
    return ((a.cpu() - b.cpu()).abs() * 255 * torch.tensor(ds.std).view(1, 3, 1, 1)).flatten(1)


def _compare(ds, batches_a, batches_b):
    diffs = []
    assert len(batches_a) == len(batches_b)
    for (x, y, i), (x2, y2, i2) in zip(batches_a, batches_b):
        assert torch.equal(i.cpu(), i2.cpu()) and torch.equal(y.cpu(), y2.cpu()) and x.shape == x2.shape
        diffs.append(_grey_levels(ds, x, x2))
    d = torch.cat(diffs)
    return float(d.mean()), float(d.max())


def _train_set(root, **kw):
    ds = build_dataset("imagefolder", root=root, seed=5, image_size=24, resize_size=28, **kw)
    ds.set_view(2)
    return ds


def _val_set(root):
    return build_dataset("imagefolder", root=root, split="val", augment=False, image_size=24, resize_size=28)


def test_the_colour_jpegs_are_colour_and_chroma_subsampled(colour_root):
    path = next((colour_root / "train").rglob("*.JPEG"))
    with Image.open(path) as img:
        from PIL import JpegImagePlugin

        assert JpegImagePlugin.get_sampling(img) == 2  # 4:2:0
        rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert np.abs(rgb[..., 0] - rgb[..., 1]).mean() > 20  # not grey


@needs_dali
@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_dali_cpu_training_crops_match_torchvision_on_colour_jpegs(colour_root, rank, world_size):
    ds = _train_set(colour_root)
    kw = dict(seed=2, epoch=1, rank=rank, world_size=world_size)
    mean, mx = _compare(ds, list(build_loader(ds, 8, backend="dali", **kw)),
                        list(build_loader(ds, 8, backend="torchvision", **kw)))
    assert mean < TRAIN_MEAN_TOL and mx < TRAIN_MAX_TOL, (mean, mx)


@needs_dali
def test_dali_cpu_validation_matches_torchvision_on_colour_jpegs(colour_root):
    ds = _val_set(colour_root)
    mean, mx = _compare(ds, list(build_loader(ds, 8, shuffle=False, backend="dali")),
                        list(build_loader(ds, 8, shuffle=False, backend="torchvision")))
    assert mean < VAL_MEAN_TOL and mx < VAL_MAX_TOL, (mean, mx)


@needs_dali
@pytest.mark.parametrize("split", ["train", "val"])
def test_exif_orientation_is_ignored_as_pil_does(exif_root, split, monkeypatch):
    ds = _train_set(exif_root) if split == "train" else _val_set(exif_root)
    with Image.open(next((exif_root / "train").rglob("*.JPEG"))) as img:
        assert img.getexif()[ORIENTATION] in (2, 6, 8) and img.size == (72, 40)  # tagged; PIL keeps 72x40
    tv = list(build_loader(ds, 4, shuffle=False, backend="torchvision"))
    mean, mx = _compare(ds, list(build_loader(ds, 4, shuffle=False, backend="dali")), tv)
    assert mean < TRAIN_MEAN_TOL and mx < TRAIN_MAX_TOL, (mean, mx)
    # the test can fail: honouring the tag (DALI's default) gives other pixels
    monkeypatch.setitem(dali_module.DECODER_OPTIONS, "adjust_orientation", True)
    fresh = _train_set(exif_root) if split == "train" else _val_set(exif_root)  # a new dataset: a new pipeline
    rotated_mean, _ = _compare(fresh, list(build_loader(fresh, 4, shuffle=False, backend="dali")), tv)
    assert rotated_mean > 5 * TRAIN_MEAN_TOL, rotated_mean


def test_decoders_use_pils_chroma_upsampling_and_orientation_rule():
    assert dali_module.DECODER_OPTIONS == {"jpeg_fancy_upsampling": True, "adjust_orientation": False}


@needs_dali
def test_one_pipeline_serves_every_epoch_and_validation_pass(colour_root, monkeypatch):
    built = []
    real = dali_module.build_pipeline

    def counting(*args, **kwargs):
        built.append(kwargs["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(dali_module, "build_pipeline", counting)
    ds, val = _train_set(colour_root), _val_set(colour_root)
    epochs = {}
    for epoch in range(3):
        ds.set_view(epoch)
        epochs[epoch] = list(build_loader(ds, 8, seed=1, epoch=epoch, backend="dali"))
        for _ in build_loader(val, 8, shuffle=False, backend="dali"):
            pass
    assert built == [8, 8]  # one training and one validation pipeline for three epochs
    # a part-way epoch (e.g. max_steps_per_epoch) leaves the next one intact
    next(iter(build_loader(ds, 8, seed=1, epoch=0, backend="dali")))
    ds.set_view(2)
    again = list(build_loader(ds, 8, seed=1, epoch=2, backend="dali"))
    assert len(built) == 2
    # the reused pipeline gives exactly what a fresh one gives (order, crops, pixels)
    fresh = _train_set(colour_root)
    fresh.set_view(2)
    first = list(build_loader(fresh, 8, seed=1, epoch=2, backend="dali"))
    assert len(built) == 3
    for (x, y, i), (x2, y2, i2), (x3, _, i3) in zip(epochs[2], again, first):
        assert torch.equal(i, i2) and torch.equal(i, i3) and torch.equal(x, x2) and torch.equal(x, x3)
    # epochs differ in order (a reused pipeline does not replay epoch 0)
    assert not torch.equal(torch.cat([b[2] for b in epochs[0]]), torch.cat([b[2] for b in epochs[1]]))


@needs_dali
def test_the_last_batch_is_short_not_padded(colour_root):
    ds = _val_set(colour_root)
    sizes = [len(i) for _, _, i in build_loader(ds, 8, shuffle=False, backend="dali")]
    assert sizes == [8, 8, 5] and len(ds) == 21


@needs_dali
def test_batches_stay_valid_after_later_batches(colour_root):
    """Zero-copy hand-off: a batch kept while later ones are produced still holds its own pixels."""
    ds = _val_set(colour_root)
    kept = [x.clone() for x, _, _ in build_loader(ds, 4, shuffle=False, backend="dali")]
    held = list(build_loader(ds, 4, shuffle=False, backend="dali"))
    for a, (b, _, _) in zip(kept, held):
        assert torch.equal(a, b)


def test_decode_threads_default_to_several():
    assert dali_module.default_threads(0) >= 2
    assert dali_module.default_threads(5) == 5


@needs_dali
def test_num_workers_sets_the_decode_threads(colour_root):
    ds = _val_set(colour_root)
    assert build_loader(ds, 8, backend="dali").num_threads == dali_module.default_threads(0) >= 2
    assert build_loader(ds, 8, backend="dali", num_workers=3).num_threads == 3


@pytest.mark.parametrize("cuda, package", [("13.0", "nvidia-dali-cuda130"), ("12.4", "nvidia-dali-cuda120"),
                                           ("11.8", "nvidia-dali-cuda110"), (None, "nvidia-dali-cuda130")])
def test_install_hint_matches_torchs_cuda(monkeypatch, cuda, package):
    monkeypatch.setattr(torch.version, "cuda", cuda)
    assert f"pip install {package}" in dali_module.install_hint()


@pytest.fixture()
def broken_probe(monkeypatch):
    def fail(device):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version\nmore detail")

    monkeypatch.setattr(dali_module, "DALI_AVAILABLE", True)
    monkeypatch.setattr(dali_module, "_run_probe", fail)
    monkeypatch.setattr(dali_module, "_probe_results", {})
    monkeypatch.setattr(data, "_told_no_dali", set())


def test_a_failing_probe_falls_back_to_torchvision_once(colour_root, broken_probe, capsys):
    ds = _val_set(colour_root)
    assert isinstance(build_loader(ds, 8), FolderLoader)
    assert isinstance(build_loader(ds, 8), FolderLoader)
    err = capsys.readouterr().err
    assert err.count("cannot decode on cpu") == 1 and "driver version is insufficient" in err
    assert dali_module.install_hint() in err
    with pytest.raises(ValueError, match="'dali' cannot run on cpu") as info:
        build_loader(ds, 8, backend="dali")
    assert "more detail" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    assert not data.dali_available("cpu")


@needs_dali
def test_the_probe_runs_once_per_device(monkeypatch):
    calls = []
    real = dali_module._run_probe
    monkeypatch.setattr(dali_module, "_run_probe", lambda device: calls.append(device) or real(device))
    monkeypatch.setattr(dali_module, "_probe_results", {})
    assert dali_module.probe("cpu") is None and dali_module.probe(torch.device("cpu")) is None
    assert len(calls) == 1 and data.dali_available("cpu")


class _FailingPipe:
    exec_dynamic = True

    def __init__(self, message):
        self.message = message

    def run(self):
        raise RuntimeError(self.message)

    def reset(self):
        pass


@needs_dali
def test_a_runtime_failure_keeps_daliss_whole_message(colour_root, monkeypatch):
    message = ("Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image_slice`\n"
               "CUDA allocation failed: out of memory (requested 123456789 bytes)\nCurrent pipeline object is no "
               "longer valid.")
    monkeypatch.setattr(dali_module, "build_pipeline", lambda *a, **k: _FailingPipe(message))
    ds = _train_set(colour_root)
    with pytest.raises(RuntimeError) as info:
        next(iter(build_loader(ds, 8, backend="dali")))
    text = str(info.value)
    assert "out of memory (requested 123456789 bytes)" in text and "Critical error in pipeline" in text
    assert "no unreadable file" not in text and "not a bad image" in text
    assert info.value.__cause__ is not None and str(info.value.__cause__) == message


@needs_dali
def test_a_corrupt_colour_jpeg_is_named_with_daliss_message(colour_root, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(colour_root, root)
    victim = sorted((root / "val").rglob("*.JPEG"))[9]
    victim.write_bytes(victim.read_bytes()[:200])
    ds = _val_set(root)
    with pytest.raises(ValueError, match="DALI could not decode") as info:
        for _ in build_loader(ds, 4, shuffle=False, backend="dali"):
            pass
    assert str(victim) in str(info.value) and "DALI's error" in str(info.value)
    assert info.value.__cause__ is not None
    # the failed pipeline is dropped; a fixed file works again
    shutil.copy(sorted((colour_root / "val").rglob("*.JPEG"))[9], victim)
    assert len(list(build_loader(ds, 4, shuffle=False, backend="dali"))) == 6


def test_train_config_has_a_data_backend_flag():
    from mtkd_fast import cli
    from mtkd_fast.commands.train import config_from_args
    from mtkd_fast.train import TrainConfig

    assert TrainConfig(strategy="none").data_backend == "auto"
    cfg = config_from_args(cli.build_parser().parse_args(["train", "--strategy", "none",
                                                          "--data-backend", "torchvision"]))
    assert cfg.data_backend == "torchvision"
    with pytest.raises(ValueError, match="data_backend"):
        TrainConfig(strategy="none", data_backend="nvjpeg")


def test_train_passes_the_data_backend_to_both_loaders(monkeypatch, tmp_path):
    from mtkd_fast.train import TrainConfig, train

    seen = []
    real = data.build_loader

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "build_loader", spy)
    train(TrainConfig(student="resnet8", strategy="none", dataset="bundled", limit_per_class=1, batch_size=8,
                      epochs=1, max_steps_per_epoch=1, progress=False, out_dir=str(tmp_path), device="cpu",
                      data_backend="torchvision"))
    assert seen and set(seen) == {"torchvision"} and len(seen) >= 2


# ---------------------------------------------------------------------------------------------------------
# GPU ("mixed" nvJPEG decode): run by benchmarks/gpu_check.sh, skipped without a CUDA device
# ---------------------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_dali_gpu_training_crops_match_torchvision_on_colour_jpegs(colour_root, rank, world_size):
    ds = _train_set(colour_root)
    kw = dict(seed=2, epoch=1, rank=rank, world_size=world_size)
    gpu = list(build_loader(ds, 8, backend="dali", device="cuda", **kw))
    assert all(x.is_cuda and y.is_cuda and i.is_cuda for x, y, i in gpu)
    mean, mx = _compare(ds, gpu, list(build_loader(ds, 8, backend="torchvision", **kw)))
    assert mean < GPU_MEAN_TOL and mx < GPU_MAX_TOL, (mean, mx)


@needs_gpu
def test_dali_gpu_validation_matches_torchvision_on_colour_jpegs(colour_root):
    ds = _val_set(colour_root)
    mean, mx = _compare(ds, list(build_loader(ds, 8, shuffle=False, backend="dali", device="cuda")),
                        list(build_loader(ds, 8, shuffle=False, backend="torchvision")))
    assert mean < GPU_MEAN_TOL and mx < GPU_MAX_TOL, (mean, mx)


@needs_gpu
def test_dali_gpu_ignores_exif_orientation(exif_root):
    ds = _val_set(exif_root)
    mean, mx = _compare(ds, list(build_loader(ds, 4, shuffle=False, backend="dali", device="cuda")),
                        list(build_loader(ds, 4, shuffle=False, backend="torchvision")))
    assert mean < GPU_MEAN_TOL and mx < GPU_MAX_TOL, (mean, mx)


@needs_gpu
def test_dali_gpu_channels_last_gives_the_same_values(colour_root):
    ds = _train_set(colour_root)
    plain = list(build_loader(ds, 8, seed=2, backend="dali", device="cuda"))
    last = list(build_loader(ds, 8, seed=2, backend="dali", device="cuda", channels_last=True))
    for (x, y, i), (x2, y2, i2) in zip(plain, last):
        assert x2.is_contiguous(memory_format=torch.channels_last) and x2.is_cuda
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)


@needs_gpu
def test_dali_gpu_pipeline_is_reused_and_batches_stay_valid(colour_root):
    ds = _val_set(colour_root)
    first = [x.clone() for x, _, _ in build_loader(ds, 4, shuffle=False, backend="dali", device="cuda")]
    held = list(build_loader(ds, 4, shuffle=False, backend="dali", device="cuda"))
    torch.cuda.synchronize()
    for a, (b, _, _) in zip(first, held):
        assert torch.equal(a, b)
