"""Atomic writes: a file or directory appears complete under its final name, or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError


def ensure_empty_output_dir(path: str | os.PathLike, *, overwrite: bool, what: str = "output") -> Path:
    """Refuse a non-empty output directory unless ``overwrite`` (nothing is deleted before success)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} path {p} exists and is not a directory", hint="choose another path")
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise UserError(
            f"{what} directory {p} is not empty",
            hint="choose an empty or new directory, or pass --overwrite (the old contents are replaced "
            "only once the new ones are complete)",
        )
    return p


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``final``.

    On an exception the temporary directory is removed and ``final`` is untouched. With
    ``overwrite`` an existing ``final`` is moved aside first and deleted only after the rename.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like a normal mkdir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        if not overwrite and any(final.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"output directory {final} is not empty", hint="pass --overwrite or pick a new path")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
