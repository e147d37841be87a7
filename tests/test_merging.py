"""Merging methods against plain references written here (and against peft's merge_utils)."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from helpers import save_models
from peft.utils import merge_utils as pm

import fusion_bench.merging.task_vectors as tv
from fusion_bench.merging import (
    LazyStateDict,
    awd_disentangle,
    awd_reference,
    awd_ta,
    awd_ties,
    dare,
    dare_mask,
    derived_seed,
    kth_largest,
    task_arithmetic,
    ties_merging,
    weight_average,
)
from fusion_bench.merging.awd import optimise_coefficients, optimise_full_space

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
FLOAT_KEYS = ["w1", "w2", "b", "s"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# fixtures and plain references
# ---------------------------------------------------------------------------------------------
def make_models(n_tasks: int = 4, seed: int = 0, dtype=torch.float32, scale: float = 0.1):
    """Random pretrained + finetuned state dicts: 4 float keys of different shapes, an int and a bool buffer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (6, 5), "w2": (4, 3, 2), "b": (7,), "s": ()}
    pre = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    pre["num_batches_tracked"] = torch.tensor([3, 1, 4], dtype=torch.int64)
    pre["mask"] = torch.tensor([True, False, True, True])
    fts = []
    for t in range(n_tasks):
        ft = {k: (pre[k].float() + scale * torch.randn(s, generator=g)).to(dtype) for k, s in shapes.items()}
        ft["num_batches_tracked"] = pre["num_batches_tracked"] + 10 * (t + 1)  # must NOT be merged
        ft["mask"] = ~pre["mask"]
        fts.append(ft)
    return pre, fts


def flat(sd, keys=FLOAT_KEYS, dtype=torch.float64):
    return torch.cat([sd[k].to(dtype).reshape(-1) for k in keys])


def unflat(vec, like, keys=FLOAT_KEYS):
    out, off = {}, 0
    for k in keys:
        m = like[k].numel()
        out[k] = vec[off : off + m].reshape(like[k].shape)
        off += m
    return out


def taus_flat(pre, fts):
    return [flat(ft) - flat(pre) for ft in fts]


def ref_trim(tau: torch.Tensor, k: float) -> torch.Tensor:
    """Keep |tau| >= the m-th largest |tau|, m = int(k * N) (sorted, brute force)."""
    m = int(k * tau.numel())
    if m == 0:
        return torch.zeros_like(tau)
    thr = sorted(tau.abs().tolist(), reverse=True)[m - 1]
    return torch.where(tau.abs() >= thr, tau, torch.zeros_like(tau))


