"""WUDI's exact minimiser (`solver: exact`, fusion_bench.merging.wudi module doc) against independent references:
L-BFGS run to convergence on the literal autograd loss (float64), the pseudo-inverse from a full SVD, and the
stationarity of the loss; on overlapping task vectors (a shared low-rank part, like real fine-tunes), tall, square,
wide (the factored path) and rank-deficient keys (LoRA-like, where the minimiser is not unique)."""

from __future__ import annotations

import pytest
import torch
from test_merging_svd import SHAPES, assert_merge_close, make_models, ref_merge, wudi_loss
from test_spectral_overlap import overlapping

from fusion_bench.merging import wudi_merging
from fusion_bench.merging.wudi import wudi_optimise


def lbfgs_minimum(taus, iters=400):
    """Minimise the literal loss with L-BFGS from m = sum_t tau_t (float64)."""
    m = torch.nn.Parameter(sum(taus).detach().clone())
    opt = torch.optim.LBFGS([m], lr=1.0, max_iter=iters, tolerance_grad=1e-14, tolerance_change=1e-20,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = wudi_loss(m, taus)
        loss.backward()
        return loss

    opt.step(closure)
    return m.detach()


def pinv_minimum(taus):
    """B A^+ with the pseudo-inverse of a full SVD (torch.linalg.pinv), float64."""
    A = sum(t.T @ t / t.pow(2).sum() for t in taus)
    B = sum(t @ t.T @ t / t.pow(2).sum() for t in taus)
    return B @ torch.linalg.pinv(A, hermitian=True, rtol=1e-12)


def grad_norm(m, taus):
    m = m.detach().clone().requires_grad_(True)
    wudi_loss(m, taus).backward()
    return float(m.grad.norm())


def scale_of(taus):
    return float(sum(t.norm() for t in taus))


@pytest.mark.parametrize("shape", [(24, 16), (16, 16), (16, 24), (3, 40)])
def test_exact_is_the_minimiser_found_by_lbfgs(shape):
    taus = [1e3 * t.double() for t in overlapping(shape, 4, shared_rank=2, task_rank=2, seed=1)]  # O(1) entries
    m, st = wudi_optimise(taus, solver="exact")
    ref = lbfgs_minimum(taus)
    torch.testing.assert_close(m, pinv_minimum(taus), rtol=1e-7, atol=1e-10)
    assert m.dtype == torch.float64
    loss_ref = wudi_loss(ref, taus).item()
    assert st.loss_after == pytest.approx(wudi_loss(m, taus).item(), rel=1e-9)
    assert st.loss_after <= loss_ref + 1e-12 * st.loss_before  # never worse than L-BFGS (to round-off)
    assert st.loss_after < st.loss_before
    assert grad_norm(m, taus) < 1e-9 * grad_norm(sum(taus), taus)  # stationary
    if 4 * shape[0] >= shape[1]:  # A has full rank here: the minimiser is unique
        assert float((m - ref).norm() / ref.norm()) < 1e-3  # L-BFGS stops within its tolerance of it


def test_exact_on_rank_deficient_keys_is_the_least_norm_minimiser():
    """LoRA-like updates (each task rank 2, T rows... of rank 8 < cols): A is singular, every m + N with N's rows
    in A's null space minimises; the solver returns the one of least norm (rows in the task vectors' row span)."""
    g = torch.Generator().manual_seed(3)
    rows, cols, T = 32, 48, 4
    taus = [torch.randn(rows, 2, generator=g, dtype=torch.float64) @ torch.randn(2, cols, generator=g,
                                                                                   dtype=torch.float64) * 1e-3
            for _ in range(T)]
    m, st = wudi_optimise(taus, solver="exact")
    ref = pinv_minimum(taus)
    torch.testing.assert_close(m, ref, rtol=1e-7, atol=1e-12)
    assert abs(st.loss_after - wudi_loss(lbfgs_minimum(taus), taus).item()) < 1e-12 * st.loss_before
    span = torch.cat(taus)  # rows of m lie in the span of the task vectors' rows
    proj = m @ torch.linalg.pinv(span) @ span
    torch.testing.assert_close(proj, m, rtol=1e-7, atol=1e-12)


def test_long_adam_approaches_the_exact_loss():
    """At entries of 0.1-1 (100x the tiny model's), the paper's 300 steps of 1e-5 (an absolute step: m moves at most
    3e-3 per entry) stay near m_0; a long Adam run reaches the exact loss."""
    taus = [100 * t.double() for t in overlapping((12, 10), 3, shared_rank=2, task_rank=2, seed=2)]
    _, exact = wudi_optimise(taus, solver="exact")
    _, short = wudi_optimise(taus, lr=1e-5, iterations=300)
    _, long = wudi_optimise(taus, lr=1e-3, iterations=20000)
    gap0 = exact.loss_before - exact.loss_after
    assert exact.loss_after < long.loss_after < short.loss_after <= exact.loss_before
    assert long.loss_after - exact.loss_after < 1e-3 * gap0  # long Adam ends where the exact solver is
    assert short.loss_after - exact.loss_after > 0.5 * gap0  # the paper's 300 steps at 1e-5 barely move here


def test_wudi_merging_exact_fp32_matches_the_reference_merge_and_is_refused_when_unknown():
    pre, fts = make_models(3, seed=8)
    out = wudi_merging(pre, fts, solver="exact", scaling_coef=0.7, keys="all_2d")
    ref = ref_merge(pre, fts, pinv_minimum, 0.7)
    assert_merge_close(out, pre, ref, rtol=1e-5, atol=2e-6)
    assert set(SHAPES) <= set(out)
    with pytest.raises(ValueError, match="solver='lbfgs' must be one of"):
        wudi_merging(pre, fts, solver="lbfgs")


def test_solver_range_is_checked_before_any_work(make_cfg):
    from fusion_bench.errors import ConfigError
    from fusion_bench.validation.check import check_options

    cfg = make_cfg("method=wudi", "method.solver=newton")
    with pytest.raises(ConfigError, match="solver"):
        check_options(cfg)
    check_options(make_cfg("method=wudi", "method.solver=exact"))
