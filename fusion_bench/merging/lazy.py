"""A read-only, lazy ``Mapping[str, Tensor]`` over one safetensors file.

Merging streams over checkpoints key by key, so a merge never needs a whole model in memory.
``LazyStateDict`` reads the header once (keys, shapes, dtypes) and returns one tensor per
``__getitem__``.  With safetensors >= 0.4 the returned tensor is a copy-on-write view of a private
``mmap`` of the file: reading it costs no copy and writing to it never touches the file.

Resident memory: pages of a mapping that have been read stay resident (and count in RSS) while
the mapping lives.  The open handle is therefore replaced after every ``remap_bytes`` handed out
(default 32 MiB): a file contributes at most about ``remap_bytes`` + the tensors still held,
not the whole file, while opening the file once per tensor (0.2 ms each, ~2x the read cost of a
merge pass) is avoided.  Tensors already returned keep their own mapping alive until dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import torch
from safetensors import safe_open

# safetensors header dtype strings -> torch dtypes (those torch can hold).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


class LazyStateDict(Mapping[str, torch.Tensor]):
    """``Mapping[str, Tensor]`` reading tensors one at a time from a safetensors file.

    >>> sd = LazyStateDict("model.safetensors")
    >>> sd.shape("proj"), sd.dtype("proj")   # from the header, nothing loaded
    >>> w = sd["proj"]                        # loads (maps) just this tensor

    ``path`` is kept for error messages.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"safetensors checkpoint not found: {self.path}")
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        try:
            with safe_open(self.path, framework="pt") as f:
                self.metadata: dict[str, str] = dict(f.metadata() or {})
                # storage order (sequential reads on a cold page cache); keys() is sorted by name
                names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
                for key in names:
                    sl = f.get_slice(key)
                    shapes[key] = tuple(sl.get_shape())
                    dtypes[key] = sl.get_dtype()
        except Exception as e:  # safetensors raises its own SafetensorError
            raise ValueError(f"cannot read safetensors header of {self.path}: {e}") from e
        self._shapes = shapes
        self._dtypes = dtypes
        self._handle = None
        self._mapped = 0

    #: bytes handed out through one mapping before it is replaced (bounds this file's share of RSS)
    remap_bytes: int = 32 << 20

    # Mapping protocol -------------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(f"{key!r} not in {self.path}")
        if self._handle is None or self._mapped >= self.remap_bytes:
            self._handle = None  # drop the old mapping (live tensors keep theirs)
            self._handle = safe_open(self.path, framework="pt")
            self._mapped = 0
        tensor = self._handle.get_tensor(key)
        self._mapped += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        """Release the cached file mapping (it is also replaced/recreated automatically)."""
        self._handle = None
        self._mapped = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"], state["_mapped"] = None, 0  # mappings do not pickle
        return state

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def __repr__(self) -> str:
        return f"LazyStateDict({self.path!r}, {len(self)} tensors)"

    # header-only queries ----------------------------------------------------------------------
    def shape(self, key: str) -> torch.Size:
        """Shape of ``key`` read from the header (nothing is loaded)."""
        return torch.Size(self._shapes[key])

    def dtype(self, key: str) -> torch.dtype:
        """torch dtype of ``key`` read from the header (nothing is loaded)."""
        name = self._dtypes[key]
        if name not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {name}, which torch cannot load")
        return _DTYPES[name]

    def numel(self, key: str) -> int:
        n = 1
        for s in self._shapes[key]:
            n *= s
        return n
