r"""Shared machinery of the spectral data-free methods (TSV-M, Iso-C, Iso-CTS, WUDI).

Streaming
---------
:func:`merge_2d_keys` visits one float key at a time: it loads that key from every checkpoint
(``T`` tensors of one key at once, never all keys' task vectors), hands the fp32 task vectors of a
2-D key to the method and averages every other float key (``theta_0 + alpha * mean_t tau_t``).
Non-float keys are copied from the pretrained checkpoint; outputs are in the pretrained dtype.

Exact truncated SVD through the Gram matrix
-------------------------------------------
The methods need only the top singular triplets of ``rows x cols`` matrices (and the orthogonal
polar factor ``P Q^T`` of ``X = P Sigma Q^T``).  Both come exactly from the ``r x r`` Gram matrix
of the smaller side, ``r = min(rows, cols)``, formed and diagonalised in float64:

* ``rows >= cols``: ``X^T X = V diag(s^2) V^T`` (``torch.linalg.eigh``), ``U = X V diag(1/s)``;
* ``rows < cols``: ``X X^T = U diag(s^2) U^T``, ``V = X^T U diag(1/s)``;
* polar factor: ``P Q^T = X (X^T X)^{-1/2} = X W``, ``W = Q diag(1/sigma) Q^T``.

Why this is exact to float32 round-off: the float64 Gram of fp32 data has an absolute error of
about ``1e-16 s_1^2`` in each eigenvalue, so ``s_i`` is off by about ``1e-16 (s_1 / s_i)^2``
relative and a singular vector by ``1e-16 s_1^2 / (s_i^2 - s_j^2)``, against the
``6e-8 s_1 / (s_i - s_j)`` of an fp32 SVD itself: squaring the condition number costs nothing
at float32 resolution unless ``s_i / s_1 < ~1e-4``.  The results depend on the singular vectors
only through quantities invariant under rotations inside a cluster of equal singular values
(``polar(X R) = polar(X) R`` for orthogonal ``R``), so near-degenerate spectra are harmless too.

Numerically zero singular values
--------------------------------
A singular direction whose singular value is below ``max(rows, cols) * eps_fp32 * s_1`` (the
default tolerance of ``torch.linalg.matrix_rank`` for fp32 inputs) is not determined by fp32
data: ``torch.linalg.svd`` returns an arbitrary basis there (e.g. for rank-16 LoRA task vectors).
Such triplets are dropped (their ``u``, ``v`` set to zero); their singular values still count in
means.  Polar factors are the canonical partial isometry (zero on the numerical null space).
For full-rank inputs (every test and benchmark here, and full fine-tunes) nothing is dropped.

Threads
-------
MKL's ``eigh`` of a 768 x 768 float64 matrix takes 0.06 s on one thread but 0.13 s with two
(its tridiagonalisation is memory-bound and synchronises a lot), while two single-threaded
``eigh`` calls from two Python threads run concurrently: :func:`eigh_many` therefore runs the
eigendecompositions in a small thread pool (``torch.get_num_threads()`` workers, each started
while the process runs one thread, so each keeps one OpenMP / MKL thread; measured 0.06 s per
768 x 768 ``eigh`` in such a worker, 0.13 s in a worker started under two threads);
matrix products stay on torch's intra-op threads in the calling thread.  Methods with a single
``eigh`` per key (Iso-C, Iso-CTS's common space) hand :func:`merge_2d_keys` a continuation, so
that ``eigh`` runs while the next key is loaded and its Gram matrix formed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from rich.progress import track
from torch import Tensor

from .task_vectors import PROGRESS_MIN_NUMEL, MergeInputs, finish

log = logging.getLogger(__name__)

EPS32 = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------------------------
# eigendecompositions, truncated SVD, polar factors
# --------------------------------------------------------------------------------------------
def _eigh_desc(G: Tensor) -> tuple[Tensor, Tensor]:
    L, Q = torch.linalg.eigh(G)
    return L.flip(0), Q.flip(1)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    """The eigh pool for the current thread count, its threads single-threaded (module doc).

    A thread takes its OpenMP / MKL thread count from the process setting at its first use and
    keeps it: the pool's threads are started (one tiny ``eigh`` each, all at once behind a barrier
    so that each lands on its own thread) while ``torch.set_num_threads(1)``, which is then
    restored.  Once per process and thread count.
    """
    n = max(1, torch.get_num_threads())
    if n not in _POOLS:
        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fusion_bench-eigh")
        barrier = threading.Barrier(n)

        def start() -> None:
            barrier.wait(timeout=60)
            torch.linalg.eigh(torch.eye(2, dtype=torch.float64))

        torch.set_num_threads(1)
        try:
            for f in [pool.submit(start) for _ in range(n)]:
                f.result()
        finally:
            torch.set_num_threads(n)
        _POOLS[n] = pool
    return _POOLS[n]


def eigh_submit(mats: Sequence[Tensor]) -> list[Future]:
    """Start ``eigh`` of each symmetric matrix in the thread pool; each future gives ``(L, Q)``, L descending."""
    pool = _pool()
    return [pool.submit(_eigh_desc, G) for G in mats]


def eigh_many(mats: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``eigh`` of each symmetric matrix, eigenvalues DESCENDING, in the thread pool (module doc)."""
    return [f.result() for f in eigh_submit(mats)]


