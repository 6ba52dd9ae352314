"""The run directory: atomic writes, atomic stage-output swaps, and a run lock.

A reader must never see a half-written file or a half-built stage folder as if it
were complete: files go to a temporary name in the same folder and are renamed;
stage folders are built under a temporary name and swapped in whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are for every reader of the run
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed file, or None when it is missing or unreadable (never half-read)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def new_temp_dir(final: Path) -> Path:
    """A fresh sibling folder to build `final` in (same filesystem, so rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def swap_in_dir(tmp: Path, final: Path) -> None:
    """Replace `final` with the finished `tmp`. A crash in between leaves `final` absent,
    which reads as 'not complete' (never as a mix of old and new)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}{OLD_MARK}{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(final: Path) -> int:
    """Remove temp/old folders a killed process left beside `final`; returns how many."""
    n = 0
    if not final.parent.is_dir():
        return 0
    for mark in (TMP_MARK, OLD_MARK):
        for p in final.parent.glob(f".{final.name}{mark}*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
    return n


class RunLocked(RuntimeError):
    pass


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One `damoc select` per run directory at a time (advisory lock, freed if the process dies)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".lock", "w")  # noqa: SIM115 - held for the block
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLocked(f"{run_dir} is in use by another damoc process") from None
            raise
        yield
    finally:
        fh.close()


def check_writable(run_dir: Path) -> None:
    """Fail early, with the path named, when the run directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"run directory {run_dir} is not writable: {exc.strerror or exc}") from None
