"""Small file helpers shared by training, evaluation and the experiment runner."""

from __future__ import annotations

import os


def write_atomic(path: str, text: str) -> None:
    """Writes text to a temporary file beside `path` and renames it into place.

    A reader (or a resumed run) sees the old file or the whole new one, never a
    half-written one; a write that fails leaves no temporary file behind.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_dir_arg(flag: str, path: str) -> None:
    """A directory flag must not name an existing file (checked before any work)."""
    if path and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file: expected a directory (or a path that "
                         "does not exist yet)")
