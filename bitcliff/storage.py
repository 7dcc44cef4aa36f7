"""Every file bitcliff writes: atomically, with the user's umask, never over a user's own files.

* :func:`cache_root`: where prepared assets and tuning results live.
* :func:`write_text`, :func:`write_json`, :func:`save_tensors`: one file, written to a temporary
  sibling and renamed into place, so a reader never sees half a file.
* :func:`building_dir`: a cache folder built beside its final name and renamed when complete.
* :func:`replace_folder`: an output folder (checkpoint, run, report) built the same way.
* :func:`write_output`: an output that is one JSON file (``eval --json``, ``sweep.json``).

What may be replaced (:func:`check_replaceable`, :func:`check_file_replaceable`), the rule the
README states: an output is a folder bitcliff wrote, whose manifest (:data:`MANIFEST`) lists its
files, or a JSON file bitcliff wrote, which names itself (:data:`OUTPUT_KEY`).  bitcliff writes
where nothing is, and replaces what is there only when it is such an output and ``overwrite``
is given; then it replaces that output alone.  Anything else found there stops it, named: a
file the manifest does not list, or another output kept inside the folder (a diagnosis in a
checkpoint's folder, an ``eval --json`` file).  A symbolic link is followed: the output goes
where it points and the link stays.

Temporary files and folders are created private (0600/0700); the finished result gets the
permissions the user's umask gives ordinary files (0644/0755 for umask 022).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

#: Written last into every output folder: what bitcliff wrote there, so that a later
#: ``overwrite`` can tell its own files from a user's.
MANIFEST = ".bitcliff-manifest.json"

#: The key by which a JSON file bitcliff wrote as an output names itself (its value: the kind).
OUTPUT_KEY = "bitcliff_output"


class OccupiedOutputError(FileExistsError):
    """An output folder exists and holds files bitcliff may not replace."""


def cache_root() -> Path:
    """Where prepared assets and kernel tuning results live, created on demand.

    Returns:
        ``$BITCLIFF_CACHE`` if set, else ``$XDG_CACHE_HOME/bitcliff`` or ``~/.cache/bitcliff``.
    """
    override = os.environ.get("BITCLIFF_CACHE")
    if override:
        path = Path(override).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base).expanduser() / "bitcliff"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_shareable(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions the umask allows."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        make_shareable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
    return Path(path)


def write_json(path: str | os.PathLike, data, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (serialized before anything is written)."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def check_file_replaceable(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, a one-file output that :func:`write_output` would refuse.

    Raises:
        OccupiedOutputError: ``path`` is a folder; or it exists and ``overwrite`` is off; or,
            with ``overwrite``, it is not a JSON file bitcliff wrote as an output.
    """
    path = real_path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise OccupiedOutputError(f"{path} is a folder; give the path of a file")
    if not overwrite:
        raise OccupiedOutputError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    if output_kind(path) is None:
        raise OccupiedOutputError(f"{path} is a file bitcliff did not write as an output; it replaces only its own "
                                  "outputs, so nothing was changed: choose another file name")


def write_output(path: str | os.PathLike, data: dict, overwrite: bool, kind: str) -> Path:
    """Write ``data`` as a one-file JSON output, marked as bitcliff's (:data:`OUTPUT_KEY`).

    Every command that writes one file as its result goes through here, so that the rule of
    :func:`check_file_replaceable` holds for all of them.  Returns the path written (a symbolic
    link followed).
    """
    path = real_path(path)
    check_file_replaceable(path, overwrite)
    return write_json(path, {OUTPUT_KEY: kind, **data})


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as one safetensors file atomically (``format: pt`` metadata, plus ``metadata``)."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with _atomic_path(Path(path)) as tmp:
        try:
            save_file(contiguous, str(tmp), metadata={**(metadata or {}), "format": "pt"})
        except Exception as exc:  # safetensors reports a failed write as its own error, not OSError
            raise _as_os_error(exc, Path(path)) from exc
    return Path(path)


