"""ACE-Merging (fusion_bench/merging/ace.py) against the official algorithm written plainly here (float64, explicit loops,
torch.linalg.inv, a full torch.linalg.svd), on random and on overlapping task vectors, heterogeneous and not, tall,
wide and square keys; hand-computed cases; bad settings; end to end through the pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from fusion_bench.errors import ConfigError
from fusion_bench.merging.ace import ace_heterogeneity, ace_key, ace_merging
from fusion_bench.pipeline import run
from fusion_bench.validation.check import check_options

CONF = str(Path(__file__).resolve().parent.parent / "conf")

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# the official algorithm, plainly (unravel-xu/ACE-Merging src/merge/strategy.py, ace_merging)
# ---------------------------------------------------------------------------------------------
def plain_flag(taus, threshold=0.3):
    if len(taus) < 2:  # torch.var of one value: NaN (and a warning); NaN > threshold is False
        return False, torch.tensor([float((t.double() ** 2).sum()) for t in taus])
    traces = torch.tensor([float(torch.trace(t.double().T @ t.double())) for t in taus], dtype=torch.float64)
    logs = torch.log(traces + 1e-12)
    h = torch.var(logs) / (torch.mean(logs) ** 2 + 1e-12)
    return bool(h > threshold), traces


def plain_ace(taus, eps=1e-2, k_frac=0.3, threshold=0.3, keep=None, return_F=False):
    """``keep``: use only the first ``keep`` of the top-k triplets in U_k V_k^T (the mean still over k values);
    ``return_F``: the refinement's input R + W_0 instead."""
    taus = [t.double() for t in taus]
    T = len(taus)
    rows, cols = taus[0].shape
    flag, traces = plain_flag(taus, threshold)
    eye = torch.eye(cols, dtype=torch.float64)
    sigmas, wsig, sig_sum = [], torch.zeros(rows, cols, dtype=torch.float64), torch.zeros(cols, cols, dtype=torch.float64)
    for t in taus:
        W = t - t.mean(dim=0, keepdim=True)
        G = W.T @ W
        tr = torch.trace(G) + 1e-12
        S, e = (G / tr, eps / tr) if flag else (G, eps)
        sigmas.append(S)
        St = S + e * eye
        wsig = wsig + W @ St
        sig_sum = sig_sum + St
    C = torch.mean(sum(sigmas), dim=0, keepdim=True)
    if flag:
        C = C / (traces.mean() + 1e-12)
    W0 = wsig @ torch.linalg.inv(sig_sum + C)
    if not flag:
        return W0
    mean = sig_sum / T
    R = sum(t @ (S - mean) for t, S in zip(taus, sigmas))
    if return_F:
        return R + W0
    U, s, Vh = torch.linalg.svd(R + W0, full_matrices=False)
    k = int(min(rows, cols) * k_frac)
    j = k if keep is None else keep
    return W0 + s[:k].mean() * (U[:, :j] @ Vh[:j])


def rel(ours, ref):
    return float((ours.double() - ref).norm() / ref.norm())


def overlapping(shape, T, shared=3.0, shared_rank=4, task_rank=2, noise=0.1, seed=0, spread=1.0):
    """fp32 task vectors: a shared low-rank part + each task's own + noise, 1e-3 scale; task t scaled by spread**t."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape

    def low_rank(k):
        return torch.randn(rows, k, generator=g) @ torch.randn(k, cols, generator=g) / k

    base = low_rank(shared_rank)
    return [((shared * base + low_rank(task_rank) + noise * torch.randn(rows, cols, generator=g)) * 1e-3
             * spread ** t).float() for t in range(T)]


SHAPES = {"tall": (40, 24), "wide": (24, 40), "square": (32, 32)}


# ---------------------------------------------------------------------------------------------
# one key
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("spread", [1.0, 30.0], ids=["homogeneous", "heterogeneous"])
@pytest.mark.parametrize("T", [1, 3, 6])
def test_key_equals_plain_algorithm_on_overlapping_task_vectors(shape, spread, T):
    taus = overlapping(shape, T, spread=spread, seed=T)
    flag = plain_flag(taus)[0]
    assert flag == (spread > 1 and T > 1)  # both branches are exercised
    assert rel(ace_key(taus), plain_ace(taus)) <= 1e-6


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize(("eps", "k_frac", "threshold"), [(1e-2, 0.3, 0.0), (1e-4, 0.5, 0.0), (1.0, 1.0, 0.3)])
def test_key_equals_plain_algorithm_on_random_task_vectors(shape, eps, k_frac, threshold):
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(*shape, generator=g) * 0.05 * (1 + t) for t in range(4)]
    assert rel(ace_key(taus, eps=eps, k_frac=k_frac, threshold=threshold),
               plain_ace(taus, eps, k_frac, threshold)) <= 1e-6


def test_hand_computed_cases():
    """One task tau = [[1, 0], [-1, 0]] (rows already centred), eps = 1: S = diag(2, 0), S~ = diag(3, 1), the prior
    (mean row of S) p = (1, 0) on every row: A = [[4, 0], [1, 1]], A^-1 = [[1/4, 0], [-1/4, 1]];
    W_0 = tau S~ A^-1 = [[3, 0], [-3, 0]] A^-1 = 0.75 tau. Heterogeneity of norms^2 (e, e^3): logs (1, 3), unbiased
    variance 2, mean^2 4: h = 0.5."""
    tau = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    torch.testing.assert_close(ace_key([tau], eps=1.0), 0.75 * tau, rtol=0, atol=1e-7)
    a, b = torch.tensor([[math.sqrt(math.e)]]), torch.tensor([[math.exp(1.5)]])
    assert ace_heterogeneity([a, b]) == pytest.approx(0.5, rel=1e-6)
    assert math.isnan(ace_heterogeneity([a]))
    # the centring: a task vector whose rows are all equal has W_t = 0 and contributes nothing to a homogeneous key
    flat = torch.ones(3, 2) * 0.01
    assert float(ace_key([flat, flat]).abs().max()) == 0.0


def test_tiny_keys_skip_the_refinement_instead_of_nan():
    """r = 3 and k_frac = 0.3: k = 0, where the code's mean of no singular values writes NaN."""
    taus = overlapping((3, 5), 3, spread=30.0)
    assert plain_flag(taus)[0] and torch.isnan(plain_ace(taus)).all()
    ours = ace_key(taus)
    W0 = plain_ace(taus, k_frac=0.34, keep=0)  # k = 1 but no direction used: W_0 alone
    assert torch.isfinite(ours).all() and rel(ours, W0) <= 1e-6


