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
* polar factor: ``P Q^T = X (X^T X)^{-1/2} = X W``, ``W = Q diag(1/sigma) Q^T``, when ``X`` is well
  conditioned (below: otherwise from a QR of ``X``).

Why this is exact to float32 round-off: the float64 Gram of fp32 data has an absolute error of
about ``1e-16 s_1^2`` in each eigenvalue, so ``s_i`` is off by about ``1e-16 (s_1 / s_i)^2``
relative and a singular vector by ``1e-16 s_1^2 / (s_i^2 - s_j^2)``, against the
``6e-8 s_1 / (s_i - s_j)`` of an fp32 SVD itself: squaring the condition number costs nothing
at float32 resolution unless ``s_i / s_1 < ~1e-4``.  The results depend on the singular vectors
only through quantities invariant under rotations inside a cluster of equal singular values
(``polar(X R) = polar(X) R`` for orthogonal ``R``), so near-degenerate spectra are harmless too.

Numerically zero singular values, and the polar factors
-------------------------------------------------------
A singular direction that the data cannot determine is treated as zero; nothing else is.

* fp32 data (a task vector, ``M = sum_t tau_t``, a projected task vector): ``s_i`` is numerically
  zero when it is at most the larger of

  - the rounding of the weights: ``tau_t = theta_t - theta_0`` of fp32 weights carries the
    rounding of both, a matrix whose spectral norm is about ``eps_32 rms(theta_0) (sqrt(rows) +
    sqrt(cols)) / 2.4``; the tolerance is ``noise = eps_32 rms(theta_0) (sqrt(rows) + sqrt(cols))``
    per task vector and ``sqrt(T) noise`` for a sum of ``T`` (their roundings are independent: a
    ``T noise`` cut-off dropped real directions of Iso-C's sum where theta_0 is large against the
    task vectors).  Weights stored in bf16 are taken as the exact values they hold (merged in fp32
    like fp32 weights, the same tolerance).  A LoRA fine-tune stored as full weights is exactly
    low-rank only up to this: its other singular values (``1e-7`` of ``s_1`` in the test)
    are the weights' rounding, not the fine-tune;
  - the resolution of the data itself: ``sqrt(n eps_64) s_1``, ``n = max(rows, cols)`` (3.4 fp32
    units of ``s_1`` at ``n = 768``, 7 at 3072): below it neither fp32 data nor the float64 Gram
    matrix (whose eigenvalues carry an absolute error of about ``n eps_64 s_1^2``) determines the
    direction (the sum of eight rank-16 task vectors made in fp32: its 129th singular value is
    ``0.4 eps_32 s_1``).

  Such triplets are dropped (their ``u``, ``v`` set to zero); their singular values still count in
  means.
* A concatenation of singular bases (TSV-M, Iso-CTS): its columns are float64 unit vectors, so only
  an exact null space (zero columns of dropped triplets, identical tasks) is numerically zero:
  ``sigma_i <= K eps_64 sigma_1`` for ``K`` columns (``torch.linalg.matrix_rank``'s float64
  default).  Overlapping tasks make the concatenation ill-conditioned (condition numbers of
  ``1e5`` with a shared rank-32 part), but its small singular directions are determined by the data
  and each carries a whole ``p_i q_i^T`` of the polar factor: none of them may be dropped.

The polar factor is the canonical partial isometry ``P_+ Q_+^T`` over the directions that are not
numerically zero (zero on the null space, so it does not depend on the basis chosen there).  It is
computed from the Gram matrix (``X (X^T X)^{-1/2}``) only when the Gram matrix is well conditioned
(``sigma_min / sigma_1 >= 1e-3.5``: its float64 eigenvalues are then exact to ``1e-6`` relative);
otherwise from a float64 QR of ``X`` and the SVD of its ``K x K`` triangular factor
(``X = Q_X R``, ``R = A S B^T``, ``polar(X) = Q_X A B^T``): squaring the condition number of an
overlapping basis in a Gram matrix loses the small directions' weight (13-24% error against the
plain form when they were cut off, ``1e-4`` when kept but taken from the Gram matrix).

Where tasks are identical the plain form is not unique (``[A | A]`` has an exact null space) and
the partial isometry is its canonical choice (two identical tasks merge to that task).  As two
tasks approach each other the merge moves continuously, but its limit depends on the direction
they approach from: TSV-M's definition itself is discontinuous at identical tasks.

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
EPS64 = torch.finfo(torch.float64).eps


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


def data_tol(s1: float, shape: Sequence[int], noise: float = 0.0) -> float:
    """Singular values of fp32 data at or below this are numerically zero (module doc); ``noise``: the
    spectral size of the weights' rounding in the data (:func:`rounding_noise`)."""
    return max((max(shape) * EPS64) ** 0.5 * s1, noise)


def rounding_noise(pre: Tensor) -> float:
    """``eps_32 rms(theta_0) (sqrt(rows) + sqrt(cols))``: what fp32 weights' rounding puts into a task vector."""
    rows, cols = pre.shape
    rms = float(pre.to(torch.float64).pow(2).mean().sqrt())
    return EPS32 * rms * (rows**0.5 + cols**0.5)


