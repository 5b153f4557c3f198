"""Bad inputs a user (or a doctored file) can give: each is one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import gzip
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error

from dlnotes import catalog
from dlnotes.datasets import verify_checksums
from dlnotes.errors import DataError, UserError
from dlnotes.images import read_image_like_mnist

PREDICTING = sorted(i for i, info in catalog.all_recipes().items() if info.can_predict)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height grey pixels: a few dozen bytes on disk, gigabytes once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = png_header_only(tmp_path / "bomb.png", 9000, 9000)  # below Pillow's own limit, above ours
    assert bomb.stat().st_size < 200
    with pytest.raises(UserError, match="9000x9000 pixels"):
        read_image_like_mnist(bomb)
    with pytest.raises(UserError, match="bomb"):  # Pillow refuses this one itself; still one line
        read_image_like_mnist(png_header_only(tmp_path / "bigger.png", 20000, 12000))


def test_a_truncated_or_fake_image_is_one_line(tmp_path: Path) -> None:
    from PIL import Image

    whole = tmp_path / "digit.png"
    Image.new("L", (64, 64), 200).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:60])
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    for path in (truncated, fake):
        with pytest.raises(UserError, match="Cannot read"):
            read_image_like_mnist(path)


@pytest.mark.parametrize("recipe", PREDICTING)
def test_predict_without_inputs_is_one_line(recipe: str, invoke, tmp_path: Path) -> None:
    result = invoke("predict", recipe, "--run", str(tmp_path))
    assert_one_line_error(result)  # "give at least one input", or for dqn (inputs optional) "no checkpoint.pt"


def test_cp_refuses_links_folders_unwritable_places_and_the_recipe_itself(invoke, tmp_path: Path) -> None:
    dangling = tmp_path / "link.py"
    dangling.symlink_to(tmp_path / "nowhere" / "target.py")
    assert_one_line_error(invoke("cp", "mlp", str(dangling)), "symbolic link")
    (tmp_path / "mlp.py").mkdir()
    assert_one_line_error(invoke("cp", "mlp", str(tmp_path)), "is a folder")
    assert_one_line_error(invoke("cp", "mlp", "/proc/dlnotes-mlp.py"), "Cannot write /proc/dlnotes-mlp.py")
    source = catalog.get("mlp").path
    assert_one_line_error(invoke("cp", "mlp", str(source), "--force"), "the recipe itself")
    assert "def main" in source.read_text()  # untouched


def _idx_folder(folder: Path) -> Path:
    folder.mkdir()
    images = struct.pack(">HBBIII", 0, 8, 3, 2, 28, 28) + bytes(2 * 28 * 28)
    labels = struct.pack(">HBBI", 0, 8, 1, 2) + bytes(2)
    for name, data in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                       ("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    return folder


@pytest.mark.parametrize("damage", ["corrupt body", "not gzip", "empty"])
def test_a_corrupt_gzip_under_data_dir_is_one_line(damage: str, invoke, tmp_path: Path) -> None:
    folder = _idx_folder(tmp_path / "idx")
    path = folder / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes({"corrupt body": data[:12] + b"\xff" * 40 + data[52:], "not gzip": b"plain text",
                      "empty": b""}[damage])
    result = invoke("run", "mlp", "--smoke", "--device", "cpu", "--data-dir", str(folder), "--out", str(tmp_path))
    assert_one_line_error(result, "train-images-idx3-ubyte.gz")


def test_sha256sums_with_a_blank_line_or_a_missing_entry_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"a")
    digest = "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  a.bin\n\n")
    with pytest.raises(DataError, match=r"SHA256SUMS:2 is not"):
        verify_checksums(tmp_path, "rebuild it.")
    (tmp_path / "SHA256SUMS").write_text(f"{digest}  a.bin\n")
    verify_checksums(tmp_path, "rebuild it.")  # whole and right
    with pytest.raises(DataError, match="no entry for b.bin"):
        verify_checksums(tmp_path, "rebuild it.", required=("a.bin", "b.bin"))


def test_an_environment_id_cannot_import_a_module(invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dlnotes.rl import make_env

    marker = tmp_path / "imported"
    (tmp_path / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="module:Name are refused"):
        make_env("planted:Evil-v0")
    assert not marker.exists() and "planted" not in sys.modules
    assert_one_line_error(invoke("run", "dqn", "--env", "planted:Evil-v0", "--smoke", "--device", "cpu",
                                 "--out", str(tmp_path)), "planted:Evil-v0")


def test_a_doctored_fasttext_size_is_refused_before_allocating(smoke_run, invoke) -> None:
    _, run_dir = smoke_run("fasttext")
    path = run_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["buckets"] = 10**13  # would be tens of terabytes of float32
    torch.save(state, path)
    assert_one_line_error(invoke("predict", "fasttext", "--run", str(run_dir), "a fine film"),
                          "asks for a 10,000,000,009,937 x 32 embedding", "not loading it")


def test_runs_lists_truncated_run_files_as_unreadable(invoke, tmp_path: Path) -> None:
    for stamp, config, summary in (("20260101-000000", '{"meta": {"recipe": "mlp"}', None),
                                   ("20260101-000001", '{"meta": {"recipe": "mlp"}}', '{"metrics": {"test_')):
        folder = tmp_path / "mlp" / stamp
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(config)
        if summary is not None:
            (folder / "summary.json").write_text(summary)
    result = invoke("runs", "--out", str(tmp_path), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.count("(unreadable: JSONDecodeError)") == 2
