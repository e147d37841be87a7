"""TSV-M, Iso-C and Iso-CTS against their plain float64 definitions on task vectors that share
directions, as real fine-tunes do (shared low-rank part + task low-rank part + noise): the
concatenated singular bases are then ill-conditioned, and their small singular directions are
real and carry weight (fusion_bench.merging.spectral, module doc).

The references below are the definitions written out with full float64 SVDs and nothing else;
where the definition is not unique (rank-deficient tasks, identical tasks) invariants are tested.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fusion_bench.merging.iso import iso_c_key, iso_cts_key, iso_cts_sizes
from fusion_bench.merging.spectral import polar_svd
from fusion_bench.merging.tsv import tsv_key


def plain_svd(x):
    return torch.linalg.svd(x.double(), full_matrices=False)


def plain_polar(X):
    a, _, bh = torch.linalg.svd(X, full_matrices=False)
    return a @ bh


def plain_tsv(taus):
    k = min(taus[0].shape) // len(taus)
    U, S, V = [], [], []
    for t in taus:
        u, s, vh = plain_svd(t)
        U.append(u[:, :k]), S.append(s[:k]), V.append(vh[:k].T)
    U, S, V = torch.cat(U, 1), torch.cat(S), torch.cat(V, 1)
    return (plain_polar(U) * S) @ plain_polar(V).T


def plain_iso_c(taus):
    u, s, vh = plain_svd(sum(t.double() for t in taus))
    return s.mean() * (u @ vh)


def plain_iso_cts(taus, fraction=0.8):
    M = sum(t.double() for t in taus)
    r, T = min(M.shape), len(taus)
    c, d = iso_cts_sizes(r, T, fraction)
    u, s, vh = plain_svd(M)
    Uc, Sc, Vc = u[:, :c], s[:c], vh[:c].T
    U, S, V = [], [], []
    for t in taus:
        ut, st, vth = plain_svd(t.double() - Uc @ (Uc.T @ t.double()))
        U.append(ut[:, :d]), S.append(st[:d]), V.append(vth[:d].T)
    U, S, V = torch.cat(U + [Uc], 1), torch.cat(S + [Sc]), torch.cat(V + [Vc], 1)
    return S.mean() * (plain_polar(U) @ plain_polar(V).T)


def overlapping(shape, T, shared=3.0, shared_rank=8, task_rank=4, noise=0.1, seed=0):
    """fp32 task vectors: shared low-rank part + each task's own low-rank part + noise, 1e-3 scale."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape

    def low_rank(k):
        return torch.randn(rows, k, generator=g) @ torch.randn(k, cols, generator=g) / k

    base = low_rank(shared_rank)
    taus = []
    for _ in range(T):
        amp = 0.5 + torch.rand(1, generator=g)
        t = shared * base + low_rank(task_rank) + noise * amp * torch.randn(rows, cols, generator=g)
        taus.append((t * 1e-3).float())
    return taus


def rel(ours, ref):
    return float((ours.double() - ref).norm() / ref.norm())


def run(fn, taus):
    out = fn(taus)
    return out() if callable(out) else out


METHODS = {
    "tsv": (tsv_key, plain_tsv),
    "iso_c": (iso_c_key, plain_iso_c),
    "iso_cts": (iso_cts_key, plain_iso_cts),
}