def ref_elect_disjoint(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """Python loops: elected sign of the sum (0 -> +), mean over non-zero agreeing entries."""
    N = trimmed[0].numel()
    out = torch.zeros(N, dtype=torch.float64)
    for i in range(N):
        vals = [float(t[i]) for t in trimmed]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [v for v in vals if v != 0 and math.copysign(1.0, v) == sign]
        out[i] = sum(agree) / len(agree) if agree else 0.0
    return out


def ref_ties(taus: list[torch.Tensor], k: float) -> torch.Tensor:
    return ref_elect_disjoint([ref_trim(t, k) for t in taus])


def assert_buffers_copied(merged, pre):
    assert torch.equal(merged["num_batches_tracked"], pre["num_batches_tracked"])
    assert merged["num_batches_tracked"].dtype == torch.int64
    assert torch.equal(merged["mask"], pre["mask"]) and merged["mask"].dtype == torch.bool
    assert list(merged) == list(pre)


def assert_close_flat(merged, expected_flat, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(flat(merged), expected_flat, atol=atol, rtol=rtol)


@pytest.fixture(params=[None, 5], ids=["whole-keys", "chunk5"])
def chunk(request, monkeypatch):
    """Run a test with the default chunking and with tiny chunks (keys split over several chunks)."""
    if request.param is not None:
        monkeypatch.setattr(tv, "CHUNK", request.param)
    return request.param


# ---------------------------------------------------------------------------------------------
# hand-computed cases
# ---------------------------------------------------------------------------------------------
def hand_models():
    # two tasks, four entries, theta_0 = 1:
    #   tau_1 = [ 1, -2,  0.5,  0]
    #   tau_2 = [ 3,  1, -0.25, -1]
    pre = {"w": torch.ones(4)}
    fts = [
        {"w": torch.tensor([2.0, -1.0, 1.5, 1.0])},
        {"w": torch.tensor([4.0, 2.0, 0.75, 0.0])},
    ]
    return pre, fts


def test_task_arithmetic_hand_computed():
    pre, fts = hand_models()
    # 1 + 0.5 * (tau_1 + tau_2) = 1 + 0.5 * [4, -1, 0.25, -1] = [3, 0.5, 1.125, 0.5]
    out = task_arithmetic(pre, fts, scaling_coef=0.5)
    assert torch.equal(out["w"], torch.tensor([3.0, 0.5, 1.125, 0.5]))
    # per-task coefficients [1, -1] (negating task 2): 1 + tau_1 - tau_2 = [-1, -2, 1.75, 2]
    out = task_arithmetic(pre, fts, scaling_coef=[1.0, -1.0])
    assert torch.equal(out["w"], torch.tensor([-1.0, -2.0, 1.75, 2.0]))


def test_ties_hand_computed():
    pre, fts = hand_models()
    # k = 0.5 -> m = int(0.5 * 4) = 2 entries per task.
    #   |tau_1| = [1, 2, 0.5, 0]  -> threshold 1 -> trimmed_1 = [1, -2, 0, 0]
    #   |tau_2| = [3, 1, 0.25, 1] -> threshold 1 (tie!) -> ">= threshold keeps": [3, 1, 0, -1]
    #   sum = [4, -1, 0, -1] -> elected sign [+, -, + (zero sum elects +), -]
    #   disjoint mean: [(1+3)/2, -2 (the +1 disagrees), 0 (nothing kept), -1]
    #   theta = 1 + 1.0 * [2, -2, 0, -1] = [3, -1, 1, 0]
    out = ties_merging(pre, fts, k=0.5, scaling_coef=1.0)
    assert torch.equal(out["w"], torch.tensor([3.0, -1.0, 1.0, 0.0]))
    # lambda = 0.5: 1 + 0.5 * [2, -2, 0, -1]
    out = ties_merging(pre, fts, k=0.5, scaling_coef=0.5)
    assert torch.equal(out["w"], torch.tensor([2.0, 0.0, 1.0, 0.5]))


# ---------------------------------------------------------------------------------------------
# methods vs references
# ---------------------------------------------------------------------------------------------
def test_weight_average(chunk):
    pre, fts = make_models()
    out = weight_average(pre, fts)
    expected = torch.stack([flat(ft) for ft in fts]).mean(0)
    assert_close_flat(out, expected)
    assert_buffers_copied(out, pre)
    assert "scaling_coef" not in inspect.signature(weight_average).parameters


@pytest.mark.parametrize("coef", [0.3, [0.5, -1.0, 0.25, 1.0]])
def test_task_arithmetic_reference(coef, chunk):
    pre, fts = make_models()
    out = task_arithmetic(pre, fts, scaling_coef=coef)
    coefs = coef if isinstance(coef, list) else [coef] * len(fts)
    expected = flat(pre) + sum(c * tau for c, tau in zip(coefs, taus_flat(pre, fts)))
    assert_close_flat(out, expected)
    assert_buffers_copied(out, pre)
    assert all(out[k].dtype == torch.float32 for k in FLOAT_KEYS)


def test_task_negation():
    pre, fts = make_models(n_tasks=1)
    out = task_arithmetic(pre, fts, scaling_coef=-1.0)
    for k in FLOAT_KEYS:  # theta_0 - tau = 2 theta_0 - theta_1
        torch.testing.assert_close(out[k], 2 * pre[k] - fts[0][k])
    out = task_arithmetic(pre, fts, scaling_coef=[-0.5])
    for k in FLOAT_KEYS:
        torch.testing.assert_close(out[k], pre[k] - 0.5 * (fts[0][k] - pre[k]))


def test_task_arithmetic_wrong_list_length():
    pre, fts = make_models(n_tasks=3)
    with pytest.raises(ValueError, match="expected one float or a list of 3"):
        task_arithmetic(pre, fts, scaling_coef=[0.1, 0.2])


@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_ties_global_reference(k, chunk):
    pre, fts = make_models()
    out = ties_merging(pre, fts, k=k, scaling_coef=0.7)
    expected = flat(pre) + 0.7 * ref_ties(taus_flat(pre, fts), k)
    assert_close_flat(out, expected)
    assert_buffers_copied(out, pre)


def test_ties_per_tensor_reference_and_peft():
    pre, fts = make_models()
    k, lam = 0.3, 0.6
    out = ties_merging(pre, fts, k=k, scaling_coef=lam, per_tensor=True)
    for key in FLOAT_KEYS:
        taus = [ft[key] - pre[key] for ft in fts]
        ref = ref_ties([t.double().reshape(-1) for t in taus], k).reshape(pre[key].shape)
        torch.testing.assert_close(out[key].double(), pre[key].double() + lam * ref, atol=1e-6, rtol=1e-5)
        peft_m = pm.ties(taus, torch.ones(len(taus)), density=k)
        torch.testing.assert_close(out[key], pre[key] + lam * peft_m, atol=1e-6, rtol=1e-6)
    assert_buffers_copied(out, pre)


def test_ties_global_differs_from_per_tensor():
    pre, fts = make_models()
    a = ties_merging(pre, fts, k=0.2)
    b = ties_merging(pre, fts, k=0.2, per_tensor=True)
    assert not torch.allclose(flat(a), flat(b))


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, float("nan")])
def test_ties_bad_k(k):
    pre, fts = make_models()
    with pytest.raises(ValueError, match="k="):
        ties_merging(pre, fts, k=k)


