"""The shipped text datasets: checksums, split sizes, no leakage between splits, and clear errors."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dlnotes.errors import DataError
from dlnotes.textdata import (
    SPLITS,
    TEXT_CLASSIFICATION,
    TRANSLATION,
    dataset_dir,
    load_text_classification,
    load_translation_pairs,
)

ALL = TEXT_CLASSIFICATION + TRANSLATION


@pytest.fixture(autouse=True)
def _shipped_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test the copy in the repo, whatever DLNOTES_DATA the developer has set."""
    monkeypatch.delenv("DLNOTES_DATA", raising=False)


def readme_counts(name: str) -> dict[str, list[int]]:
    """`| train | 10,200 | 4,306 | 5,894 |` -> {"train": [10200, 4306, 5894]} from the dataset's README."""
    counts = {}
    for line in (dataset_dir(name) / "README.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| (train|validation|test) \|(.*)\|$", line)
        if match:
            counts[match.group(1)] = [int(cell.strip().replace(",", "")) for cell in match.group(2).split("|")]
    return counts


def split_texts(name: str) -> dict[str, list[str]]:
    """Every text of each split; for the translation pairs both sides count as texts."""
    if name in TRANSLATION:
        return {split: [t for pair in pairs for t in pair] for split, pairs in load_translation_pairs(name).items()}
    return {split: texts for split, (texts, _) in load_text_classification(name).splits.items()}


@pytest.mark.parametrize("name", ALL)
def test_checksums_match_the_files(name: str) -> None:
    folder = dataset_dir(name)
    listed = [line.split("  ", 1) for line in (folder / "SHA256SUMS").read_text().splitlines()]
    assert sorted(filename for _, filename in listed) == sorted(f"{split}.tsv" for split in SPLITS)
    for digest, filename in listed:
        assert hashlib.sha256((folder / filename).read_bytes()).hexdigest() == digest, filename
        assert digest in (folder / "README.md").read_text(encoding="utf-8"), f"README lacks the sha256 of {filename}"


@pytest.mark.parametrize("name", TEXT_CLASSIFICATION)
def test_classification_split_sizes_match_readme(name: str) -> None:
    data = load_text_classification(name)
    assert data.label_names == ["negative", "positive"]
    for split, (rows, negative, positive) in readme_counts(name).items():
        texts, labels = data.splits[split]
        assert len(texts) == len(labels) == rows
        assert Counter(labels) == {0: negative, 1: positive}


def test_translation_split_sizes_match_readme() -> None:
    pairs = load_translation_pairs("bible-en-es")
    counts = readme_counts("bible-en-es")
    assert set(counts) == set(SPLITS)
    for split, (rows,) in counts.items():
        assert len(pairs[split]) == rows
    assert 30_000 < sum(len(p) for p in pairs.values()) < 31_102  # at most one pair per verse of both texts


@pytest.mark.parametrize("name", ALL)
def test_no_evaluation_text_appears_in_train(name: str) -> None:
    # Case-folded, as the build script de-duplicates: "Great!" in test and "great!" in train would leak too.
    texts = {split: {t.casefold() for t in values} for split, values in split_texts(name).items()}
    assert all(texts[split] for split in SPLITS)
    assert not texts["test"] & texts["train"]
    assert not texts["validation"] & texts["train"]
    assert not texts["test"] & texts["validation"]


@pytest.mark.parametrize("name", ALL)
def test_texts_are_clean(name: str) -> None:
    for values in split_texts(name).values():
        assert all(t and t == t.strip() and "  " not in t and "\t" not in t and "\n" not in t for t in values)
    if name in TRANSLATION:  # markup and the stale headings diatheke prints must be gone
        assert not any("<" in t or ">" in t or "&amp;" in t for t in split_texts(name)["train"])


@pytest.mark.parametrize("name", TEXT_CLASSIFICATION)
def test_labels_are_balanced_and_stratified(name: str) -> None:
    data = load_text_classification(name)
    shares = {split: sum(labels) / len(labels) for split, (_, labels) in data.splits.items()}
    assert all(0.35 < share < 0.65 for share in shares.values()), shares  # neither class is rare
    assert max(shares.values()) - min(shares.values()) < 0.01, shares  # the same mix in every split


def test_first_verse_is_aligned() -> None:
    refs = {}
    for split in SPLITS:  # the loader drops the reference column; read it from the files
        lines = (dataset_dir("bible-en-es") / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        refs.update((ref, (en, es)) for ref, en, es in (line.split("\t") for line in lines[1:]))
    assert refs["Genesis 1:1"] == ("In the beginning, God created the heavens and the earth.",
                                   "EN el principio crió Dios los cielos y la tierra.")


# --- errors -----------------------------------------------------------------------------------------------


def copy_to(tmp_path: Path, name: str) -> Path:
    shutil.copytree(dataset_dir(name), tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("name", ALL)
def test_a_corrupt_file_raises_data_error(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = copy_to(tmp_path, name)
    data = bytearray((folder / "test.tsv").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (folder / "test.tsv").write_bytes(bytes(data))
    monkeypatch.setenv("DLNOTES_DATA", str(tmp_path))
    loader = load_translation_pairs if name in TRANSLATION else load_text_classification
    with pytest.raises(DataError, match=r"test\.tsv.*build_text_data\.py") as excinfo:
        loader(name)
    assert "\n" not in str(excinfo.value)


def test_a_missing_file_raises_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = copy_to(tmp_path, "rotten-tomatoes")
    (folder / "validation.tsv").unlink()
    monkeypatch.setenv("DLNOTES_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"validation\.tsv is missing.*build_text_data\.py --only rotten-tomatoes"):
        load_text_classification("rotten-tomatoes")


def test_dlnotes_data_without_the_folder_falls_back_to_the_shipped_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DLNOTES_DATA", str(tmp_path))  # exists, but has no rotten-tomatoes/ folder
    assert dataset_dir("rotten-tomatoes") != tmp_path / "rotten-tomatoes"
    assert len(load_text_classification("rotten-tomatoes").splits["test"][0]) > 1000


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(DataError, match="rotten-tomatoes, chinese-reviews"):
        load_text_classification("imdb")
    with pytest.raises(DataError, match="bible-en-es"):
        load_translation_pairs("rotten-tomatoes")


def test_import_is_standard_library_only() -> None:
    code = "import sys, dlnotes.textdata; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
