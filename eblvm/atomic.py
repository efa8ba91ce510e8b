"""Atomic file writes: a file eblvm writes is either the old one or the complete new one, never half of it.

Every result a run or a study leaves behind (checkpoints, ``summary.json``, ``metrics.json``, tables, figures) is
written to a hidden temporary file beside its target, flushed to disk and renamed over the target. A run killed
mid-write, or a disk that fills up, leaves the previous file intact and no partial one.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder created) to write to; when the block ends without an
    error, the temporary file is flushed to disk and renamed over ``path``, and on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own for each writer (processes, ranks and hosts on a shared folder may write the same target),
    # left for the writer to create, so the file gets the usual permissions (mkstemp's would be owner-only)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(8)}.partial")
    try:
        yield partial
        with open(partial, "rb") as file:
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def opened(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """A file opened in ``mode`` (``open``'s ``kwargs``, e.g. ``newline``) that replaces ``path`` when the block
    ends without an error (``replacing``): for writers that take a file object."""
    with replacing(path) as partial, partial.open(mode, **kwargs) as file:
        yield file


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with replacing(path) as partial:
        partial.write_text(text)
    return Path(path)


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` to ``path`` atomically as indented JSON with a final newline."""
    return write_text(path, json.dumps(value, indent=2) + "\n")
