"""The path a database is opened by: what a user may pass, normalised once."""

from __future__ import annotations

import os


def database_path(path: str | os.PathLike[str]) -> str:
    """Normalise a user's path argument; reject what cannot be a durable file."""
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    if not text or text == ":memory:" or text.startswith("file:"):
        raise ValueError(f"path must name a database file, got {text!r}")
    # Refused here, before any file is created: SQLite takes a file name as
    # UTF-8 (a lone surrogate, as os.fsdecode makes of a non-UTF-8 byte,
    # cannot be opened: the lock file would be made, then the open fail),
    # and the OS takes neither a NUL nor a name its encoding cannot write.
    try:
        text.encode("utf-8")
        os.fsencode(text)
        if "\0" in text:
            raise ValueError
    except (UnicodeError, ValueError):
        raise ValueError(
            f"path {text!r} is not a file name SQLite can open (not valid UTF-8, or a NUL)"
        ) from None
    # "dir/" (or "dir/.") would be made a file named "dir" below; an
    # existing directory is no database: a mistake to say so about, not to
    # act on.
    if os.path.basename(text) in ("", ".", ".."):
        raise ValueError(f"path must name a database file, not a directory: {text!r}")
    # Absolute, so that a later chdir changes nothing; "." and empty parts
    # dropped, but ".." kept: after a symbolic link, "link/.." is the parent
    # of the link's target, not the directory the link is in, and
    # os.path.abspath (which drops "x/.." as text) would name another file
    # than the one the system opens. The lock and the side files go by the
    # fully resolved path (_lock.real_path); this is the name the system
    # checks its file by (Store.check_file) and shows in messages.
    absolute = text if os.path.isabs(text) else os.path.join(os.getcwd(), text)
    normal = os.sep + os.sep.join(p for p in absolute.split(os.sep) if p not in ("", "."))
    if os.path.isdir(normal):
        raise ValueError(f"path must name a database file, but {text!r} is a directory")
    return normal
