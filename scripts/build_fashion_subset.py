"""Rebuild data/fashion-mnist-subset/ from the full Fashion-MNIST (Zalando, MIT): 6,000 train / 2,000 test images.

    python scripts/build_fashion_subset.py                      # reads Debian's dataset-fashion-mnist
    python scripts/build_fashion_subset.py --source-dir FOLDER  # any folder with the four standard IDX files

The subset is stratified and fixed: 600 images of each class from the official training set and 200 of each
from the official test set, chosen with numpy's default_rng(0), then shuffled across classes. Train and test
come from the official parts, so no image is in both. Output is the standard IDX format, gzip-compressed with
mtime=0: the same loader reads it and the full set, and a rebuild is byte-identical. The source files' sha256
are checked first, so a different upstream release cannot silently change the subset.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from dlnotes.datasets import DEBIAN_FASHION_MNIST, FASHION_CLASSES, read_idx, write_idx_gz  # noqa: E402

TRAIN_PER_CLASS, TEST_PER_CLASS = 600, 200
SEED = 0
OUT_DIR = ROOT / "data" / "fashion-mnist-subset"
# The gzip files as Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 ships them.
SOURCE_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


def read_source(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for name, expected in SOURCE_SHA256.items():
        path = folder / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise SystemExit(f"{path}: sha256 {digest}, expected {expected} (another release of Fashion-MNIST?)")
        arrays[name] = read_idx(path)
    return arrays


def stratified_pick(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(FASHION_CLASSES))]
    return rng.permutation(np.concatenate(chosen))  # shuffled across classes: the files are not sorted by label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-dir", type=Path, default=DEBIAN_FASHION_MNIST,
                        help="a folder with the four gzip IDX files of Fashion-MNIST")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    source = read_source(args.source_dir)
    rng = np.random.default_rng(SEED)
    train = stratified_pick(source["train-labels-idx1-ubyte.gz"], TRAIN_PER_CLASS, rng)
    test = stratified_pick(source["t10k-labels-idx1-ubyte.gz"], TEST_PER_CLASS, rng)

    args.out.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte.gz": source["train-images-idx3-ubyte.gz"][train],
        "train-labels-idx1-ubyte.gz": source["train-labels-idx1-ubyte.gz"][train],
        "t10k-images-idx3-ubyte.gz": source["t10k-images-idx3-ubyte.gz"][test],
        "t10k-labels-idx1-ubyte.gz": source["t10k-labels-idx1-ubyte.gz"][test],
    }
    sums = {name: write_idx_gz(args.out / name, array) for name, array in files.items()}
    (args.out / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
    print(f"{len(train)} train / {len(test)} test images -> {args.out}")
    for name, digest in sums.items():
        print(f"  {digest}  {name}  {(args.out / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
