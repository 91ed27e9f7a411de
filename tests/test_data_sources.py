"""Dataset sources (bundled Fashion-MNIST subset, IDX files, CIFAR-100 python format) and the loaders'
order, sharding and length."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from mtkd_fast.data import build_dataset, build_loader, epoch_indices
from mtkd_fast.data.fashion_mnist import BUNDLED_PATH


def test_bundled_subset_is_small_balanced_and_offline():
    assert BUNDLED_PATH.stat().st_size < 5.5e6
    assert (BUNDLED_PATH.parent / "LICENSE-fashion-mnist.txt").read_text().count("MIT") >= 1
    train = build_dataset("bundled", split="train")
    test = build_dataset("bundled", split="test", augment=False)
    assert (len(train), len(test), train.num_classes) == (10000, 2000, 10)
    assert train.image_shape == test.image_shape == (3, 32, 32)
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    assert torch.bincount(train.labels).tolist() == [1000] * 10
    assert torch.bincount(test.labels).tolist() == [200] * 10
    # the stored statistics are those of the training pixels
    pixels = train.images.double() / 255
    assert abs(float(pixels.mean()) - train.mean[0]) < 1e-4 and abs(float(pixels.std()) - train.std[0]) < 1e-4
    # train and test are different images
    assert not torch.equal(train.images[:5], test.images[:5])


def test_limit_per_class_keeps_the_first_samples_of_each_class():
    full = build_dataset("bundled", augment=False)
    small = build_dataset("bundled", augment=False, limit_per_class=7)
    assert len(small) == 70 and torch.bincount(small.labels).tolist() == [7] * 10
    first = torch.cat([torch.nonzero(full.labels == k)[:7, 0] for k in range(10)]).sort().values
    assert torch.equal(small.images, full.images[first])
    assert small.fingerprint != full.fingerprint
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="limit_per_class"):
            build_dataset("bundled", limit_per_class=bad)


def _write_idx(path, array, compress):
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_idx_root_is_used_instead_of_the_bundled_subset(tmp_path):
    bundled = build_dataset("bundled", augment=False, limit_per_class=5)
    x = bundled.images[:, 0].numpy()[::-1].copy()
    y = bundled.labels.numpy()[::-1].astype(np.uint8).copy()
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", x, True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y, True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", x[:20], False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", y[:20], False)
    ds = build_dataset("bundled", root=tmp_path, augment=False)
    assert len(ds) == 50 and torch.equal(ds.images[:, 0], torch.from_numpy(x))
    assert ds.mean == bundled.mean  # the subset's statistics normalise the full set too
    assert len(build_dataset("bundled", split="test", root=tmp_path)) == 20
    # a truncated IDX file is named in the error
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*truncated"):
        build_dataset("bundled", split="test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        build_dataset("bundled", root=tmp_path / "no-such-folder")


def _fake_cifar100(root, n_train=300, n_test=100, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir()
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        with open(root / split, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * n}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{k}".encode() for k in range(100)]}, f)
    return root


def test_cifar100_python_format_and_its_errors(tmp_path):
    root = _fake_cifar100(tmp_path / "cifar-100-python")
    ds = build_dataset("cifar100", root=root, augment=False)
    assert (len(ds), ds.num_classes, ds.image_shape) == (300, 100, (3, 32, 32))
    raw = pickle.load(open(root / "train", "rb"), encoding="bytes")
    img, label, index = ds[17]
    expected = torch.from_numpy(raw[b"data"][17].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    torch.testing.assert_close(img, (expected - mean) / std)
    assert (label, index) == (raw[b"fine_labels"][17], 17)
    assert ds.mean == (0.5071, 0.4867, 0.4408)  # docs/method.md section 7
    aug = build_dataset("cifar100", root=root, augment=True, seed=1)
    assert aug.recipe.to_dict() == {"kind": "pad_crop", "padding": 4, "flip": True}
    assert len(build_dataset("cifar100", split="test", root=root)) == 100
    with pytest.raises(ValueError, match="root"):
        build_dataset("cifar100")
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        build_dataset("cifar100", root=tmp_path / "missing-folder")
    (root / "test").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="cifar-100-python/test"):
        build_dataset("cifar100", split="test", root=root)
    with pytest.raises(ValueError, match="name"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="split"):
        build_dataset("bundled", split="validation")


def test_epoch_order_follows_distributed_sampler():
    for shuffle in (True, False):
        for world in (1, 3):
            for rank in range(world):
                s = DistributedSampler(range(103), num_replicas=world, rank=rank, shuffle=shuffle, seed=9)
                s.set_epoch(4)
                got = epoch_indices(103, shuffle=shuffle, seed=9, epoch=4, rank=rank, world_size=world)
                assert got.tolist() == list(s)
    with pytest.raises(ValueError, match="rank"):
        epoch_indices(10, shuffle=True, seed=0, epoch=0, rank=2, world_size=2)


def test_loader_batches_are_reproducible_sharded_and_counted():
    ds = build_dataset("bundled", augment=True, seed=3, limit_per_class=10)  # 100 samples
    ds.set_view(2)
    a = list(build_loader(ds, 16, seed=5, epoch=1))
    b = list(build_loader(ds, 16, seed=5, epoch=1))
    c = list(build_loader(ds, 16, seed=5, epoch=2))
    assert len(a) == len(build_loader(ds, 16)) == 7
    for (x, y, i), (x2, y2, i2) in zip(a, b):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and i.dtype == torch.int64
        assert torch.equal(y, ds.labels[i])
    order_a, order_c = torch.cat([i for _, _, i in a]), torch.cat([i for _, _, i in c])
    assert sorted(order_a.tolist()) == list(range(100)) and not torch.equal(order_a, order_c)
    assert len(build_loader(ds, 16, drop_last=True)) == 6
    assert [len(i) for _, _, i in build_loader(ds, 16, drop_last=True)] == [16] * 6
    # 3 ranks: equal-length shards (34 each, padded by wrapping) that together cover every sample
    shards = [torch.cat([i for _, _, i in build_loader(ds, 8, seed=5, rank=r, world_size=3)]) for r in range(3)]
    assert [len(s) for s in shards] == [34, 34, 34]
    assert set(torch.cat(shards).tolist()) == set(range(100))
    assert torch.equal(shards[1], torch.from_numpy(epoch_indices(100, shuffle=True, seed=5, epoch=0, rank=1,
                                                                 world_size=3)))
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(ds, 0)
    with pytest.raises(ValueError, match="num_workers"):
        build_loader(ds, 4, num_workers=-1)


def test_worker_processes_give_the_same_batches():
    ds = build_dataset("bundled", augment=True, seed=1, limit_per_class=6)
    ds.set_view(4)
    here = list(build_loader(ds, 8, seed=2, epoch=3))
    workers = list(build_loader(ds, 8, seed=2, epoch=3, num_workers=1))
    assert len(here) == len(workers)
    for (x, y, i), (x2, y2, i2) in zip(here, workers):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)


FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not __import__("os").path.isdir(FASHION_MNIST_DEBIAN),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_bundled_subset_is_what_the_tool_makes_from_the_full_set():
    from repo_tools import load_tool

    from mtkd_fast.data.fashion_mnist import load_bundled

    tool = load_tool("make_bundled_fashion_mnist")
    made, bundled = tool.make_arrays(FASHION_MNIST_DEBIAN), load_bundled()
    assert sorted(made) == sorted(bundled)
    for key in made:
        np.testing.assert_array_equal(made[key], bundled[key], err_msg=key)