# ---------------------------------------------------------------------------------------------
# DARE
# ---------------------------------------------------------------------------------------------
def peft_dropped(pre, fts, key, p, seed):
    """peft's random prune of each task vector, seeded like fusion_bench's per (seed, task, key) masks."""
    out = []
    for t, ft in enumerate(fts):
        torch.manual_seed(derived_seed(seed, t, key))
        out.append(pm.prune(ft[key] - pre[key], 1 - p, method="random", rescale=True))
    return out


def test_dare_task_arithmetic_matches_peft(chunk):
    pre, fts = make_models()
    p, seed, coefs = 0.6, 3, [0.3, 0.5, -0.2, 1.0]
    out = dare(pre, fts, p=p, seed=seed, scaling_coef=coefs)
    for key in FLOAT_KEYS:
        dropped = peft_dropped(pre, fts, key, p, seed)
        expected = pre[key] + pm.task_arithmetic(dropped, torch.tensor(coefs))
        torch.testing.assert_close(out[key], expected, atol=1e-6, rtol=1e-6)
        peft_lin = pm.dare_linear([ft[key] - pre[key] for ft in fts], torch.tensor(coefs), 1 - p)
        assert peft_lin.shape == out[key].shape
    assert_buffers_copied(out, pre)


def test_dare_ties_matches_peft(chunk):
    pre, fts = make_models()
    p, seed, lam = 0.5, 1, 0.8
    out = dare(pre, fts, p=p, seed=seed, base="ties", scaling_coef=lam)  # k defaults to 1.0: no trim
    for key in FLOAT_KEYS:
        stacked = torch.stack(peft_dropped(pre, fts, key, p, seed))
        # the steps of peft's dare_ties after its random prune
        mixed = pm.disjoint_merge(stacked, pm.calculate_majority_sign_mask(stacked, "total"))
        torch.testing.assert_close(out[key], pre[key] + lam * mixed, atol=1e-6, rtol=1e-6)


def test_dare_ties_with_trim_global_reference(chunk):
    pre, fts = make_models()
    p, seed, k, lam = 0.3, 7, 0.4, 0.5
    out = dare(pre, fts, p=p, seed=seed, base="ties", k=k, scaling_coef=lam)
    dropped = []
    for t, ft in enumerate(fts):
        parts = []
        for key in FLOAT_KEYS:
            mask = dare_mask(seed, t, key, pre[key].numel(), p).double()
            parts.append((ft[key].double() - pre[key].double()).reshape(-1) * mask / (1 - p))
        dropped.append(torch.cat(parts))
    assert_close_flat(out, flat(pre) + lam * ref_ties(dropped, k))


