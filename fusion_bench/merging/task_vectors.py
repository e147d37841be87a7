"""Shared task-vector machinery: validation, streaming passes, exact top-k thresholds.

Every method works on task vectors ``tau_t = finetuned[t] - pretrained`` of the *floating* keys.
Non-floating tensors (integer / bool buffers) are copied from the pretrained checkpoint.

Streaming model
---------------
Inputs are ``Mapping[str, Tensor]``: plain dicts or :class:`~fusion_bench.merging.lazy.LazyStateDict`.
A *keys-outer* pass (:func:`stream_merge`, :func:`stream_blocks`) visits one key at a time, loads
that key from every checkpoint (one tensor per model held at once) and processes it in column
chunks of ``chunk`` entries: the ``(n_tasks, chunk)`` fp32 block of task vectors lives in a reused
workspace that fits in cache, so the only large allocations are the merged outputs.
A *task-outer* pass (:func:`fill_abs_task_vector`) writes one task's ``|tau|`` over all float keys
into one flat fp32 buffer (``4 * n_params`` bytes), used for the exact global top-k threshold.

All arithmetic is fp32 (bf16 / fp16 inputs are upcast exactly); outputs are cast back to the
pretrained dtype.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from rich.progress import track
from torch import Tensor

from .lazy import LazyStateDict

StateDict = Mapping[str, Tensor]

#: entries per column chunk in keys-outer passes (n_tasks x CHUNK fp32 block stays in cache)
CHUNK = 1 << 16


# --------------------------------------------------------------------------------------------
# inputs and validation
# --------------------------------------------------------------------------------------------
def source_name(mapping: StateDict, default: str) -> str:
    """File path for a LazyStateDict (or anything with ``.path``), else ``default``."""
    path = getattr(mapping, "path", None)
    return str(path) if path is not None else default


def _shape(mapping: StateDict, key: str) -> torch.Size:
    if isinstance(mapping, LazyStateDict):
        return mapping.shape(key)
    return mapping[key].shape


def _dtype(mapping: StateDict, key: str) -> torch.dtype:
    if isinstance(mapping, LazyStateDict):
        return mapping.dtype(key)
    return mapping[key].dtype


@dataclass
class MergeInputs:
    """Validated inputs of a merge (see :func:`prepare`)."""

    pretrained: StateDict
    finetuned: list[StateDict]
    names: list[str]  # one per finetuned checkpoint, for messages
    keys: list[str]  # all keys, pretrained order
    float_keys: list[str]
    shapes: dict[str, torch.Size]
    dtypes: dict[str, torch.dtype]  # pretrained dtypes = output dtypes
    numels: dict[str, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.finetuned)

    @property
    def n_float(self) -> int:
        """Total number of entries of the flattened task vector (all float keys)."""
        return sum(self.numels[k] for k in self.float_keys)


def prepare(pretrained: StateDict, finetuned: Sequence[StateDict], method: str = "merge") -> MergeInputs:
    """Check keys and shapes of every finetuned checkpoint against the pretrained one.

    Raises ``ValueError`` naming the key and the file (``LazyStateDict.path`` when available,
    else ``finetuned[i]``) for a missing / unexpected key or a shape mismatch, and for an empty
    ``finetuned`` list.  Uses safetensors headers only: nothing is loaded.
    """
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence):
        raise TypeError(
            f"{method}: `finetuned` must be a sequence of state dicts (one per task), got {type(finetuned)}"
        )
    finetuned = list(finetuned)
    if not finetuned:
        raise ValueError(f"{method}: no finetuned checkpoints given; pass at least one task's state dict")
    pname = source_name(pretrained, "pretrained")
    names = [source_name(ft, f"finetuned[{i}]") for i, ft in enumerate(finetuned)]
    keys = list(pretrained.keys())
    if not keys:
        raise ValueError(f"{method}: pretrained state dict {pname} is empty")
    key_set = set(keys)
    shapes = {k: torch.Size(_shape(pretrained, k)) for k in keys}
    dtypes = {k: _dtype(pretrained, k) for k in keys}
    for ft, name in zip(finetuned, names):
        ft_keys = set(ft.keys())
        missing = [k for k in keys if k not in ft_keys]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(
                f"{method}: key {missing[0]!r}{more} of the pretrained checkpoint {pname} is missing "
                f"from {name}; all checkpoints must come from the same architecture"
            )
        extra = [k for k in ft if k not in key_set]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise ValueError(
                f"{method}: key {extra[0]!r}{more} in {name} does not exist in the pretrained "
                f"checkpoint {pname}; all checkpoints must come from the same architecture"
            )
        for k in keys:
            s = torch.Size(_shape(ft, k))
            if s != shapes[k]:
                raise ValueError(
                    f"{method}: key {k!r} has shape {tuple(s)} in {name} but {tuple(shapes[k])} in the "
                    f"pretrained checkpoint {pname}"
                )
            if dtypes[k].is_floating_point and not _dtype(ft, k).is_floating_point:
                raise ValueError(
                    f"{method}: key {k!r} is {_dtype(ft, k)} in {name} but {dtypes[k]} in the "
                    f"pretrained checkpoint {pname}"
                )
    float_keys = [k for k in keys if dtypes[k].is_floating_point]
    numels = {k: math.prod(shapes[k]) for k in keys}
    return MergeInputs(pretrained, finetuned, names, keys, float_keys, shapes, dtypes, numels)


def statistic_keys(inp: MergeInputs, stats: Sequence[Mapping[str, Tensor]], method: str, what: str) -> list[str]:
    """The keys of per-task statistics (RegMean's Grams, Fishers): one mapping per fine-tune, every key in all of
    them, each a floating weight of the model. Returns the keys in first-seen order."""
    if isinstance(stats, Mapping) or len(stats) != inp.n:
        got = "one mapping" if isinstance(stats, Mapping) else f"{len(stats)}"
        raise ValueError(f"{method}: need one {what} mapping per finetuned checkpoint ({inp.n}), got {got}")
    keys = list(dict.fromkeys(k for st in stats for k in st))
    for key in keys:
        missing = [inp.names[t] for t, st in enumerate(stats) if key not in st]
        if missing:
            raise ValueError(f"{method}: key {key!r} has a {what} for some tasks but not for {missing[0]}; compute "
                             "the statistics of every task with the same keys")
        if key not in inp.dtypes or not inp.dtypes[key].is_floating_point:
            raise ValueError(f"{method}: a {what} was given for {key!r}, which is not a float weight")
    return keys


def scaling_coefs(scaling_coef: float | Sequence[float], n: int, method: str) -> list[float]:
    """One float per task from a float or a list (length must be ``n``)."""
    if isinstance(scaling_coef, str):
        raise TypeError(
            f"{method}: scaling_coef={scaling_coef!r} is a string; the pipeline must replace it with a number"
        )
    if isinstance(scaling_coef, Tensor):
        scaling_coef = scaling_coef.tolist()
    if is_number(scaling_coef):
        return [float(scaling_coef)] * n
    coefs = [float(c) for c in scaling_coef]
    if len(coefs) != n:
        raise ValueError(
            f"{method}: scaling_coef has {len(coefs)} values but {n} task vectors were given; "
            f"expected one float or a list of {n} floats"
        )
    return coefs


def is_number(x: object) -> bool:
    """A real number (python, numpy or 0-d tensor), not a bool."""
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.dtype.is_complex and x.dtype != torch.bool
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def scalar_coef(scaling_coef: float, method: str) -> float:
    if not is_number(scaling_coef):
        raise TypeError(f"{method}: scaling_coef must be one float, got {scaling_coef!r}")
    return float(scaling_coef)


# --------------------------------------------------------------------------------------------
# workspace and loading
# --------------------------------------------------------------------------------------------
class Workspace:
    """Named, reused scratch buffers (fresh large allocations cost page faults)."""

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype)
            self._bufs[name] = buf
        return buf[:numel]

    def block(self, name: str, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.get(name, rows * cols, dtype).view(rows, cols)


def flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def as_fp32(x: Tensor, ws: Workspace | None = None, name: str = "fp32") -> Tensor:
    """``x`` as fp32 (no copy when already fp32; into a workspace buffer when given)."""
    if x.dtype == torch.float32:
        return x
    if ws is None:
        return x.float()
    return ws.get(name, x.numel()).view(x.shape).copy_(x)


def chunks(numel: int, chunk: int | None):
    """``(start, end)`` column ranges; ``chunk=None`` means the whole key."""
    step = numel if not chunk else chunk
    for s in range(0, numel, max(step, 1)):
        yield s, min(s + step, numel)


class Transform:
    """Changes task vectors in flight (DARE drop, AWD subtraction of delta).

    ``row`` modifies one task's fp32 chunk ``x`` (entries ``start:end`` of ``key``) in place;
    ``block`` modifies the ``(n, end - start)`` block of all tasks (default: row by row).
    """

    def row(self, t: int, key: str, numel: int, start: int, end: int, x: Tensor) -> None:
        raise NotImplementedError

    def block(self, X: Tensor, key: str, numel: int, start: int, end: int) -> None:
        for t in range(X.shape[0]):
            self.row(t, key, numel, start, end, X[t])

    #: True when ``row`` needs the whole key (``start == 0, end == numel``) at once
    whole_keys: bool = False


# --------------------------------------------------------------------------------------------
# passes
# --------------------------------------------------------------------------------------------
PROGRESS_MIN_NUMEL = 10_000_000  # a progress bar for merges of models this size and up


def stream_blocks(
    inp: MergeInputs,
    visit: Callable[[Tensor, str, int, int, Tensor], None],
    transform: Transform | None = None,
    chunk: int | None | str = "auto",
) -> None:
    """Keys-outer pass: call ``visit(X, key, start, end, pre32)`` for every chunk of every float key.

    ``X`` is the ``(n, end-start)`` fp32 block of (transformed) task vectors, ``pre32`` the fp32
    pretrained chunk; both are workspace views valid only during the call.
    ``chunk="auto"`` uses the module's ``CHUNK``; ``None`` processes whole keys (per-tensor
    thresholds need them).
    """
    if chunk == "auto":
        chunk = CHUNK
    ws = Workspace()
    if transform is not None and transform.whole_keys:
        chunk = None
    n = inp.n
    big = sum(inp.numels[k] for k in inp.float_keys) >= PROGRESS_MIN_NUMEL
    for key in track(inp.float_keys, description="merging tensors", transient=True, disable=not big):
        numel = inp.numels[key]
        if numel == 0:
            continue
        pre = flat(inp.pretrained[key])
        fts = [flat(ft[key]) for ft in inp.finetuned]
        for s, e in chunks(numel, chunk):
            c = e - s
            p32 = as_fp32(pre[s:e], ws, "pre")
            X = ws.block("X", n, c)
            for t, ft in enumerate(fts):
                torch.sub(ft[s:e], p32, out=X[t])
            if transform is not None:
                transform.block(X, key, numel, s, e)
            visit(X, key, s, e, p32)
        del pre, fts


def stream_merge(
    inp: MergeInputs,
    combine: Callable[[Tensor, str, int, int, Workspace], Tensor],
    transform: Transform | None = None,
    chunk: int | None | str = "auto",
) -> dict[str, Tensor]:
    """Keys-outer merge pass: ``merged[key] = pretrained[key] + combine(X, key, start, end, ws)``.

    ``combine`` maps the ``(n, c)`` fp32 task-vector block to the fp32 merged update (already
    scaled).  Non-float keys are cloned from the pretrained checkpoint.  Output dtype = pretrained dtype.
    """
    out: dict[str, Tensor] = {}
    ws = Workspace()
    outs_flat: dict[str, Tensor] = {}
    for key in inp.float_keys:
        o = torch.empty(inp.shapes[key], dtype=inp.dtypes[key])
        out[key] = o
        outs_flat[key] = o.view(-1)

    def visit(X: Tensor, key: str, s: int, e: int, p32: Tensor) -> None:
        upd = combine(X, key, s, e, ws)
        o = outs_flat[key][s:e]
        if o.dtype == torch.float32:
            torch.add(p32, upd, out=o)
        else:
            o.copy_(torch.add(p32, upd, out=ws.get("sum", e - s)))

    stream_blocks(inp, visit, transform, chunk)
    return finish(inp, out)


def finish(inp: MergeInputs, merged_float: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add non-float tensors (cloned from pretrained) and return in pretrained key order."""
    result: dict[str, Tensor] = {}
    for key in inp.keys:
        if key in merged_float:
            result[key] = merged_float[key]
        else:
            result[key] = inp.pretrained[key].clone()
    return result