def basis_tol(s1: float, shape: Sequence[int]) -> float:
    """Singular values of a float64 basis at or below this are an exact null space (module doc)."""
    return max(shape) * EPS64 * s1


def _inverse(s: Tensor, tol: float) -> Tensor:
    valid = s > tol
    return torch.where(valid, 1.0 / torch.where(valid, s, 1.0), 0.0)


def eig_triplets(
    L: Tensor, Q: Tensor, k: int, shape: Sequence[int], noise: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """From ``eigh(gram(X))`` (``L`` descending) of an fp32-data ``X`` of ``shape``: ``(s, Qk, inv)`` for the top ``k``.

    ``s`` the singular values, ``Qk`` the eigenvectors (zeroed where numerically zero, module doc),
    ``inv`` = ``1/s`` (0 there): the other side's vectors are ``X Qk * inv`` (or ``X^T Qk * inv``).
    """
    s = L[:k].clamp_min(0).sqrt()
    s1 = float(L[0].clamp_min(0).sqrt()) if L.numel() else 0.0
    inv = _inverse(s, data_tol(s1, shape, noise)) if s1 > 0 else torch.zeros_like(s)
    return s, Q[:, :k] * (inv != 0), inv


def svd_from_gram(
    X: Tensor, L: Tensor, Q: Tensor, k: int, noise: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``k`` singular triplets ``(U (rows x k), s (k,), V (cols x k))`` of ``X`` from ``eigh(gram(X))``.

    ``L`` descending.  Numerically zero triplets get zero ``u`` and ``v`` (module doc); ``s`` keeps
    their (tiny) values.
    """
    s, Qk, inv = eig_triplets(L, Q, k, X.shape, noise)
    if X.shape[0] >= X.shape[1]:
        return (X @ Qk) * inv, s, Qk
    return Qk, s, (X.T @ Qk) * inv


# the Gram matrix gives the polar factor only when sigma_min / sigma_1 is at least this (module doc)
GRAM_POLAR_MIN_RATIO = 10**-3.5


def polar_from_eigh(X: Tensor, L: Tensor, Q: Tensor, basis: bool = False, noise: float = 0.0) -> Tensor:
    """Orthogonal polar factor (float64) of ``X`` from ``eigh(gram(X))`` (``L`` descending).

    The canonical partial isometry over the directions that are not numerically zero (fp32 data,
    or ``basis=True`` for a float64 concatenation of singular bases; module doc).  The Gram matrix
    gives it when ``X`` is well conditioned, a QR of ``X`` and an SVD of its small factor otherwise.
    """
    X = X.to(torch.float64)
    sig = L.clamp_min(0).sqrt()
    s1 = float(sig[0]) if sig.numel() else 0.0
    if s1 == 0.0:
        return torch.zeros_like(X)
    if float(sig[-1]) >= max(GRAM_POLAR_MIN_RATIO * s1, 2 * noise):
        W = (Q / sig) @ Q.T
        return X @ W if X.shape[0] >= X.shape[1] else W @ X
    return polar_svd(X, basis, noise)


def polar_svd(X: Tensor, basis: bool = False, noise: float = 0.0) -> Tensor:
    """Orthogonal polar factor (float64) of ``X`` through a QR of the long side and an SVD of ``R``."""
    X = X.to(torch.float64)
    wide = X.shape[0] < X.shape[1]
    if wide:
        X = X.T
    if X.shape[0] > X.shape[1]:
        QX, R = torch.linalg.qr(X)
    else:
        QX, R = None, X
    A, S, Bh = torch.linalg.svd(R)
    s1 = float(S[0]) if S.numel() else 0.0
    tol = basis_tol(s1, X.shape) if basis else data_tol(s1, X.shape, noise)
    keep = S > tol
    P = A[:, keep] @ Bh[keep]
    if QX is not None:
        P = QX @ P
    return P.T if wide else P


def _basis_polar(X: Tensor) -> Tensor:
    return polar_from_eigh(X, *_eigh_desc(X.T @ X), basis=True)


def polar_pair(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Orthogonal polar factors of the float64 bases ``U`` (rows x K) and ``V`` (cols x K), ``K <= rows, cols``.

    The two run concurrently in the single-threaded pool (module doc, Threads): each is an ``eigh``
    and, for an ill-conditioned basis, a QR and an SVD, none of which gains from a second thread.
    """
    fu, fv = (_pool().submit(_basis_polar, X) for X in (U, V))
    return fu.result(), fv.result()


# --------------------------------------------------------------------------------------------
# streaming driver
# --------------------------------------------------------------------------------------------
Update = Tensor | Callable[[], Tensor]


def merge_2d_keys(
    inp: MergeInputs,
    alpha: float,
    two_d: Callable[[list[Tensor], str, float], Update],
    description: str = "merging tensors",
) -> dict[str, Tensor]:
    """``theta_0 + alpha * update`` per float key: ``two_d(taus, key, noise)`` (fp32 ``rows x cols``;
    ``noise`` = :func:`rounding_noise` of ``theta_0``) for 2-D keys, ``mean_t tau_t`` for the others; non-float keys copied from pretrained (module doc).

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
            upd = two_d(taus, key, rounding_noise(pre32))
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