def gram(X: Tensor) -> Tensor:
    """Gram matrix of the smaller side: ``X^T X`` if ``rows >= cols`` else ``X X^T``."""
    return X.T @ X if X.shape[0] >= X.shape[1] else X @ X.T


def rank_tol(s1: float, shape: Sequence[int]) -> float:
    """Singular values at or below this are numerically zero (``matrix_rank``'s fp32 default)."""
    return max(shape) * EPS32 * s1


def eig_triplets(L: Tensor, Q: Tensor, k: int, shape: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """From ``eigh(gram(X))`` (``L`` descending) of an ``X`` of ``shape``: ``(s, Qk, inv)`` for the top ``k``.

    ``s`` the singular values, ``Qk`` the eigenvectors (zeroed where numerically zero, module doc),
    ``inv`` = ``1/s`` (0 there): the other side's vectors are ``X Qk * inv`` (or ``X^T Qk * inv``).
    """
    s = L[:k].clamp_min(0).sqrt()
    s1 = float(L[0].clamp_min(0).sqrt()) if L.numel() else 0.0
    valid = s > rank_tol(s1, shape) if s1 > 0 else torch.zeros_like(s, dtype=torch.bool)
    inv = torch.where(valid, 1.0 / torch.where(valid, s, 1.0), 0.0)
    return s, Q[:, :k] * valid, inv


def svd_from_gram(X: Tensor, L: Tensor, Q: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``k`` singular triplets ``(U (rows x k), s (k,), V (cols x k))`` of ``X`` from ``eigh(gram(X))``.

    ``L`` descending.  Numerically zero triplets get zero ``u`` and ``v`` (module doc); ``s`` keeps
    their (tiny) values.
    """
    s, Qk, inv = eig_triplets(L, Q, k, X.shape)
    if X.shape[0] >= X.shape[1]:
        return (X @ Qk) * inv, s, Qk
    return Qk, s, (X.T @ Qk) * inv


def inverse_sqrt_from_eigh(L: Tensor, Q: Tensor, shape: Sequence[int]) -> Tensor:
    """``W = Q diag(1/sigma) Q^T`` (``sigma = sqrt(L)``, numerically zero ones dropped): ``X W = polar(X)``."""
    sig = L.clamp_min(0).sqrt()
    smax = float(sig.max()) if sig.numel() else 0.0
    valid = sig > rank_tol(smax, shape) if smax > 0 else torch.zeros_like(sig, dtype=torch.bool)
    inv = torch.where(valid, 1.0 / torch.where(valid, sig, 1.0), 0.0)
    return (Q * inv) @ Q.T


def polar_pair(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Orthogonal polar factors of ``U`` (rows x K) and ``V`` (cols x K), both ``K <= rows, cols``."""
    (LU, QU), (LV, QV) = eigh_many([U.T @ U, V.T @ V])
    return U @ inverse_sqrt_from_eigh(LU, QU, U.shape), V @ inverse_sqrt_from_eigh(LV, QV, V.shape)


# --------------------------------------------------------------------------------------------
# streaming driver
# --------------------------------------------------------------------------------------------
Update = Tensor | Callable[[], Tensor]


def merge_2d_keys(
    inp: MergeInputs,
    alpha: float,
    two_d: Callable[[list[Tensor], str], Update],
    description: str = "merging tensors",
) -> dict[str, Tensor]:
    """``theta_0 + alpha * update`` per float key: ``two_d(taus, key)`` (fp32 ``rows x cols``) for
    2-D keys, ``mean_t tau_t`` for the others; non-float keys copied from pretrained (module doc).

    ``two_d`` may return a callable instead of the update (after submitting its eigendecompositions
    with :func:`eigh_submit`): it is called once the NEXT key has been loaded and started, so one
    key's ``eigh`` overlaps the next key's loading and Gram matrix (two keys in flight at most).
    """
    out: dict[str, Tensor] = {}
    pending: tuple[str, Tensor, Callable[[], Tensor]] | None = None

    def store(key: str, pre32: Tensor, upd: Tensor) -> None:
        out[key] = torch.add(pre32, upd, alpha=alpha).to(inp.dtypes[key])

    big = inp.n_float >= PROGRESS_MIN_NUMEL
    for key in track(inp.float_keys, description=description, transient=True, disable=not big):
        shape = inp.shapes[key]
        if inp.numels[key] == 0:
            out[key] = torch.empty(shape, dtype=inp.dtypes[key])
            continue
        pre32 = inp.pretrained[key].to(torch.float32)
        taus = [torch.sub(ft[key], pre32).to(torch.float32) for ft in inp.finetuned]
        if len(shape) == 2:
            upd = two_d(taus, key)
        else:
            upd = taus[0].clone()
            for t in taus[1:]:
                upd.add_(t)
            upd.div_(len(taus))
        del taus
        if pending is not None:
            store(pending[0], pending[1], pending[2]())
            pending = None
        if callable(upd):
            pending = (key, pre32, upd)
        else:
            store(key, pre32, upd)
        del upd, pre32
    if pending is not None:
        store(pending[0], pending[1], pending[2]())
    return finish(inp, out)