def fill_abs_task_vector(inp: MergeInputs, t: int, buf: Tensor, transform: Transform | None = None) -> Tensor:
    """Task-outer pass: write ``|tau_t|`` (all float keys, pretrained order, transformed) into ``buf``."""
    ws = Workspace()
    off = 0
    ft_map = inp.finetuned[t]
    for key in inp.float_keys:
        numel = inp.numels[key]
        if numel == 0:
            continue
        x = buf[off : off + numel]
        pre = flat(inp.pretrained[key])
        torch.sub(flat(ft_map[key]), as_fp32(pre, ws, "pre"), out=x)
        if transform is not None:
            transform.row(t, key, numel, 0, numel, x)
        x.abs_()
        off += numel
    return buf[:off]


def flat_task_vectors(inp: MergeInputs, dtype: torch.dtype = torch.float32) -> Tensor:
    """All task vectors as one ``(n, n_float)`` matrix (for references and full-space optimisers)."""
    T = torch.empty(inp.n, inp.n_float, dtype=dtype)
    off = 0
    for key in inp.float_keys:
        m = inp.numels[key]
        pre = flat(inp.pretrained[key]).to(torch.float32)
        for t, ft in enumerate(inp.finetuned):
            T[t, off : off + m] = flat(ft[key]).to(torch.float32) - pre
        off += m
    return T


