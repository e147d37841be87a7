r"""AWD: Adaptive Weight Disentanglement (Xiong et al., 2024), then task arithmetic or TIES.

One redundant vector ``delta`` is shared by all tasks; ``tau_hat_i = tau_i - delta`` and

    L(delta) = mean_{i != j} |cos(tau_hat_i, tau_hat_j)| + alpha * ||delta||_2

is minimised from ``delta_0 = 0`` (defaults of the paper: alpha=0.1, lr=0.01, 300 iterations).
``tau_hat`` then goes to task arithmetic (:func:`awd_ta`) or TIES (:func:`awd_ties`).
AWD works on the whole flattened task vector (all float keys).

Fast form (``optimizer="gd"``, the default)
-------------------------------------------
Every gradient of L lies in ``span{tau_1..tau_n}``, so with ``delta_0 = 0`` plain gradient
descent keeps ``delta = sum_k c_k tau_k``.  Write ``A = I - 1 c^T`` (``tau_hat_i = sum_k A_ik tau_k``)
and ``G`` the n x n Gram matrix of the task vectors.  Then ``H = A G A^T`` is the Gram matrix of
the ``tau_hat``, ``cos_ij = H_ij / (d_i d_j)`` with ``d_i = sqrt(H_ii)``, ``||delta||^2 = c^T G c``, and

    dL/dtau_hat_i = sum_j W_ij tau_hat_j,
        W_ij = kappa s_ij / (d_i d_j)            (j != i),   s_ij = sign(cos_ij), kappa = 2/(n(n-1))
        W_ii = -kappa sum_{j != i} s_ij cos_ij / d_i^2
    dL/ddelta = -sum_i dL/dtau_hat_i + alpha delta/||delta|| = sum_k g_k tau_k,
        g = -(1^T W A)^T + alpha c / sqrt(c^T G c)     (alpha term 0 at delta = 0, as torch's norm)

so the full-space step ``delta <- delta - lr * dL/ddelta`` is exactly ``c <- c - lr * g``: no
``G^{-1}``, n x n arithmetic after one streaming pass for ``G``.  It is tested against
:func:`awd_reference` (plain autograd on the full vectors).

``optimizer="adam"``: Adam's per-coordinate step leaves the span, so it runs in FULL space with
the analytic gradient ``-T^T w + (sum_j w_j) delta + alpha delta/||delta||`` (``w = 1^T W``)
and ``torch.optim.Adam``.  It holds all task vectors in memory: ``(n + 4) * 4`` bytes per
parameter (about 4.2 GB for eight ViT-B/32) and two matrix-vector passes per iteration.

Step size: the cosine gradient scales like ``1 / ||tau||``, so a fixed ``lr`` moves ``delta``
by roughly ``lr * iterations / ||tau||`` relative to ``||tau||``'s own scale.  The defaults stay
the paper's (gd, lr=0.01); the loss before/after and ``||delta|| / mean ||tau_i||`` are logged
(INFO) and returned by :func:`awd_disentangle` so a run can show whether delta moved.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fusion_bench.errors import ConfigError
from fusion_bench.validation.ranges import (
    FLAG,
    ONE_COEF,
    PER_TASK_COEF,
    Context,
    choice,
    integer,
    non_negative,
)

from .registry import merging_method
from .task_arithmetic import weighted_sum_merge
from .task_vectors import (
    MergeInputs,
    StateDict,
    Transform,
    flat_task_vectors,
    is_number,
    prepare,
    scalar_coef,
    scaling_coefs,
    stream_blocks,
    unflatten,
)
from .ties import KEPT_FRACTION, check_k, ties_merge

log = logging.getLogger(__name__)

OPTIMIZERS = ("gd", "adam")


@dataclass
class AWDResult:
    """Outcome of the AWD optimisation (all norms over the whole flattened task vector)."""

    gram: Tensor  # (n, n) float64 Gram matrix of the task vectors
    coefficients: Tensor | None  # (n,) float64, delta = sum_k c_k tau_k   (optimizer="gd")
    delta: dict[str, Tensor] | None  # flat fp32 delta per float key          (optimizer="adam")
    losses: list[float]  # loss before each step, then the final loss
    delta_norm: float
    mean_tau_norm: float
    optimizer: str
    lr: float
    alpha: float
    iterations: int

    @property
    def loss_before(self) -> float:
        return self.losses[0]

    @property
    def loss_after(self) -> float:
        return self.losses[-1]

    @property
    def relative_delta_norm(self) -> float:
        return self.delta_norm / self.mean_tau_norm if self.mean_tau_norm > 0 else math.nan

    def summary(self) -> dict[str, float | str | int]:
        return {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "alpha": self.alpha,
            "iterations": self.iterations,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "delta_norm": self.delta_norm,
            "mean_tau_norm": self.mean_tau_norm,
            "delta_norm_over_mean_tau_norm": self.relative_delta_norm,
        }


# --------------------------------------------------------------------------------------------
# loss pieces on Gram matrices
# --------------------------------------------------------------------------------------------
def _cos_terms(H: Tensor) -> tuple[Tensor, Tensor]:
    """Mean off-diagonal |cos| of the Gram matrix ``H`` and the weight matrix ``W`` (module doc)."""
    n = H.shape[0]
    d = H.diagonal().clamp_min(0).sqrt()
    dd = torch.outer(d, d)
    C = H / dd
    off = ~torch.eye(n, dtype=torch.bool)
    loss = C.abs()[off].mean()
    kappa = 2.0 / (n * (n - 1))
    s = torch.sign(C) * off
    W = kappa * s / dd
    W.diagonal().copy_(-kappa * (s * C).sum(1) / d**2)
    return loss, W


def awd_loss_and_grad_coefficients(G: Tensor, c: Tensor, alpha: float) -> tuple[float, Tensor]:
    """Loss at ``delta = sum_k c_k tau_k`` and ``g`` with ``dL/ddelta = sum_k g_k tau_k``."""
    n = G.shape[0]
    A = torch.eye(n, dtype=G.dtype) - c.unsqueeze(0)
    H = A @ G @ A.T
    loss_cos, W = _cos_terms(H)
    dn = math.sqrt(max(float(c @ G @ c), 0.0))
    g = -(W.sum(0) @ A)
    if dn > 0:
        g = g + (alpha / dn) * c
    return float(loss_cos) + alpha * dn, g


def optimise_coefficients(
    G: Tensor, alpha: float = 0.1, lr: float = 0.01, iterations: int = 300
) -> tuple[Tensor, list[float]]:
    """Plain gradient descent on ``delta`` run in coefficient space (exact, see module doc)."""
    G = G.to(torch.float64)
    c = torch.zeros(G.shape[0], dtype=torch.float64)
    losses = []
    for _ in range(iterations):
        loss, g = awd_loss_and_grad_coefficients(G, c, alpha)
        losses.append(loss)
        c = c - lr * g
    losses.append(awd_loss_and_grad_coefficients(G, c, alpha)[0])
    return c, losses


def optimise_full_space(
    T: Tensor,
    alpha: float = 0.1,
    lr: float = 0.01,
    iterations: int = 300,
    optimizer: str = "adam",
    G: Tensor | None = None,
) -> tuple[Tensor, list[float]]:
    """Full-space optimisation of ``delta`` (``T``: ``(n, D)`` task vectors) with the analytic gradient."""
    if G is None:
        G = (T @ T.T).to(torch.float64)
    delta = torch.zeros(T.shape[1], dtype=T.dtype, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr) if optimizer == "adam" else torch.optim.SGD([delta], lr=lr)
    ones = torch.ones(T.shape[0], 1, dtype=torch.float64)

    def loss_and_w(dlt: Tensor) -> tuple[float, Tensor, float]:
        u = (T @ dlt).to(torch.float64).unsqueeze(1)
        dd = float(dlt.to(torch.float64) @ dlt.to(torch.float64))
        H = G - u @ ones.T - ones @ u.T + dd
        loss_cos, W = _cos_terms(H)
        dn = math.sqrt(max(dd, 0.0))
        return float(loss_cos) + alpha * dn, W.sum(0), dn

    losses = []
    with torch.no_grad():
        for _ in range(iterations):
            loss, w, dn = loss_and_w(delta)
            losses.append(loss)
            beta = float(w.sum()) + (alpha / dn if dn > 0 else 0.0)
            grad = torch.mv(T.T, (-w).to(T.dtype))
            grad.add_(delta, alpha=beta)
            delta.grad = grad
            opt.step()
        losses.append(loss_and_w(delta)[0])
    return delta.detach(), losses


# --------------------------------------------------------------------------------------------
# plain reference (autograd on full vectors) -- the thing the fast forms are tested against
# --------------------------------------------------------------------------------------------
def awd_loss(task_vectors: Tensor, delta: Tensor, alpha: float) -> Tensor:
    """``mean_{i != j} |cos(tau_i - delta, tau_j - delta)| + alpha ||delta||`` written plainly."""
    th = task_vectors - delta
    unit = th / th.norm(dim=1, keepdim=True)
    C = unit @ unit.T
    off = ~torch.eye(th.shape[0], dtype=torch.bool)
    return C[off].abs().mean() + alpha * delta.norm()


def awd_reference(
    task_vectors: Tensor, alpha: float = 0.1, lr: float = 0.01, iterations: int = 300, optimizer: str = "gd"
) -> tuple[Tensor, list[float]]:
    """Plain full-vector AWD: autograd + ``torch.optim.SGD`` / ``Adam`` on ``delta`` (``(n, D)`` input)."""
    delta = torch.zeros(task_vectors.shape[1], dtype=task_vectors.dtype, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr) if optimizer == "adam" else torch.optim.SGD([delta], lr=lr)
    losses = []
    for _ in range(iterations):
        loss = awd_loss(task_vectors, delta, alpha)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(awd_loss(task_vectors, delta, alpha).item())
    return delta.detach(), losses


# --------------------------------------------------------------------------------------------
# streaming pieces
# --------------------------------------------------------------------------------------------
def gram_matrix(inp: MergeInputs) -> Tensor:
    """``G_ij = <tau_i, tau_j>`` over all float keys, one keys-outer pass (fp32 chunks, fp64 sum)."""
    G = torch.zeros(inp.n, inp.n, dtype=torch.float64)

    def visit(X: Tensor, key: str, s: int, e: int, p32: Tensor) -> None:
        G.add_(torch.mm(X, X.T))

    stream_blocks(inp, visit)
    return G


class SubtractDelta(Transform):
    """``tau_t <- tau_t - delta`` with ``delta`` stored per key (flat fp32)."""

    def __init__(self, delta: dict[str, Tensor]):
        self.delta = delta

    def row(self, t, key, numel, start, end, x):
        x.sub_(self.delta[key][start:end])

    def block(self, X, key, numel, start, end):
        X.sub_(self.delta[key][start:end])


class SubtractSpan(Transform):
    """``tau_t <- tau_t - sum_k c_k tau_k`` computed from the block itself (no stored delta)."""

    def __init__(self, c: Tensor):
        self.c = c.to(torch.float32)

    def row(self, t, key, numel, start, end, x):  # pragma: no cover - needs every task's chunk
        raise RuntimeError("SubtractSpan needs all tasks' chunks at once (keys-outer passes only)")

    def block(self, X, key, numel, start, end):
        X.sub_(torch.mv(X.T, self.c))


def delta_from_coefficients(inp: MergeInputs, c: Tensor) -> dict[str, Tensor]:
    """Materialise ``delta = sum_k c_k tau_k`` per float key (flat fp32, 4 bytes/parameter)."""
    c32 = c.to(torch.float32)
    delta = {k: torch.empty(inp.numels[k], dtype=torch.float32) for k in inp.float_keys}

    def visit(X: Tensor, key: str, s: int, e: int, p32: Tensor) -> None:
        torch.mv(X.T, c32, out=delta[key][s:e])

    stream_blocks(inp, visit)
    return delta


def _check_awd_args(inp: MergeInputs, alpha, lr, iterations, optimizer, method) -> None:
    if inp.n < 2:
        raise ValueError(f"{method}: AWD needs at least 2 task vectors (cosines between pairs), got {inp.n}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"{method}: optimizer={optimizer!r} must be one of {OPTIMIZERS}")
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 0:
        raise ValueError(f"{method}: iterations={iterations!r} must be a non-negative integer")
    for name, v in (("alpha", alpha), ("lr", lr)):
        if not is_number(v) or float(v) < 0:
            raise ValueError(f"{method}: {name}={v!r} must be a non-negative number")


def _disentangle(inp: MergeInputs, alpha, lr, iterations, optimizer, method) -> AWDResult:
    _check_awd_args(inp, alpha, lr, iterations, optimizer, method)
    alpha, lr, iterations = float(alpha), float(lr), int(iterations)
    if optimizer == "gd":
        G = gram_matrix(inp)
        c, losses = optimise_coefficients(G, alpha, lr, iterations)
        delta_norm = math.sqrt(max(float(c @ G @ c), 0.0))
        res = AWDResult(G, c, None, losses, delta_norm, 0.0, optimizer, lr, alpha, iterations)
    else:
        T = flat_task_vectors(inp)
        G = (T @ T.T).to(torch.float64)
        d, losses = optimise_full_space(T, alpha, lr, iterations, optimizer, G)
        del T
        delta_norm = float(d.norm())
        res = AWDResult(G, None, unflatten(inp, d), losses, delta_norm, 0.0, optimizer, lr, alpha, iterations)
    res.mean_tau_norm = float(G.diagonal().clamp_min(0).sqrt().mean())
    log.info(
        "%s: AWD %s lr=%g alpha=%g iterations=%d: loss %.6g -> %.6g, ||delta||=%.4g, "
        "mean ||tau_i||=%.4g, ratio=%.4g",
        method,
        optimizer,
        lr,
        alpha,
        iterations,
        res.loss_before,
        res.loss_after,
        res.delta_norm,
        res.mean_tau_norm,
        res.relative_delta_norm,
    )
    if iterations > 0 and res.relative_delta_norm < 1e-3:
        log.warning(
            "%s: AWD moved delta by only %.2g of mean ||tau|| (cosine gradients scale like 1/||tau||): "
            "tau_hat ~= tau; consider a larger lr or optimizer='adam'",
            method,
            res.relative_delta_norm,
        )
    return res


def awd_disentangle(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    alpha: float = 0.1,
    lr: float = 0.01,
    iterations: int = 300,
    optimizer: str = "gd",
) -> AWDResult:
    """Run only the AWD optimisation and return delta (as coefficients or per key) and diagnostics."""
    inp = prepare(pretrained, finetuned, "awd")
    return _disentangle(inp, alpha, lr, iterations, optimizer, "awd")


@merging_method("awd_ta", "awd", kind="data-free", affine=True)  # awd: an alias
def awd_ta(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_coef: float | Sequence[float] = 0.3,
    alpha: float = 0.1,
    lr: float = 0.01,
    iterations: int = 300,
    optimizer: str = "gd",
) -> dict[str, Tensor]:
    """AWD then task arithmetic: ``theta_0 + sum_t lambda_t (tau_t - delta)``.

    With gd this is task arithmetic with coefficients ``lambda_t - (sum_s lambda_s) c_t``: one pass
    for the Gram matrix, one merge pass.
    """
    inp = prepare(pretrained, finetuned, "awd_ta")
    lam = scaling_coefs(scaling_coef, inp.n, "awd_ta")
    res = _disentangle(inp, alpha, lr, iterations, optimizer, "awd_ta")
    if res.coefficients is not None:
        c = res.coefficients
        total = sum(lam)
        return weighted_sum_merge(inp, [lam[t] - total * float(c[t]) for t in range(inp.n)])
    return weighted_sum_merge(inp, lam, transform=SubtractDelta(res.delta))


@merging_method(kind="data-free", affine=True)
def awd_ties(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    k: float = 0.2,
    scaling_coef: float = 0.3,
    per_tensor: bool = False,
    alpha: float = 0.1,
    lr: float = 0.01,
    iterations: int = 300,
    optimizer: str = "gd",
) -> dict[str, Tensor]:
    """AWD then TIES on ``tau_hat`` (trim / elect / disjoint mean, ``k`` and ``per_tensor`` as in TIES).

    Global top-k needs ``delta`` per key for its task-outer threshold pass: it is materialised
    (4 bytes/parameter); per-tensor TIES subtracts ``sum_k c_k tau_k`` on the fly instead.
    """
    inp = prepare(pretrained, finetuned, "awd_ties")
    check_k(k, "awd_ties")
    lam = scalar_coef(scaling_coef, "awd_ties")
    res = _disentangle(inp, alpha, lr, iterations, optimizer, "awd_ties")
    if res.coefficients is not None:
        if per_tensor or k >= 1.0:
            transform: Transform = SubtractSpan(res.coefficients)
        else:
            transform = SubtractDelta(delta_from_coefficients(inp, res.coefficients))
    else:
        transform = SubtractDelta(res.delta)
    return ties_merge(inp, float(k), lam, per_tensor, transform=transform)

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
AWD_RANGES = {
    "alpha": non_negative("the weight of ||delta|| in the loss"),
    "lr": non_negative("the step of gd / adam"),
    "iterations": integer(0, note="optimiser steps; 0 leaves delta = 0"),
    "optimizer": choice(*OPTIMIZERS),
}


def _check_awd_settings(settings: dict, ctx: Context) -> None:
    if len(ctx.tasks) < 2:
        raise ConfigError(f"taskpool.tasks={list(ctx.tasks)}: AWD needs at least 2 tasks (cosines between pairs of "
                          f"task vectors)")


awd_ta.ranges = {**AWD_RANGES, "scaling_coef": PER_TASK_COEF}
awd_ties.ranges = {**AWD_RANGES, "k": KEPT_FRACTION, "scaling_coef": ONE_COEF, "per_tensor": FLAG}
awd_ta.check_settings = awd_ties.check_settings = _check_awd_settings