CASES = {
    "independent": {"shape": (96, 96), "T": 8, "shared": 0.0, "shared_rank": 1, "task_rank": 1},
    "overlapping": {"shape": (96, 96), "T": 8},
    "strongly_overlapping": {"shape": (96, 96), "T": 8, "shared": 10.0},
    "square_Tk_eq_r": {"shape": (64, 64), "T": 4},  # T * floor(r / T) = r: the bases are square
    "tall": {"shape": (192, 64), "T": 8},
    "wide": {"shape": (64, 192), "T": 8},
    "many_tasks": {"shape": (120, 100), "T": 20},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", list(METHODS))
def test_spectral_methods_equal_plain_float64_definition(method, case):
    ours_fn, ref_fn = METHODS[method]
    taus = overlapping(**CASES[case])
    assert rel(run(ours_fn, taus), ref_fn(taus)) <= 1e-5


def test_overlap_makes_the_bases_ill_conditioned():
    """The cases above do reach the regime of the bug: the concatenated bases of the overlapping
    tasks have condition numbers far above what a Gram matrix or an fp32 cut-off resolves."""
    taus = overlapping(**CASES["strongly_overlapping"])
    k = 96 // 8
    U = torch.cat([plain_svd(t)[0][:, :k] for t in taus], 1)
    s = torch.linalg.svdvals(U)
    assert float(s[-1] / s[0]) < 1e-4


@pytest.mark.parametrize("shape", [(768, 768), (768, 256)])
def test_real_sized_overlapping_keys(shape):
    """The reported case: eight 768-wide task vectors sharing a rank-32 part (13-24% error before)."""
    taus = overlapping(shape, 8, shared=10.0, shared_rank=32, task_rank=8, seed=1)
    assert rel(tsv_key(taus), plain_tsv(taus)) <= 1e-5
    assert rel(run(iso_c_key, taus), plain_iso_c(taus)) <= 1e-5


def test_iso_c_keeps_every_direction_of_a_full_rank_sum():
    """Iso-C of the sum of independent task vectors: U V^T has all r directions (an fp32-relative
    cut-off dropped the smallest ones: 1/sqrt(r) error each)."""
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(256, 256, generator=g) * 1e-3 for _ in range(8)]
    # make the smallest singular value of the sum tiny but real: 1e-5 s_1 (above fp32 resolution)
    u, s, vh = plain_svd(sum(t.double() for t in taus))
    s[-1] = s[0] * 1e-5
    M = (u * s) @ vh
    taus = [(M / 8).float() for _ in range(8)]
    ref = plain_iso_c(taus)
    assert rel(run(iso_c_key, taus), ref) <= 1e-5


def low_rank_tasks(shape, T, rank, seed=0):
    """LoRA-like task vectors (exactly rank ``rank`` in float64, rounded to fp32) and their float64 form."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    exact = [
        (
            torch.randn(rows, rank, generator=g, dtype=torch.float64)
            @ torch.randn(rank, cols, generator=g, dtype=torch.float64)
        )
        * 1e-3
        for _ in range(T)
    ]
    return [e.float() for e in exact], exact


def truncated(x, tol_rel=1e-6):
    u, s, vh = plain_svd(x)
    keep = s > tol_rel * s[0]
    return u[:, keep], s[keep], vh[keep].T


def partial_isometry(X, tol_rel=1e-9):
    a, s, bh = torch.linalg.svd(X, full_matrices=False)
    keep = s > tol_rel * s[0]
    return a[:, keep] @ bh[keep]


def test_rank_deficient_tasks_give_the_canonical_partial_isometry():
    """Rank-4 tasks with k = 12 > 4 kept triplets: the extra triplets are an exact null space whose
    basis is arbitrary; the merge uses only the determined directions (spectral module doc)."""
    taus, _ = low_rank_tasks((96, 96), T=8, rank=4)
    k = 96 // 8
    U, S, V = [], [], []
    for t in taus:
        u, s, v = truncated(t)
        U.append(u[:, :k]), S.append(s[:k]), V.append(v[:, :k])
    U, S, V = torch.cat(U, 1), torch.cat(S), torch.cat(V, 1)
    ref = (partial_isometry(U) * S) @ partial_isometry(V).T
    assert rel(tsv_key(taus), ref) <= 1e-5
    # Iso-C: the sum has rank 32 of 96; the mean runs over all 96 singular values
    M = sum(t.double() for t in taus)
    u, s_all, vh = plain_svd(M)
    keep = s_all > 1e-6 * s_all[0]
    assert int(keep.sum()) == 32
    ref_c = s_all.mean() * (u[:, keep] @ vh[keep])
    assert rel(run(iso_c_key, taus), ref_c) <= 1e-5


def test_result_does_not_depend_on_the_null_space_basis():
    """Rotating the tasks' (undetermined) null spaces changes nothing: a task vector's representation
    cannot, so ours must be a function of the task vectors alone (checked on permuted task order too)."""
    taus, _ = low_rank_tasks((96, 64), T=8, rank=3, seed=2)
    a = tsv_key(taus)
    b = tsv_key(taus[::-1])
    assert rel(b, a.double()) <= 1e-5
    c = run(iso_cts_key, taus)
    d = run(iso_cts_key, taus[::-1])
    assert rel(d, c.double()) <= 1e-5


def test_two_identical_tasks_merge_to_that_task_truncated():
    """[A | A] has an exact null space; its canonical polar factor makes TSV-M of two identical tasks
    the task's own top-floor(r/2) truncation."""
    taus = overlapping((64, 48), 1, seed=4)
    t = taus[0]
    u, s, vh = plain_svd(t)
    k = 48 // 2
    ref = (u[:, :k] * s[:k]) @ vh[:k]
    assert rel(tsv_key([t, t.clone()]), ref) <= 1e-5