def test_dare_statistics_and_determinism():
    pre = {"w": torch.zeros(200_000)}
    fts = [{"w": torch.ones(200_000)}, {"w": 2 * torch.ones(200_000)}]
    p = 0.9
    a = dare(pre, fts, p=p, seed=0, scaling_coef=[1.0, 0.0])["w"]
    kept = a != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    torch.testing.assert_close(a[kept], torch.full_like(a[kept], 1 / (1 - p)))  # rescaled survivors
    assert torch.equal(a, dare(pre, fts, p=p, seed=0, scaling_coef=[1.0, 0.0])["w"])
    assert not torch.equal(a, dare(pre, fts, p=p, seed=1, scaling_coef=[1.0, 0.0])["w"])
    b = dare(pre, fts, p=p, seed=0, scaling_coef=[0.0, 1.0])["w"]
    assert not torch.equal(a != 0, b != 0)  # tasks get independent masks
    no_rescale = dare(pre, fts, p=p, seed=0, rescale=False, scaling_coef=[1.0, 0.0])["w"]
    assert torch.equal(no_rescale != 0, kept) and torch.all(no_rescale[kept] == 1)
    assert torch.equal(dare(pre, fts, p=0.0, scaling_coef=1.0)["w"], task_arithmetic(pre, fts, 1.0)["w"])


def test_dare_bad_args():
    pre, fts = make_models()
    with pytest.raises(ValueError, match="p="):
        dare(pre, fts, p=1.0)
    with pytest.raises(ValueError, match="base="):
        dare(pre, fts, base="magic")
    with pytest.raises(TypeError, match="unexpected"):
        dare(pre, fts, k=0.2)


# ---------------------------------------------------------------------------------------------
# AWD
# ---------------------------------------------------------------------------------------------
# Note on tolerances: past ~100 steps (or with large lr) |cos| gradient descent oscillates around
# its kinks and amplifies rounding differences chaotically; equivalence is tested in the stable regime.
def random_task_vectors(n=4, D=60, seed=0, shared=0.7, scale=0.1):
    # ||tau|| ~ 1: cosine gradients scale like 1/||tau|| against the constant alpha pull of ||delta||
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(D, generator=g, dtype=torch.float64)
    vs = [shared * common + torch.randn(D, generator=g, dtype=torch.float64) for _ in range(n)]
    return scale * torch.stack(vs)


@pytest.mark.parametrize("lr", [0.01, 0.05])  # larger steps oscillate chaotically: rounding then dominates
def test_awd_gram_form_equals_full_gradient_descent(lr):
    T = random_task_vectors()
    c, losses = optimise_coefficients(T @ T.T, alpha=0.1, lr=lr, iterations=300)
    ref_delta, ref_losses = awd_reference(T, alpha=0.1, lr=lr, iterations=300, optimizer="gd")
    delta = c @ T
    assert ref_delta.norm() > 1e-3 * T.norm(dim=1).mean()  # it did move
    torch.testing.assert_close(delta, ref_delta, rtol=1e-6, atol=1e-9 * ref_delta.norm().item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-9, atol=1e-12)
    assert losses[-1] < losses[0]


def test_awd_full_space_adam_equals_reference():
    T = random_task_vectors(seed=1)
    delta, losses = optimise_full_space(T, alpha=0.1, lr=0.01, iterations=100, optimizer="adam")
    ref_delta, ref_losses = awd_reference(T, alpha=0.1, lr=0.01, iterations=100, optimizer="adam")
    torch.testing.assert_close(delta, ref_delta, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-8, atol=1e-10)
    # full-space gd agrees with the Gram form too
    d_gd, _ = optimise_full_space(T, alpha=0.1, lr=0.2, iterations=50, optimizer="gd")
    c, _ = optimise_coefficients(T @ T.T, alpha=0.1, lr=0.2, iterations=50)
    torch.testing.assert_close(d_gd, c @ T, rtol=1e-8, atol=1e-10)


