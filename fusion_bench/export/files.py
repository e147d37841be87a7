"""Writes that never overwrite and never leave half a result: a temp file or folder next to the target, renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fusion_bench.store import atomic_write, disk_full_error


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists: outputs are never overwritten (every run writes into a new run "
                              "directory; remove it or choose another)")


def new_file(path: str | Path, write: Callable[[str], object]) -> Path:
    """write(tmp) then rename onto `path`, which must not exist."""
    path = Path(path)
    _refuse_existing(path)
    return atomic_write(path, write)


def new_dir(path: str | Path, write: Callable[[Path], object]) -> Path:
    """write(tmp_dir) then rename the folder onto `path`, which must not exist: a crash leaves no partial folder (a
    full disk: a DiskFullError naming `path`)."""
    path = Path(path)
    _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder the permissions mkdir would
        _refuse_existing(path)
        os.rename(tmp, path)
    except Exception as e:
        full = disk_full_error(e, path)
        if full is not None:
            raise full from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
