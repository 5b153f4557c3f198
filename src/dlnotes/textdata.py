"""Offline text datasets: English and Chinese sentiment, English-Spanish verse pairs.

The files live in data/<name>/ (built by scripts/build_text_data.py, described in each folder's README.md):
train/validation/test TSV files with fixed splits, checked against the folder's SHA256SUMS on load.
`$DLNOTES_DATA/<name>/`, when it exists, is read instead of the shipped copy.

Importing this module costs nothing beyond the standard library: no torch, no numpy.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

from dlnotes.errors import DataError

TEXT_CLASSIFICATION = ("rotten-tomatoes", "chinese-reviews")
TRANSLATION = ("bible-en-es",)
SPLITS = ("train", "validation", "test")
LABEL_NAMES = ["negative", "positive"]  # label 0 and 1; the files store the names, not the numbers


@dataclass(frozen=True)
class TextDataset:
    """`splits[split] = (texts, labels)`; each label indexes `label_names`."""

    splits: dict[str, tuple[list[str], list[int]]]
    label_names: list[str]


def load_text_classification(name: str) -> TextDataset:
    """Sentiment sentences: `rotten-tomatoes` (English movie reviews) or `chinese-reviews` (product,
    hotel and book reviews). Labels: 0 = negative, 1 = positive."""
    if name not in TEXT_CLASSIFICATION:
        raise DataError(f"Unknown text classification dataset '{name}': use one of {', '.join(TEXT_CLASSIFICATION)}.")
    label_of = {label: index for index, label in enumerate(LABEL_NAMES)}
    splits = {}
    for split, rows in _read_splits(name, header=("label", "text")).items():
        unknown = {label for label, _ in rows} - set(label_of)
        if unknown:
            raise DataError(f"{name}/{split}: unknown labels {sorted(unknown)}; {_rebuild_hint(name)}")
        splits[split] = ([text for _, text in rows], [label_of[label] for label, _ in rows])
    return TextDataset(splits=splits, label_names=list(LABEL_NAMES))


def load_translation_pairs(name: str = "bible-en-es") -> dict[str, list[tuple[str, str]]]:
    """(source, target) sentence pairs per split; `bible-en-es` gives (English, Spanish) Bible verses."""
    if name not in TRANSLATION:
        raise DataError(f"Unknown translation dataset '{name}': use one of {', '.join(TRANSLATION)}.")
    # The files also keep each verse's reference (first column); recipes only need the two texts.
    return {split: [(en, es) for _, en, es in rows]
            for split, rows in _read_splits(name, header=("ref", "en", "es")).items()}


# --- files ------------------------------------------------------------------------------------------------


def dataset_dir(name: str) -> Path:
    """`$DLNOTES_DATA/<name>` if that folder exists, else the copy that ships with dlnotes."""
    # Imported here, not at the top: dlnotes.datasets imports numpy, and this module stays stdlib-only.
    from dlnotes.datasets import data_root, user_data_dir

    user_dir = user_data_dir()
    if user_dir is not None and (user_dir / name).is_dir():
        return user_dir / name
    return data_root() / name


def _rebuild_hint(name: str) -> str:
    return f"rebuild it with `python scripts/build_text_data.py --only {name}` (see data/{name}/README.md)."


def _read_splits(name: str, header: tuple[str, ...]) -> dict[str, list[tuple[str, ...]]]:
    from dlnotes.datasets import verify_checksums

    folder = dataset_dir(name)
    verify_checksums(folder, _rebuild_hint(name))  # missing or altered file -> DataError naming the file
    splits = {}
    for split in SPLITS:
        # Files over ~10 MB are stored gzipped (mtime=0) by the build script; none is today.
        path = next((p for p in (folder / f"{split}.tsv", folder / f"{split}.tsv.gz") if p.is_file()), None)
        if path is None:
            raise DataError(f"{folder} has no {split}.tsv; {_rebuild_hint(name)}")
        splits[split] = _read_tsv(path, header, _rebuild_hint(name))
    return splits


def _read_tsv(path: Path, header: tuple[str, ...], hint: str) -> list[tuple[str, ...]]:
    """Plain TSV written by the build script: a header row, no quoting, no tabs or newlines in fields."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    lines = data.decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines or tuple(lines[0].split("\t")) != header:
        raise DataError(f"{path} does not start with the header {'<TAB>'.join(header)}; {hint}")
    rows = [tuple(line.split("\t")) for line in lines[1:]]
    bad = next((n for n, row in enumerate(rows, start=2) if len(row) != len(header)), None)
    if bad is not None:
        raise DataError(f"{path} line {bad} does not have {len(header)} tab-separated fields; {hint}")
    return rows