def awd_models():
    # a shared component makes the task vectors correlated (as real ones are)
    pre, fts = make_models(n_tasks=4, scale=0.05)
    g = torch.Generator().manual_seed(9)
    common = {k: 0.1 * torch.randn(pre[k].shape, generator=g) for k in FLOAT_KEYS}
    for ft in fts:
        for k in FLOAT_KEYS:
            ft[k] = ft[k] + common[k]
    return pre, fts


@pytest.mark.parametrize("optimizer", ["gd", "adam"])
def test_awd_ta_reference(optimizer, chunk):
    pre, fts = awd_models()
    lr, lam, it = 0.01, [0.3, 0.4, 0.2, 0.5], 100
    T = torch.stack(taus_flat(pre, fts))
    delta, _ = awd_reference(T, alpha=0.1, lr=lr, iterations=it, optimizer=optimizer)
    assert delta.norm() > 0.05 * T.norm(dim=1).mean()
    out = awd_ta(pre, fts, scaling_coef=lam, lr=lr, iterations=it, optimizer=optimizer)
    expected = flat(pre) + sum(c * (tau - delta) for c, tau in zip(lam, T))
    # Adam divides by sqrt(v): fp32 rounding of near-zero gradient entries moves single steps
    # (exactness in fp64 is test_awd_full_space_adam_equals_reference)
    assert_close_flat(out, expected, atol=1e-5 if optimizer == "gd" else 2e-4)
    assert_buffers_copied(out, pre)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_awd_ties_reference(per_tensor, chunk):
    pre, fts = awd_models()
    lr, k, lam, it = 0.01, 0.3, 0.6, 100
    T = torch.stack(taus_flat(pre, fts))
    delta, _ = awd_reference(T, alpha=0.1, lr=lr, iterations=it)
    hats = [tau - delta for tau in T]
    out = awd_ties(pre, fts, k=k, scaling_coef=lam, per_tensor=per_tensor, lr=lr, iterations=it)
    if per_tensor:
        hat_sd = [unflat(h, pre) for h in hats]
        expected = torch.cat([ref_ties([h[key].reshape(-1) for h in hat_sd], k) for key in FLOAT_KEYS])
    else:
        expected = ref_ties(hats, k)
    assert_close_flat(out, flat(pre) + lam * expected, atol=1e-5)
    assert_buffers_copied(out, pre)


def test_awd_diagnostics_and_logging(caplog):
    pre, fts = awd_models()
    with caplog.at_level("INFO", logger="fusion_bench.merging.awd"):
        res = awd_disentangle(pre, fts, iterations=100)
    assert res.loss_after < res.loss_before
    T = torch.stack(taus_flat(pre, fts))
    torch.testing.assert_close(res.mean_tau_norm, T.norm(dim=1).mean().item(), rtol=1e-5, atol=0)
    torch.testing.assert_close(res.delta_norm, (res.coefficients @ T).norm().item(), rtol=1e-5, atol=0)
    assert 0 < res.relative_delta_norm < 1
    assert "loss" in caplog.text and "ratio" in caplog.text
    assert set(res.summary()) >= {"loss_before", "loss_after", "delta_norm_over_mean_tau_norm"}


def test_awd_zero_iterations_is_plain_method():
    pre, fts = awd_models()
    a = awd_ta(pre, fts, scaling_coef=0.4, iterations=0)
    b = task_arithmetic(pre, fts, scaling_coef=0.4)
    torch.testing.assert_close(flat(a), flat(b))
    a = awd_ties(pre, fts, k=0.3, scaling_coef=0.4, iterations=0)
    b = ties_merging(pre, fts, k=0.3, scaling_coef=0.4)
    torch.testing.assert_close(flat(a), flat(b))


def test_awd_bad_args():
    pre, fts = awd_models()
    with pytest.raises(ValueError, match="at least 2"):
        awd_ta(pre, fts[:1])
    with pytest.raises(ValueError, match="optimizer"):
        awd_ta(pre, fts, optimizer="sgd")