def unflatten(inp: MergeInputs, vec: Tensor) -> dict[str, Tensor]:
    """Split a flat vector over the float keys into per-key flat views."""
    out, off = {}, 0
    for key in inp.float_keys:
        m = inp.numels[key]
        out[key] = vec[off : off + m]
        off += m
    return out


# --------------------------------------------------------------------------------------------
# exact k-th largest (radix select on the float bit pattern)
# --------------------------------------------------------------------------------------------
_HI = 1 << 15  # non-negative fp32 bit patterns >> 16 lie in [0, 2**15)
_LO = 1 << 16


def kth_largest(values: Tensor, m: int, chunk: int = 1 << 22) -> float:
    """Exact ``m``-th largest entry of a flat fp32 tensor of non-negative values (``1 <= m``).

    Non-negative IEEE floats order like their int32 bit patterns, so a two-level radix select
    (histogram of the top 16 bits, then of the low 16 bits inside the one bucket holding the
    answer) finds the exact value in two streaming passes, O(n), no sort, no copy of ``values``.
    Returns ``inf`` for ``m <= 0`` and the minimum for ``m >= numel``.
    """
    if values.dtype != torch.float32 or values.dim() != 1:
        raise TypeError("kth_largest expects a flat fp32 tensor")
    n = values.numel()
    if m <= 0 or n == 0:
        return math.inf
    m = min(m, n)
    bits = values.view(torch.int32)
    tmp = torch.empty(min(chunk, n), dtype=torch.int32)
    hist = torch.zeros(_HI, dtype=torch.int64)
    for s in range(0, n, chunk):
        c = bits[s : s + chunk]
        h = tmp[: c.numel()]
        torch.bitwise_right_shift(c, 16, out=h)
        hist += torch.bincount(h, minlength=_HI)[:_HI]
    b, r = _select_bucket(hist, m)
    hist2 = torch.zeros(_LO, dtype=torch.int64)
    eq = torch.empty(min(chunk, n), dtype=torch.bool)
    for s in range(0, n, chunk):
        c = bits[s : s + chunk]
        h = tmp[: c.numel()]
        torch.bitwise_right_shift(c, 16, out=h)
        msk = eq[: c.numel()]
        torch.eq(h, b, out=msk)
        sel = c[msk]
        if sel.numel():
            hist2 += torch.bincount(sel.bitwise_and_(0xFFFF), minlength=_LO)
    lo, _ = _select_bucket(hist2, r)
    return torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32).item()


