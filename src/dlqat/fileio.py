"""Writing files without losing any: every file and folder dlqat writes goes through here.

Files are written to a temporary sibling, flushed to disk and renamed over the target, so a killed or
failed write (disk full) leaves the old file as it was and no temporary file behind. Folders are
built in a temporary sibling and swapped in; an existing target is replaced only when it is one of
ours (``is_ours``) and the caller says so, never emptied by a blanket delete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class RefusedError(ValueError):
    """A write that would destroy files dlqat did not create, or that the user did not allow."""


def _remove_quietly(path: Path) -> None:
    try:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    except FileNotFoundError:
        pass


def _describe(err: OSError, path: Path) -> OSError:
    if err.errno == errno.ENOSPC:
        return OSError(err.errno, f"{path}: no space left on the device; nothing was changed there")
    return err


def _plain_mode(folder: bool) -> int:
    """The permissions ``open``/``mkdir`` would give under the process's umask. ``mkstemp``/``mkdtemp`` make
    their files 0600 and folders 0700, and a rename keeps that: results, checkpoints and exports would be
    readable by their owner only (not by a serving user or a shared group)."""
    return (0o777 if folder else 0o666) & ~process_umask()


def process_umask() -> int:
    """The umask, read without changing it where the kernel shows it (Linux >= 4.7): setting it to read
    it back, the only portable way, briefly gives every other thread's new files the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary sibling of ``path``, fsync it, rename it over ``path``.
    The file gets the replaced file's permissions, or a new file's under the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    with _removed_on_failure(tmp, path):
        write(tmp)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.is_file() else _plain_mode(folder=False))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


@contextmanager
def _removed_on_failure(tmp: Path, target: Path) -> Iterator[None]:
    """Delete the temporary ``tmp`` if the block fails; an OSError is re-raised naming ``target``."""
    try:
        yield
    except OSError as err:
        _remove_quietly(tmp)
        raise _describe(err, target) from err
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: object) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_folder(target: str | Path, is_ours: Callable[[Path], bool], overwrite: bool, what: str) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; on success it becomes ``target``.

    An existing ``target`` is replaced only if it is empty, or if ``is_ours(target)`` (a folder this
    tool wrote, e.g. a previous export) and ``overwrite``; anything else is refused *before* any work,
    naming the folder. The old folder is moved aside first and deleted only after the new one is in
    place, so a failure at any point leaves one complete folder.
    """
    target = Path(target)
    check_folder_target(target, is_ours, overwrite, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    with _removed_on_failure(tmp, target):
        os.chmod(tmp, _plain_mode(folder=True))
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
            return
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.replace(target, old / "content")  # a rename: nothing is deleted yet
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old / "content", target)  # put the previous folder back
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)


def check_folder_target(target: Path, is_ours: Callable[[Path], bool], overwrite: bool, what: str) -> None:
    """Raise ``RefusedError`` unless ``target`` may become a new ``what`` folder."""
    if not target.exists():
        return
    if not target.is_dir() or target.is_symlink():
        raise RefusedError(f"{target}: exists and is not a folder; choose another output path for the {what}")
    if not any(target.iterdir()):
        return
    if not is_ours(target):
        raise RefusedError(
            f"{target}: folder is not empty and is not a {what} written by dlqat; refusing to replace it "
            "(choose a new or empty folder)"
        )
    if not overwrite:
        raise RefusedError(f"{target}: holds a {what} already; pass --overwrite to replace it, or choose another path")


def check_file_target(target: Path, is_ours: Callable[[Path], bool], overwrite: bool, what: str) -> None:
    """Raise ``RefusedError`` unless ``target`` may be (re)written as a ``what`` file."""
    if not target.exists():
        return
    if target.is_dir():
        raise RefusedError(f"{target}: is a folder; the {what} is one file: give a file path")
    if not is_ours(target):
        raise RefusedError(f"{target}: exists and is not a {what}; refusing to overwrite it (choose another path)")
    if not overwrite:
        raise RefusedError(f"{target}: exists; pass --overwrite to replace it, or choose another path")


def safetensors_producer(path: Path) -> str | None:
    """The ``producer`` metadata of ``path/model.safetensors`` (how exports recognise their own folders)."""
    try:
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", "pt") as f:
            return (f.metadata() or {}).get("producer")
    except Exception:  # noqa: BLE001 - an unreadable or foreign folder is simply not ours
        return None
