"""Opening files a user named: only regular files.

A FIFO named as config.json or a shard would block `open` forever, and a directory or a device is no
checkpoint file either. Symlinks are followed first (os.stat), so a Hugging Face cache snapshot, whose files
are links into ../../blobs/, reads like any other directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from glmjax.errors import GlmjaxError


def regular_file(path: str | Path, error: type[GlmjaxError]) -> Path:
    """`path` if it names a regular file (after following symlinks), else `error` naming it."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as e:
        raise error(f"{path}: cannot stat ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device or socket")
        raise error(f"{path}: not a regular file ({kind})")
    return path


def open_regular(path: str | Path, error: type[GlmjaxError]) -> BinaryIO:
    """Opens a regular file for binary reading; anything else, or an unreadable file, raises `error`."""
    path = regular_file(path, error)
    try:
        return open(path, "rb")
    except OSError as e:
        raise error(f"{path}: cannot open ({e.strerror})") from None


def read_text(path: str | Path, error: type[GlmjaxError]) -> str:
    """The UTF-8 text of a regular file; anything else, or undecodable bytes, raises `error`."""
    with open_regular(path, error) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
