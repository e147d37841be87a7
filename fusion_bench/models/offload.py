"""A module's weights parked on disk while other work needs the memory: the pretrained encoder during a fine-tune.

A fine-tune trains a copy of the encoder, so the encoder itself (theta_0) only waits: on ViT-L/14 that is 1.13 GiB
of the 8 GiB peak. `parked(module, folder)` writes its CPU tensors to one safetensors file, frees their memory by
resizing their storages to nothing (as FSDP frees parameters: every tensor and view of them stays valid, e.g. the
family's theta_0 views), and on leaving, also on an error, reads them back bit for bit and deletes the file.
"""

from __future__ import annotations

import ctypes
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from fusion_bench.store import atomic_save_safetensors

log = logging.getLogger(__name__)


def _parkable(module: nn.Module, keep: nn.Module | None) -> dict[str, torch.Tensor]:
    """The module's tensors that own their storage whole, on CPU and resizable, and that `keep` does not share."""
    shared = set() if keep is None else {t.untyped_storage().data_ptr()
                                         for t in [*keep.parameters(), *keep.buffers()]}
    out, seen = {}, set()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if (t.device.type != "cpu" or ptr in seen or ptr in shared or not s.resizable() or t.storage_offset()
                or s.nbytes() != t.numel() * t.element_size() or not t.is_contiguous() or s.nbytes() == 0):
            continue
        seen.add(ptr)
        out[name] = t
    return out


@contextmanager
def parked(module: nn.Module, folder: Path, keep: nn.Module | None = None) -> Iterator[int]:
    """Inside the block the module's weights are on disk (`folder/parked.safetensors`) and take no memory; yields
    the bytes freed. Tensors that `keep` shares (it must go on working) and ones that are views of a larger storage
    stay where they are. The module must not be used inside the block."""
    tensors = _parkable(module, keep)
    if not tensors:
        yield 0
        return
    path = Path(folder) / "parked.safetensors"
    atomic_save_safetensors({k: t.detach() for k, t in tensors.items()}, path)
    sizes = {k: t.untyped_storage().nbytes() for k, t in tensors.items()}
    for t in tensors.values():
        t.untyped_storage().resize_(0)
    try:
        yield sum(sizes.values())
    finally:
        for k, t in tensors.items():
            t.untyped_storage().resize_(sizes[k])
        _read_into(path, tensors)
        path.unlink()
        log.debug("restored %d parked tensors (%.2f GiB) from %s", len(tensors), sum(sizes.values()) / 2**30, path)


def _read_into(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Read a safetensors file's bytes straight into the tensors' memory with plain reads: a memory map (safe_open)
    would add the whole file to the resident set until it is closed, at the moment the weights come back."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header, base = json.loads(f.read(n)), 8 + n
        for k, t in tensors.items():
            entry = header[k]
            start, end = entry["data_offsets"]
            if entry["shape"] != list(t.shape) or end - start != t.numel() * t.element_size():
                raise OSError(f"{path}: {k!r} does not match the parked tensor {tuple(t.shape)}")
            f.seek(base + start)
            into = memoryview((ctypes.c_char * (end - start)).from_address(t.data_ptr())).cast("B")
            if f.readinto(into) != end - start:
                raise OSError(f"{path}: {k!r} is truncated")
