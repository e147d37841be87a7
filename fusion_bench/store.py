"""Checkpoint store: fine-tuned weights as safetensors, keyed by everything that determines them.

Writes are atomic (temp file + rename); loads are safe (safetensors, never pickle) and checked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fusion_bench.errors import DiskFullError


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit what it is used for."""


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path) then rename onto path: a crash leaves any earlier file intact. A full disk is a
    DiskFullError naming `path` (the temporary file is removed: nothing partial stays)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise disk_full_error(e, path) or e
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions a plain open() would
        os.replace(tmp, path)
    except Exception as e:
        full = disk_full_error(e, path)
        if full is not None:
            raise full from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


FULL_WORDS = ("no space left on device", "os error 28", "disk quota exceeded")
NEARLY_FULL = 1 << 20  # bytes free below which a failed write is taken for a full disk


def disk_full_error(error: BaseException, path: str | Path) -> DiskFullError | None:
    """A DiskFullError naming `path` when the failed write of `path` ran out of space: ENOSPC or EDQUOT in the
    error's chain, the words safetensors uses for them, or, for an error without an errno (torch's zip writer says
    only "unexpected pos"), less than 1 MiB left on the device; None otherwise (another errno: read-only, ...)."""
    seen: BaseException | None = error
    for _ in range(8):  # the error, its cause, their causes
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            break
        if any(w in str(seen).lower() for w in FULL_WORDS):
            break
        if isinstance(seen, OSError) and seen.errno is not None:  # another known cause: read-only, permissions, ...
            return None
        seen = seen.__cause__ or seen.__context__
    else:
        seen = None
    if seen is None:
        try:
            if shutil.disk_usage(Path(path).parent).free >= NEARLY_FULL:
                return None
        except OSError:
            return None
    return DiskFullError(f"no space left on device while writing {path}: free some space there (or point paths.root "
                         f"or paths.store at another disk) and re-run; nothing partial was kept")


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_safetensors(state: Mapping[str, torch.Tensor], path, metadata: dict[str, str] | None = None):
    state = {k: v.detach().contiguous() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load_safetensors(path: str | Path, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Load a safetensors file, naming the file (and the key) in every error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"corrupted or truncated checkpoint {path}: {e}. Delete it and re-run.") from e
    if check_finite:
        for k, v in state.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise CheckpointError(f"checkpoint {path}: tensor {k!r} contains NaN or Inf")
    return state


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def config_hash(fields: Mapping) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


class CheckpointStore:
    """root/<model>/<mode>/<task>/seed<seed>-<hash of everything else>.safetensors"""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, model: str, mode: str, task: str, seed: int, hparams: Mapping) -> Path:
        h = config_hash({"model": model, "mode": mode, "task": task, "seed": seed, **hparams})
        return self.root / model / mode / task / f"seed{seed}-{h}.safetensors"

    @staticmethod
    def head_path(path: Path) -> Path:
        """Where the head trained with a fine-tune is kept (finetune.train_head): next to it, never merged."""
        return path.with_name(f"{path.stem}.head.safetensors")

    def save(self, path: Path, state: Mapping[str, torch.Tensor], meta: Mapping) -> Path:
        return atomic_save_safetensors(state, path, metadata={"fusion_bench": json.dumps(dict(meta), default=str)})

    def load(self, path: Path, expected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Load a stored fine-tune; with `expected`, check it has exactly those keys and shapes."""
        state = load_safetensors(path)
        if expected is not None:
            _check_fits(path, {k: tuple(v.shape) for k, v in state.items()}, expected)
        return state

    def open(self, path: Path, expected: Mapping[str, torch.Tensor] | None = None):
        """A stored fine-tune as a LazyStateDict (one tensor in memory at a time), checked as `load` checks it:
        keys and shapes from the header, then every tensor read once for NaN / Inf and dropped."""
        from fusion_bench.merging.lazy import LazyStateDict

        try:
            lazy = LazyStateDict(path)
        except (ValueError, FileNotFoundError) as e:
            raise CheckpointError(f"corrupted or truncated checkpoint {path}: {e}. Delete it and re-run.") from e
        if expected is not None:
            _check_fits(path, {k: tuple(lazy.shape(k)) for k in lazy}, expected)
        for k in lazy:
            try:
                v = lazy[k]
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"corrupted or truncated checkpoint {path} ({k!r}): {e}. Delete it and "
                                      f"re-run.") from e
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise CheckpointError(f"checkpoint {path}: tensor {k!r} contains NaN or Inf")
        return lazy


def _check_fits(path: Path, shapes: Mapping[str, tuple], expected: Mapping[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        raise CheckpointError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in shapes.items():
        if shape != tuple(expected[k].shape):
            raise CheckpointError(f"checkpoint {path}: {k!r} has shape {shape}, model expects "
                                  f"{tuple(expected[k].shape)}")
