"""Replacing a checkpoint directory so that a crash at any point leaves the old checkpoint or the new one.

The new checkpoint is written complete into a hidden sibling directory, then swapped in by one rename. On
Linux the swap is `renameat2(RENAME_EXCHANGE)`: the target path names the old directory until it names the
new one, never nothing. Elsewhere (or on a filesystem without it) two renames are used; a process killed
between them leaves the old checkpoint at `.NAME.old-*` beside the target, and the loader's error for the
missing directory says so.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
from pathlib import Path

OLD_INFIX = ".old-"
SAVING_INFIX = ".saving-"


def new_sibling(target: Path, infix: str) -> Path:
    """A fresh hidden directory beside `target` (same filesystem, so a rename moves it without copying),
    with the permissions `target` has, or a new directory's (mkdtemp's 0700 would lock others out of a
    shared checkpoint once it is renamed into place)."""
    while True:
        path = target.parent / f".{target.name}{infix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            break
        except FileExistsError:
            continue
    if target.is_dir():
        shutil.copymode(target, path)
    return path


def fsync_path(path: Path) -> None:
    """Flushes a file's or a directory's contents to disk: a rename can reach the disk before the data it
    names, and a power cut then leaves a complete-looking checkpoint of garbage. Directories are flushed
    where the filesystem allows it (some network filesystems refuse)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Puts the complete directory `new` at `target`. If `target` existed, the old directory is left at
    `new` after an exchange, or removed after two renames; the caller removes `new` if it is still there."""
    if not target.exists():
        os.rename(new, target)
    elif not _exchange(new, target):
        old = new_sibling(target, OLD_INFIX)
        os.rename(target, old)  # onto the empty directory; a kill after this leaves the old checkpoint there
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        remove_tree(old)
    fsync_path(target.parent)


def interrupted_save_hint(target: Path) -> str:
    """For a missing checkpoint directory: where an interrupted two-rename swap left the old one, if it did."""
    olds = list(target.parent.glob(f".{target.name}{OLD_INFIX}*")) if target.parent.is_dir() else []
    if not olds:
        return ""
    return f" (an interrupted save left the previous checkpoint at {max(olds, key=lambda p: p.stat().st_mtime)})"


def remove_tree(path: Path) -> None:
    """Removes a staging or old directory; absent is fine (after a plain rename there is nothing left)."""
    shutil.rmtree(path, ignore_errors=True)
