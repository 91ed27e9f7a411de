"""``--dataset fashion_mnist``: the full Fashion-MNIST from IDX files (``--data-root``, or Debian's
dataset-fashion-mnist folder), on small IDX files written here."""

import gzip
import struct

import numpy as np
import pytest
import torch

from mtkd_fast.cli import main
from mtkd_fast.data import DATASETS, build_dataset, fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_idx(path, array, compress):
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_root(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "fmnist"
    root.mkdir()
    n_train, n_test = 13 * 10, 4 * 10
    x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    y = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), 13))
    xt = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    yt = np.repeat(np.arange(10, dtype=np.uint8), 4)
    _write_idx(root / "train-images-idx3-ubyte.gz", x, True)  # Debian's files are gzip-compressed
    _write_idx(root / "train-labels-idx1-ubyte.gz", y, True)
    _write_idx(root / "t10k-images-idx3-ubyte", xt, False)
    _write_idx(root / "t10k-labels-idx1-ubyte", yt, False)
    return root, x, y, xt, yt


def test_fashion_mnist_reads_every_image_of_the_idx_files(idx_root):
    root, x, y, xt, yt = idx_root
    assert "fashion_mnist" in DATASETS
    train = build_dataset("fashion_mnist", split="train", root=root, augment=False)
    test = build_dataset("fashion_mnist", split="test", root=root, augment=False)
    assert len(train) == len(x) and len(test) == len(xt) and train.num_classes == 10
    assert torch.equal(train.images[:, 0], torch.from_numpy(x))
    assert torch.equal(train.labels, torch.from_numpy(y).long())
    assert torch.equal(test.images[:, 0], torch.from_numpy(xt))
    image, label, index = train[5]
    assert image.shape == (3, 32, 32) and label == int(y[5]) and index == 5
    # delivered as the bundled subset is: padded by 2, normalised with its statistics, grey replicated
    mean, std = float(train.mean[0]), float(train.std[0])
    want = (torch.from_numpy(x[5]).double() / 255 - mean) / std
    torch.testing.assert_close(image[0, 2:30, 2:30].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(image[0], image[2])
    small = build_dataset("fashion_mnist", root=root, augment=False, limit_per_class=3)
    assert len(small) == 30 and small.fingerprint != train.fingerprint
    assert train.fingerprint != build_dataset("bundled", root=root, augment=False).fingerprint


def test_fashion_mnist_without_a_root_uses_debian_or_says_how(monkeypatch, tmp_path, idx_root):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"^root: dataset 'fashion_mnist' needs the folder of its IDX files "
                                                r"\(--data-root DIR\), or Debian's dataset-fashion-mnist"):
        build_dataset("fashion_mnist")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", idx_root[0])
    assert len(build_dataset("fashion_mnist", split="test")) == 40


def test_train_on_fashion_mnist_from_the_command_line(idx_root, tmp_path, capsys):
    root = idx_root[0]
    out = tmp_path / "run"
    argv = ["train", "--dataset", "fashion_mnist", "--data-root", str(root), "--student", "resnet8",
            "--strategy", "none", "--epochs", "1", "--batch-size", "16", "--max-steps-per-epoch", "2",
            "--device", "cpu", "--no-progress", "--out-dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "student_last.pth").exists()
    capsys.readouterr()
    (root / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01")  # a broken file: one line, no traceback
    assert main(argv[:-1] + [str(tmp_path / "run2")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t10k-labels-idx1-ubyte: not a readable IDX file" in err[0]