# ---------------------------------------------------------------------------------------------
# kth_largest
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["random", "duplicates", "zeros", "tiny"])
def test_kth_largest_exact(case):
    g = torch.Generator().manual_seed(0)
    x = {
        "random": torch.randn(10_000, generator=g).abs() * 1e-3,
        "duplicates": torch.randint(0, 5, (5_000,), generator=g).float() / 7,
        "zeros": torch.cat([torch.zeros(900), torch.rand(100, generator=g)]),
        "tiny": torch.tensor([0.0, 1e-45, 2e-45, 1e-38, 3.0e38, float("inf")]),
    }[case]
    srt = x.sort(descending=True).values
    for m in [1, 2, x.numel() // 5, x.numel() // 2, x.numel() - 1, x.numel()]:
        assert kth_largest(x, m, chunk=777) == srt[m - 1].item()
    assert kth_largest(x, 0) == math.inf
    assert kth_largest(x, x.numel() + 5) == srt[-1].item()


# ---------------------------------------------------------------------------------------------
# dtypes, lazy loading, validation
# ---------------------------------------------------------------------------------------------
def test_bf16_inputs_are_computed_in_fp32():
    # 8 tasks each move 1.0 by one bf16 ulp (2^-7). Accumulating lambda*tau in bf16 rounds every
    # update (0.3 * 2^-7 < half an ulp) away and stays at 1.0; fp32 gives 1 + 8*0.3*2^-7 = 1.01875,
    # which rounds to the bf16 value 1.015625.
    pre = {"w": torch.ones(3, dtype=torch.bfloat16)}
    fts = [{"w": torch.full((3,), 1 + 2**-7, dtype=torch.bfloat16)} for _ in range(8)]
    out = task_arithmetic(pre, fts, scaling_coef=0.3)["w"]
    assert out.dtype == torch.bfloat16
    assert torch.all(out == 1.015625)
    naive = pre["w"].clone()
    for ft in fts:
        naive += 0.3 * (ft["w"] - pre["w"])
    assert torch.all(naive == 1.0)  # what bf16 arithmetic would have produced
    # random bf16 models: every method equals the fp32 reference rounded once to bf16
    pre, fts = make_models(dtype=torch.bfloat16)
    out = ties_merging(pre, fts, k=0.3, scaling_coef=0.5)
    expected = (flat(pre) + 0.5 * ref_ties(taus_flat(pre, fts), 0.3)).to(torch.bfloat16)
    assert all(out[k].dtype == torch.bfloat16 for k in FLOAT_KEYS)
    torch.testing.assert_close(flat(out, dtype=torch.bfloat16), expected, atol=0, rtol=2**-8)


def test_mixed_dtypes_fp16_finetuned():
    pre, fts = make_models()
    fts16 = [{k: (v.half() if v.is_floating_point() else v) for k, v in ft.items()} for ft in fts]
    out = task_arithmetic(pre, fts16, scaling_coef=0.3)
    expected = flat(pre) + 0.3 * sum(flat(ft) - flat(pre) for ft in fts16)
    assert_close_flat(out, expected)


METHODS = [
    (weight_average, {}),
    (task_arithmetic, {"scaling_coef": [0.3, -0.2, 0.5, 0.1]}),
    (ties_merging, {"k": 0.3}),
    (ties_merging, {"k": 0.3, "per_tensor": True}),
    (dare, {"p": 0.5}),
    (dare, {"p": 0.5, "base": "ties", "k": 0.5}),
    (awd_ta, {"iterations": 100}),
    (awd_ties, {"iterations": 100}),
    (awd_ties, {"optimizer": "adam", "iterations": 20}),
]


@pytest.mark.parametrize(("fn", "kw"), METHODS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_lazy_safetensors_equals_dicts(tmp_path, fn, kw):
    pre, fts = awd_models()
    lpre, lfts = save_models(tmp_path, pre, fts)
    a = fn(pre, fts, **kw)
    b = fn(lpre, lfts, **kw)
    assert list(b) == list(lpre)  # the pretrained mapping's order (safetensors stores keys sorted)
    assert set(a) == set(b)
    for key in a:
        if fn in (awd_ta, awd_ties):  # Gram sums run in the other key order: last-bit differences
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a[key], b[key]), key
    assert torch.equal(b["num_batches_tracked"], pre["num_batches_tracked"])
    assert torch.equal(b["mask"], pre["mask"])


def test_lazy_state_dict_mapping(tmp_path):
    pre, fts = make_models(n_tasks=1)
    lpre, _ = save_models(tmp_path, pre, fts)
    assert len(lpre) == len(pre) and set(lpre) == set(pre) and "w1" in lpre
    assert lpre.shape("w2") == pre["w2"].shape and lpre.dtype("mask") == torch.bool
    w = lpre["w1"]
    assert torch.equal(w, pre["w1"])
    w.add_(1.0)  # copy-on-write: the file is untouched
    assert torch.equal(LazyStateDict(lpre.path)["w1"], pre["w1"])
    with pytest.raises(KeyError, match="pretrained.safetensors"):
        lpre["nope"]


def test_lazy_state_dict_remaps_and_pickles(tmp_path, monkeypatch):
    import gc
    import pickle

    pre, fts = make_models(n_tasks=2)
    lpre, lfts = save_models(tmp_path, pre, fts)
    held = lpre["w1"]
    monkeypatch.setattr(LazyStateDict, "remap_bytes", 1)  # a new mapping for every access
    others = [lpre[k] for k in ("w2", "b", "s")]
    lpre.close()
    gc.collect()
    assert torch.equal(held, pre["w1"])  # tensors keep their own mapping alive
    assert all(torch.equal(o, pre[k]) for o, k in zip(others, ("w2", "b", "s")))
    a = ties_merging(lpre, lfts, k=0.3)
    clone = pickle.loads(pickle.dumps(lpre))
    assert clone.path == lpre.path and torch.equal(clone["w2"], pre["w2"])
    b = ties_merging(pre, fts, k=0.3)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_numpy_and_tensor_hyperparameters():
    np = pytest.importorskip("numpy")
    pre, fts = make_models()
    a = ties_merging(pre, fts, k=np.float32(0.25), scaling_coef=np.float64(0.5))
    b = ties_merging(pre, fts, k=0.25, scaling_coef=torch.tensor(0.5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="string"):
        task_arithmetic(pre, fts, scaling_coef="search")


def test_mismatch_errors_name_key_and_file(tmp_path):
    pre, fts = make_models(n_tasks=2)
    bad = dict(fts[1])
    bad["w2"] = torch.zeros(4, 3, 3)
    with pytest.raises(ValueError, match=r"'w2'.*finetuned\[1\]"):
        task_arithmetic(pre, [fts[0], bad])
    missing = {k: v for k, v in fts[1].items() if k != "b"}
    with pytest.raises(ValueError, match=r"'b'.*missing from finetuned\[1\]"):
        ties_merging(pre, [fts[0], missing])
    extra = dict(fts[0], extra_key=torch.zeros(2))
    with pytest.raises(ValueError, match=r"'extra_key'.*finetuned\[0\]"):
        awd_ta(pre, [extra, fts[1]])
    lpre, lfts = save_models(tmp_path, pre, [fts[0], bad])
    with pytest.raises(ValueError, match=r"'w2'.*task1\.safetensors"):
        dare(lpre, lfts)
    with pytest.raises(ValueError, match="no finetuned checkpoints"):
        weight_average(pre, [])
    with pytest.raises(TypeError, match="sequence"):
        task_arithmetic(pre, fts[0])


# ---------------------------------------------------------------------------------------------
# Hydra configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["weight_average", "task_arithmetic", "ties", "dare", "dare_ties", "awd", "awd_ta", "awd_ties"]
)
def test_method_configs_instantiate(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert "name" not in cfg
    fn = instantiate(cfg)
    pre, fts = awd_models()
    params = inspect.signature(fn).parameters
    if name == "weight_average":
        assert "scaling_coef" not in params
        out = fn(pre, fts)
    else:
        assert "scaling_coef" in params
        out = fn(pre, fts, scaling_coef=0.25)  # the pipeline overrides the YAML's value
    assert list(out) == list(pre)
    assert_buffers_copied(out, pre)