def _as_os_error(exc: Exception, path: Path) -> Exception:
    """An OSError for a write safetensors could not make (its messages carry the OS error code),
    so that a full disk reads as one; any other error unchanged."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        if f"(os error {code})" in text or f"code: {code}," in text:
            return OSError(code, os.strerror(code), str(path))
    return exc


@contextmanager
def building_dir(final: Path, is_complete: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; on success it is renamed to ``final``.

    For caches: an existing ``final`` that ``is_complete`` says is finished (a concurrent build
    of the same asset) is kept and the new one discarded; any other existing ``final`` is
    replaced.  On an error the partial folder is deleted and ``final`` is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield partial
        make_shareable(partial)
        try:
            os.rename(partial, final)
        except OSError:
            if not is_complete(final):
                stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=final.parent))
                os.replace(final, stale)
                os.rename(partial, final)
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def scratch(root: Path) -> Iterator[Path]:
    """A temporary folder inside ``root`` (large downloads stay on the same disk)."""
    with tempfile.TemporaryDirectory(prefix=".scratch-", dir=root) as work:
        yield Path(work)


# ------------------------------------------------------------------------- cached files


def file_record(path: Path) -> dict:
    """What :func:`file_intact` checks ``path`` against later: size, sha256 and mtime."""
    stat = Path(path).stat()
    return {"size": stat.st_size, "sha256": file_sha256(path), "mtime_ns": stat.st_mtime_ns}


def file_intact(path: Path, record: dict) -> bool:
    """Whether ``path`` still holds what :func:`file_record` saw: the size always, the digest
    when the file was touched since (same size and mtime: unchanged, without reading it)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return False
    if stat.st_size != record.get("size"):
        return False
    if stat.st_mtime_ns == record.get("mtime_ns"):
        return True
    return file_sha256(path) == record.get("sha256")


def safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file is as long as its header says (a cut-off copy is not)."""
    try:
        with Path(path).open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return Path(path).stat().st_size == 8 + header_len + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


# ------------------------------------------------------------------------- output folders


def _listing(folder: Path) -> list[str]:
    """Every file under ``folder``, as POSIX paths relative to it, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def real_path(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` and every symbolic link resolved: an output given as a link is written
    where the link points, and the link itself is left alone."""
    return Path(os.path.realpath(Path(path).expanduser()))


def output_kind(path: Path) -> str | None:
    """The kind of bitcliff output ``path`` is (a folder with a manifest, or a JSON file that
    names itself), or None for anything else."""
    try:
        if path.is_dir():
            return str(json.loads((path / MANIFEST).read_text())["kind"])
        if path.suffix.lower() != ".json" or path.stat().st_size > (64 << 20):
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return str(data[OUTPUT_KEY]) if isinstance(data, dict) and OUTPUT_KEY in data else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 over every file under ``folder`` (each name with its bytes' sha256, the manifest
    aside): equal digests, equal folders.  About 0.2 s per 100 MB on one core."""
    digest = hashlib.sha256()
    for name in _listing(folder):
        if name != MANIFEST:
            digest.update(f"{name}\0{file_sha256(folder / name)}\0".encode())
    return digest.hexdigest()


def write_manifest(folder: Path, kind: str, bound: tuple[str, ...] = ()) -> None:
    """Record every file now in ``folder`` as bitcliff's (call it last, when the folder is full).

    ``bound``: files whose sha256 is recorded too (those present), so that a reader can tell them
    from a file of the same name copied in from another folder (:func:`manifest_digests`).
    """
    files = [f for f in _listing(folder) if f != MANIFEST]
    data = {"kind": kind, "files": files}
    if bound:
        data["digests"] = {name: file_sha256(folder / name) for name in bound if name in files}
    (folder / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")


def read_manifest(folder: Path) -> dict | None:
    """The manifest of an output folder, or None where there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def foreign_files(folder: Path) -> list[str]:
    """Files in ``folder`` that bitcliff did not write as part of it, by its manifest (a folder
    without a manifest is foreign as a whole).  Other outputs kept inside it are not listed
    here but by :func:`nested_outputs`."""
    try:
        owned = set(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return _listing(folder)
    nested = {name for name, _ in nested_outputs(folder)}
    return [name for name in _listing(folder)
            if name != MANIFEST and name not in owned and not any(name == n or name.startswith(n + "/") for n in nested)]


def nested_outputs(folder: Path) -> list[tuple[str, str]]:
    """Other bitcliff outputs kept inside the output folder ``folder`` (name, kind), which its
    manifest does not list: a report saved into a checkpoint's folder, an ``eval --json`` file.
    They are outputs of their own, so replacing ``folder`` may not delete them."""
    try:
        owned = set(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    found = []
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name == MANIFEST or name in owned or any(name.startswith(n + "/") for n, _ in found):
            continue
        kind = output_kind(path)
        if kind is not None:
            found.append((name, kind))
    return found


def check_writable_location(path: str | os.PathLike, file: bool = False, renamed: bool = True) -> None:
    """Refuse, before any work, an output ``path`` (a folder, or with ``file`` a file) that could
    never be written: under a file, in a folder that cannot be written (read-only, no
    permission), the other kind of thing already, or, for a folder built beside its final name
    and ``renamed`` into place (:func:`replace_folder`), a mount point, onto which nothing can
    be renamed.  A folder filled in place (a run folder) is probed inside.

    Raises:
        OccupiedOutputError: ``path`` is the other kind of thing (a file for a folder, or back).
        PermissionError: nothing can be written where ``path`` would go (the message says why).
        NotADirectoryError: a file stands where a folder of the path should be.
    """
    path = real_path(path)  # a link is followed: the output goes where it points
    if path.exists():
        if file and path.is_dir():
            raise OccupiedOutputError(f"{path} is a folder; give the path of a file")
        if not file and not path.is_dir():
            raise OccupiedOutputError(f"{path} exists and is not a folder")
        if not file and renamed and os.path.ismount(path):
            raise PermissionError(f"{path} is a mount point: bitcliff builds an output beside its final name and "
                                  f"renames it into place, which cannot replace a mount point; give a folder inside "
                                  f"it, e.g. {path / 'out'}")
    ancestor = path.absolute() if not renamed and path.is_dir() else path.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{path} cannot be created: {ancestor} is a file, not a folder")
    try:  # a real write: access() does not see every read-only mount, and root passes it anyway
        fd, probe = tempfile.mkstemp(prefix=".bitcliff-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"{path} cannot be written: {ancestor} does not accept files "
                              f"({exc.strerror or exc}); choose another output location") from None


def check_replaceable(directory: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that :func:`replace_folder` would refuse.

    Raises:
        OccupiedOutputError: ``directory`` is a file; or it holds files and ``overwrite`` is
            off; or, with ``overwrite``, it holds a file bitcliff did not write there (named).
    """
    directory = real_path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise OccupiedOutputError(f"{directory} exists and is not a folder")
    if not any(directory.iterdir()):
        return
    if not overwrite:
        raise OccupiedOutputError(
            f"{directory} already exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    foreign = foreign_files(directory)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise OccupiedOutputError(
            f"{directory} holds {foreign[0]}{more}, which bitcliff did not write; it replaces only "
            "folders it wrote itself, so nothing was changed: move those files or choose another output folder"
        )
    nested = nested_outputs(directory)
    if nested:
        (name, kind), more = nested[0], f" (and {len(nested) - 1} more)" if len(nested) > 1 else ""
        raise OccupiedOutputError(
            f"{directory} holds {name}{more}, a bitcliff output of its own ({kind}); overwrite "
            "replaces one output and never another one kept inside it, so nothing was changed: move or "
            "delete it first, or choose another output folder"
        )


def replace_folder(directory: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool, kind: str,
                   bound: tuple[str, ...] = ()) -> Path:
    """Create ``directory`` by calling ``fill(tmp)`` on a temporary sibling, then renaming it.

    Args:
        directory: the output folder.
        fill: writes the folder's content into the temporary folder it is given.
        overwrite: replace an existing folder that bitcliff wrote (see :func:`check_replaceable`).
        kind: what the folder is ("checkpoint", "diagnosis", ...), recorded in its manifest.
        bound: files whose digests the manifest records (see :func:`write_manifest`).
    Returns:
        ``directory`` (a symbolic link followed).  The old folder is removed only after the new one is in place; on any
        error (disk full, Ctrl-C) the temporary folder is removed and ``directory`` is untouched.
    """
    directory = real_path(directory)
    check_replaceable(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        fill(tmp)
        write_manifest(tmp, kind, bound)
        make_shareable(tmp)
        old = None
        if directory.exists():
            check_replaceable(directory, overwrite)  # it may have changed while we worked
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        converted = _as_os_error(exc, directory) if isinstance(exc, Exception) else exc
        if converted is not exc:  # a writer's own error type for a full disk: say it as one
            raise converted from exc
        raise
    return directory


def finish_folder(work: Path, directory: Path, overwrite: bool, kind: str) -> Path:
    """Move a finished work folder (filled over time, e.g. a resumable run) to ``directory``
    with the same rules as :func:`replace_folder`; ``work`` is left in place on refusal."""
    directory = real_path(directory)
    write_manifest(work, kind)
    make_shareable(work)
    old = None
    if directory.exists():
        check_replaceable(directory, overwrite)
        old = directory.parent / f".{directory.name}.old-{os.getpid()}"
        os.replace(directory, old)
    os.replace(work, directory)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return directory