def test_merge_moves_without_jumps_as_tasks_approach():
    """Two tasks t and t + eps E, eps from 1e-2 down to 1e-6: the merge changes by a small step at each
    small change of eps (a cut-off on small singular values made it jump where they crossed it)."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn(64, 64, generator=g, dtype=torch.float64) * 1e-3
    E = torch.randn(64, 64, generator=g, dtype=torch.float64) * 1e-3
    epss = [10 ** (-k / 8) for k in range(16, 49)]
    outs = [tsv_key([t.float(), (t + e * E).float()]).double() for e in epss]
    steps = [rel(b, a) for a, b in itertools.pairwise(outs)]
    assert max(steps) < 0.05, steps


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (20, 20)])
def test_polar_svd_equals_plain_polar_and_is_a_partial_isometry(shape):
    g = torch.Generator().manual_seed(6)
    X = torch.randn(*shape, generator=g, dtype=torch.float64)
    assert rel(polar_svd(X), plain_polar(X)) <= 1e-12
    # an exact null space (two zero columns / rows) maps to zero
    Y = X.clone()
    if shape[0] >= shape[1]:
        Y[:, :2] = 0
    else:
        Y[:2] = 0
    P = polar_svd(Y, basis=True)
    assert rel(P, partial_isometry(Y)) <= 1e-12


def test_low_rank_fine_tunes_stored_as_fp32_weights():
    """A rank-4 update stored in full fp32 weights is rank 4 only up to the weights' rounding
    (spectral.rounding_noise): TSV-M and Iso-C use the 4 real directions per task, not the rounding."""
    from fusion_bench.merging import iso_c, tsv_merging

    g = torch.Generator().manual_seed(7)
    pre64 = torch.randn(96, 80, generator=g, dtype=torch.float64) * 0.02
    exact = [
        torch.randn(96, 4, generator=g, dtype=torch.float64)
        @ torch.randn(4, 80, generator=g, dtype=torch.float64)
        * 2e-4
        for _ in range(8)
    ]
    pre = {"w": pre64.float()}
    fts = [{"w": (pre64 + e).float()} for e in exact]
    taus = [ft["w"].double() - pre["w"].double() for ft in fts]
    k = 80 // 8
    U, S, V = [], [], []
    for t in taus:
        u, s, vh = plain_svd(t)
        U.append(u[:, :4]), S.append(s[:4]), V.append(vh[:4].T)
    U, S, V = torch.cat(U, 1), torch.cat(S), torch.cat(V, 1)
    ref = (plain_polar(U) * S) @ plain_polar(V).T
    assert k > 4
    assert rel(tsv_merging(pre, fts)["w"].double() - pre["w"].double(), ref) <= 1e-4
    u, s_all, vh = plain_svd(sum(taus))
    ref_c = s_all[:32].sum() / 80 * (u[:, :32] @ vh[:32])
    assert rel(iso_c(pre, fts)["w"].double() - pre["w"].double(), ref_c) <= 1e-4


@pytest.mark.parametrize("seed", [0, 1])
def test_full_merge_path_with_large_pretrained_weights(seed):
    """Through iso_c / iso_cts / tsv_merging with theta_0 large against the task vectors (rms 0.3, task vectors
    1e-3): the weights' rounding tolerance must not reach the sum's real small directions (the roundings of
    separately stored fine-tunes add as sqrt(T), not T: a T-fold cut-off dropped one here, 1/sqrt(384) error)."""
    from fusion_bench.merging import iso_c, iso_cts, tsv_merging

    taus = overlapping((384, 384), 8, seed=seed)
    g = torch.Generator().manual_seed(8 + seed)
    pre = {"w": torch.randn(384, 384, generator=g) * 0.3}
    fts = [{"w": pre["w"] + t} for t in taus]
    real = [ft["w"].double() - pre["w"].double() for ft in fts]  # the task vectors the fp32 weights hold
    # well posed: the sum's smallest direction lies far above the weights' rounding (which the data cannot undo)
    rounding = torch.linalg.matrix_norm(sum(r - t.double() for r, t in zip(real, taus)), 2)
    assert torch.linalg.svdvals(sum(real))[-1] > 5 * rounding
    for fn, ref in ((iso_c, plain_iso_c), (iso_cts, plain_iso_cts), (tsv_merging, plain_tsv)):
        out = fn(pre, fts)["w"].double() - pre["w"].double()
        assert rel(out, ref(real)) <= 1e-5, fn.__name__
