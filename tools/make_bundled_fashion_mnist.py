"""Make mtkd_fast/data/bundled/fashion_mnist_subset.npz.xz, the bundled default dataset.

Source: the full Fashion-MNIST in Debian's package (``apt-get update && apt-get install -y
dataset-fashion-mnist`` puts the IDX files in /usr/share/datasets/fashion-mnist). Takes the first
``--train-per-class`` training images and the first ``--test-per-class`` test images of each class (in the
files' order, so it is deterministic), keeps them 28x28 uint8, records the training subset's pixel mean and
std, and writes an uncompressed .npz compressed with xz (about 4.5 MB for 1000 + 200 per class).

    .venv/bin/python tools/make_bundled_fashion_mnist.py [--src DIR] [--out PATH]
"""

import argparse
import io
import lzma
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtkd_fast.data.arrays import first_per_class  # noqa: E402
from mtkd_fast.data.fashion_mnist import BUNDLED_PATH, CLASS_NAMES, IDX_FILES, _find, read_idx  # noqa: E402


def balanced_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    keep = first_per_class(labels, per_class)  # the files' (shuffled) order, classes interleaved
    counts = np.bincount(labels[keep], minlength=len(CLASS_NAMES))
    if (counts != per_class).any():
        raise ValueError(f"per_class: some classes have fewer than {per_class} samples: {counts.tolist()}")
    return keep


def make_arrays(src, train_per_class: int = 1000, test_per_class: int = 200) -> dict:
    """The subset's arrays: {train,test}_{images,labels} (uint8) and the training pixels' mean and std."""
    src = Path(src)
    arrays = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images = read_idx(_find(src, IDX_FILES[split][0]))
        labels = read_idx(_find(src, IDX_FILES[split][1]))
        keep = balanced_subset(labels, per_class)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[keep], labels[keep]
    pixels = arrays["train_images"].astype(np.float64) / 255.0
    arrays["mean"] = np.array([pixels.mean()], np.float32)
    arrays["std"] = np.array([pixels.std()], np.float32)
    return arrays


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default=str(BUNDLED_PATH))
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=200)
    args = ap.parse_args(argv)
    arrays = make_arrays(args.src, args.train_per_class, args.test_per_class)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = lzma.compress(buf.getvalue(), preset=9)
    out = Path(args.out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, out)
    print(f"wrote {out}: {len(data) / 1e6:.2f} MB; train {arrays['train_images'].shape}, "
          f"test {arrays['test_images'].shape}, mean {arrays['mean'][0]:.4f}, std {arrays['std'][0]:.4f}")


if __name__ == "__main__":
    main()