def _select_bucket(hist: Tensor, m: int) -> tuple[int, int]:
    """Bucket holding the m-th largest, and the rank (from the top, 1-based) inside it."""
    cum = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(cum, torch.tensor([m], dtype=cum.dtype)).item())
    b = hist.numel() - 1 - idx
    above = int(cum[idx].item()) - int(hist[b].item())
    return b, m - above


def n_keep(k: float, numel: int) -> int:
    """Number of entries kept by a top-``k`` fraction (``int(k * numel)``, as in peft)."""
    return int(k * numel)


def shrink_lambda(threshold: float) -> float:
    """``lambd`` for ``hardshrink`` so that it keeps exactly ``|x| >= threshold``.

    ``hardshrink`` keeps ``|x| > lambd``; the largest fp32 below ``threshold`` turns that into
    ``>=``.  ``threshold == 0`` gives 0 (keep every non-zero; zeros never count anyway).
    """
    if threshold <= 0:
        return 0.0
    if math.isinf(threshold):
        return math.inf
    t = torch.tensor(threshold, dtype=torch.float32)
    return torch.nextafter(t, torch.zeros_like(t)).item()


# --------------------------------------------------------------------------------------------
# determinism helpers
# --------------------------------------------------------------------------------------------
def derived_seed(seed: int, t: int, key: str) -> int:
    """Stable 63-bit seed for (seed, task index, key), identical across processes and platforms."""
    h = hashlib.blake2b(f"{int(seed)}|{int(t)}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