def test_refinement_rank_above_the_rank_of_F_keeps_only_its_directions():
    """LoRA-like rank-2 tasks, 80 x 80, k = 24 > rank(F) (at most 18): the code's SVD would add arbitrary null-space
    directions; ours uses the determined ones, with the mean still over the k singular values."""
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(80, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 80, generator=g, dtype=torch.float64)
            * 1e-3 * 20 ** t for t in range(3)]  # exactly rank 2 (float64)
    assert plain_flag(taus)[0]
    s = torch.linalg.svdvals(plain_ace(taus, return_F=True))
    rank = int((s > 1e-9 * s[0]).sum())
    assert rank < int(80 * 0.3)
    assert rel(ace_key(taus), plain_ace(taus, keep=rank)) <= 1e-6


# ---------------------------------------------------------------------------------------------
# whole merges
# ---------------------------------------------------------------------------------------------
def states(T=3, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.attn.in_proj_weight": (24, 8), "blocks.0.mlp.c_proj.weight": (8, 20), "proj": (12, 12),
              "text_projection": (6, 6), "blocks.0.ln.weight": (12,), "conv1.weight": (4, 3, 2, 2)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    pre["steps"] = torch.tensor(3)
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{**{k: pre[k] + 0.1 * spread ** t * (shared[k] + torch.randn(s, generator=g)) for k, s in shapes.items()},
            "steps": torch.tensor(7)} for t in range(T)]
    return pre, fts


@pytest.mark.parametrize("spread", [1.0, 20.0], ids=["homogeneous", "heterogeneous"])
@pytest.mark.parametrize("coef", [1.0, 0.6])
def test_whole_merge_key_by_key(spread, coef):
    pre, fts = states(spread=spread)
    out = ace_merging(pre, fts, scaling_coef=coef)
    for k, v in pre.items():
        if not v.is_floating_point():
            assert torch.equal(out[k], v)
            continue
        taus = [ft[k].double() - v.double() for ft in fts]
        upd = plain_ace(taus) if v.dim() == 2 and k != "text_projection" else sum(taus) / len(taus)
        torch.testing.assert_close(out[k].double(), v.double() + coef * upd, rtol=1e-5, atol=1e-6)
        assert out[k].dtype == v.dtype
    assert list(out) == list(pre)


def test_lazy_files_equal_dicts(tmp_path):
    from helpers import save_models

    pre, fts = states(spread=20.0)
    lazy_pre, lazy_fts = save_models(tmp_path, pre, fts)
    a, b = ace_merging(pre, fts), ace_merging(lazy_pre, lazy_fts)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_refused():
    pre, fts = states()
    for kw in ({"eps": 0}, {"eps": -1.0}, {"eps": math.nan}, {"k_frac": -0.1}, {"k_frac": 1.5}, {"threshold": -1.0},
               {"threshold": math.nan}, {"eps": "abc"}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            ace_merging(pre, fts, **kw)
    with pytest.raises(TypeError, match="scaling_coef"):
        ace_merging(pre, fts, scaling_coef=[1.0, 1.0, 1.0])
    for option, value in (("eps", 0), ("k_frac", 2), ("threshold", -0.5), ("eps", "abc")):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=["paths.root=/tmp/val_work/ace", "method=ace_merging",
                                                f"method.{option}={value}"])
        with pytest.raises(ConfigError, match=rf"^method\.{option}="):
            check_options(cfg)


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
FAST = ["taskpool.tasks=[colors,position]", "model.train.steps=4", "model.train.warmup_steps=1",
        "model.train.batch_size=16", "model.train.checkpoint_every=10"]


def test_end_to_end_merge(make_cfg, tmp_path):
    from fusion_bench.families import build_family
    from fusion_bench.stages.finetune import finetuned_state

    cfg = make_cfg(*FAST, "method=ace_merging")
    report = run(cfg, tmp_path / "ace", "ace_merging")
    assert report["scaling_coef"] == 1.0 and all(0.0 <= r["merged"] <= 1.0 for r in report["tasks"].values())
    written = load_file(tmp_path / "ace" / "merged.safetensors")
    fam = build_family(cfg)
    want = ace_merging(fam.pretrained_state, [finetuned_state(fam, t) for t in fam.tasks])
    assert set(written) == set(want) and all(torch.equal(written[k], want[k].contiguous()) for k in want)
    assert all(torch.isfinite(v).all() for v in written.values() if v.is_floating_point())
