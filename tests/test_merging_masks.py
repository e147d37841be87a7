"""Consensus / TALL masks / EMR / Breadcrumbs / MagMax / Model Stock against plain references written here."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from helpers import save_models

import fusion_bench.merging.task_vectors as tv
from fusion_bench.merging import (
    TaskSpecificMerge,
    breadcrumbs,
    consensus_merging,
    emr_merging,
    kth_largest,
    magmax,
    model_stock,
    tall_mask_lambda_grid,
    tall_masks,
    task_arithmetic,
)
from fusion_bench.merging.breadcrumbs import kth_largest_pair

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
KEYS = ["w", "b", "v"]
SHAPES = {"w": (6, 5), "b": (7,), "v": (3, 4)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=[None, 5], ids=["default-chunks", "chunk5"])
def chunk(request, monkeypatch):
    """Default column chunks, and tiny ones (keys split over several chunks)."""
    if request.param is not None:
        monkeypatch.setattr(tv, "CHUNK", request.param)
    return request.param


# ---------------------------------------------------------------------------------------------
# inputs and plain references (fp64, per key, straight from the definitions)
# ---------------------------------------------------------------------------------------------
def make_models(n_tasks: int = 4, seed: int = 0, dtype=torch.float32, scale: float = 0.1):
    """pretrained + finetuned: float keys (6,5), (7,), (3,4), an int64 and a bool buffer."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    pre["steps"] = torch.tensor([3, 1, 4], dtype=torch.int64)
    pre["flag"] = torch.tensor([True, False])
    shared = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}  # correlated task vectors
    fts = []
    for t in range(n_tasks):
        ft = {
            k: (pre[k].float() + scale * (0.5 * shared[k] + torch.randn(s, generator=g))).to(dtype)
            for k, s in SHAPES.items()
        }
        ft["steps"] = pre["steps"] + 10 * (t + 1)  # must not be merged
        ft["flag"] = ~pre["flag"]
        fts.append(ft)
    return pre, fts


def taus(pre, fts):
    """taus[t][key], fp64."""
    return [{k: ft[k].double() - pre[k].double() for k in KEYS} for ft in fts]


def ref_ties_vector(tau_list, k, agg="sum"):
    """Consensus-TIES's merged vector (no lambda) over the whole flattened vector, plain torch: the
    official code keeps |tau| >= the (int(k n) + 1)-th largest, then a disjoint sum (or mean)."""
    flat_taus = [torch.cat([tau[key].reshape(-1) for key in KEYS]) for tau in tau_list]
    trimmed = []
    for x in flat_taus:
        m = int(k * x.numel()) + 1
        thr = torch.sort(x.abs(), descending=True).values[m - 1]
        trimmed.append(torch.where(x.abs() >= thr, x, torch.zeros_like(x)))
    out = torch.zeros_like(flat_taus[0])
    for i in range(out.numel()):
        vals = [float(t[i]) for t in trimmed]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [v for v in vals if v != 0 and math.copysign(1.0, v) == sign]
        out[i] = (sum(agree) / (len(agree) if agg == "mean" else 1)) if agree else 0.0
    res, off = {}, 0
    for key in KEYS:
        n = math.prod(SHAPES[key])
        res[key] = out[off : off + n].reshape(SHAPES[key])
        off += n
    return res


def ref_mtl(tau_list, base, ties_k=0.2, agg="sum"):
    if base == "ties":
        return ref_ties_vector(tau_list, ties_k, agg)
    return {key: sum(tau[key] for tau in tau_list) for key in KEYS}


def ref_tall(tau_list, lambdas, base, ties_k=0.2, agg="sum"):
    mtl = ref_mtl(tau_list, base, ties_k, agg)
    masks = [
        {key: tau[key].abs() >= lam * (mtl[key] - tau[key]).abs() for key in KEYS}
        for tau, lam in zip(tau_list, lambdas)
    ]
    return mtl, masks


def ref_consensus(pre, fts, k, lambdas, alpha, base, ties_k=0.2, agg="sum"):
    tau_list = taus(pre, fts)
    mtl, masks = ref_tall(tau_list, lambdas, base, ties_k, agg)
    out = {}
    for key in KEYS:
        count = sum(m[key].double() for m in masks)
        out[key] = pre[key].double() + alpha * (count >= k).double() * mtl[key]
    return out


def ref_emr(pre, fts):
    """Literally the reference code: flag = (sum > 0) * 2 - 1, max of agreeing |tau|, per-key means."""
    tau_list = taus(pre, fts)
    uni, masks = {}, [{} for _ in fts]
    for key in KEYS:
        flag = (sum(tau[key] for tau in tau_list) > 0).double() * 2 - 1
        param_max = torch.zeros(SHAPES[key], dtype=torch.float64)
        for t, tau in enumerate(tau_list):
            mask = (tau[key] * flag) > 0
            masks[t][key] = mask
            param_abs = (mask * tau[key]).abs()
            param_max = torch.where(param_abs > param_max, param_abs, param_max)
        uni[key] = param_max * flag
    scales = []
    for t, tau in enumerate(tau_list):
        abs_mean_uni = sum(torch.mean((uni[key] * masks[t][key]).abs()) for key in KEYS)
        abs_mean_t = sum(torch.mean(tau[key].abs()) for key in KEYS)
        scales.append(float(abs_mean_t / abs_mean_uni))
    return uni, masks, scales


def ref_breadcrumbs_mask(x, density, gamma):
    """Rank-based: sort |x| descending, drop the first int(gamma n), keep the next int(density n)."""
    if x.dim() == 0:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.abs().reshape(-1)
    n = a.numel()
    n_top, n_keep = int(gamma * n), int(density * n)
    order = torch.argsort(a, descending=True)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n_top : n_top + n_keep]] = True
    return keep.reshape(x.shape)


def ref_breadcrumbs(pre, fts, density, gamma, coefs):
    tau_list = taus(pre, fts)
    return {
        key: pre[key].double()
        + sum(
            c * tau[key] * ref_breadcrumbs_mask(tau[key], density, gamma) for c, tau in zip(coefs, tau_list)
        )
        for key in KEYS
    }


def ref_magmax(pre, fts, lam):
    tau_list = taus(pre, fts)
    out = {}
    for key in KEYS:
        flat_taus = [tau[key].reshape(-1) for tau in tau_list]
        sel = torch.zeros_like(flat_taus[0])
        for i in range(sel.numel()):
            best = 0
            for t in range(1, len(flat_taus)):
                if abs(float(flat_taus[t][i])) > abs(float(flat_taus[best][i])):
                    best = t
            sel[i] = flat_taus[best][i]
        out[key] = pre[key].double() + lam * sel.reshape(SHAPES[key])
    return out


def ref_model_stock(pre, fts):
    out = {}
    k = len(fts)
    for key in pre:
        if not pre[key].is_floating_point():
            continue
        vecs = [ft[key].double().reshape(-1) - pre[key].double().reshape(-1) for ft in fts]
        if any(float(v.norm()) == 0 for v in vecs):
            t = 0.0
        else:
            cosines = [
                float(torch.dot(vecs[i], vecs[j]) / (vecs[i].norm() * vecs[j].norm()))
                for i in range(k)
                for j in range(i + 1, k)
            ]
            cos = sum(cosines) / len(cosines)
            t = k * cos / (1 + (k - 1) * cos)
        mean_ft = sum(ft[key].double() for ft in fts) / k
        out[key] = t * mean_ft + (1 - t) * pre[key].double()
    return out


def assert_close(out, ref, keys=KEYS, atol=1e-6, rtol=1e-5):
    for key in keys:
        assert out[key].shape == ref[key].shape, key
        torch.testing.assert_close(out[key].double(), ref[key], atol=atol, rtol=rtol, msg=key)


def assert_buffers(out, pre):
    assert list(out) == list(pre)
    assert torch.equal(out["steps"], pre["steps"]) and out["steps"].dtype == torch.int64
    assert torch.equal(out["flag"], pre["flag"]) and out["flag"].dtype == torch.bool


def differs(a, b, keys=KEYS):
    return any(not torch.allclose(a[k].double(), b[k].double(), atol=1e-6) for k in keys)


# ---------------------------------------------------------------------------------------------
# TaskSpecificMerge by hand
# ---------------------------------------------------------------------------------------------
def hand_task_specific(dtype=torch.float32):
    pre = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=dtype), "n": torch.tensor([7, 8], dtype=torch.int64)}
    shared = {"w": torch.tensor([10.0, 20.0, 30.0])}
    masks = {"w": torch.tensor([[True, False, True], [False, True, True]])}
    return pre, TaskSpecificMerge(pre, shared, masks, rescalers=[1.0, 0.5], method="hand", rescaler_bits=32)


def test_task_specific_merge_by_hand():
    pre, tsm = hand_task_specific()
    assert tsm.n_tasks == 2 and tsm.n_params == 3
    w0, w1 = tsm.task_weights(0), tsm.task_weights(1)
    assert list(w0) == ["w", "n"]
    assert torch.equal(w0["w"], torch.tensor([11.0, 2.0, 33.0]))
    assert torch.equal(w1["w"], torch.tensor([1.0, 12.0, 18.0]))  # 1 + 0, 2 + 0.5*20, 3 + 0.5*30
    assert torch.equal(w1["n"], pre["n"]) and w1["n"] is not pre["n"]
    assert torch.equal(tsm.mask(1)["w"], torch.tensor([False, True, True]))
    # task bits: 3 mask bits + 32 rescaler bits over 3 parameters
    assert tsm.bits_per_parameter(0) == pytest.approx(35 / 3)
    assert tsm.task_bits(1) == 35
    # shared 32*3 + tasks 2*35 + pretrained (3 fp32 + 2 int64)
    assert tsm.total_storage_bits(include_pretrained=False) == 96 + 70
    assert tsm.total_storage_bits() == 96 + 70 + 3 * 32 + 2 * 64
    summary = tsm.storage_summary()
    assert summary["task_bits_per_parameter"] == [pytest.approx(35 / 3)] * 2
    # without a stored rescaler (TALL masks): exactly one bit per parameter
    tall = TaskSpecificMerge(pre, tsm.shared, tsm.masks, [1.0, 1.0], rescaler_bits=0)
    assert tall.bits_per_parameter(1) == 1.0
    with pytest.raises(IndexError, match="t=2"):
        tsm.task_weights(2)


def test_task_specific_merge_dtypes_and_validation():
    pre, tsm = hand_task_specific(torch.bfloat16)
    out = tsm.task_weights(1)
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], torch.tensor([1.0, 12.0, 18.0], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bool"):
        TaskSpecificMerge(pre, tsm.shared, {"w": tsm.masks["w"].float()}, [1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        TaskSpecificMerge(pre, tsm.shared, tsm.masks, [1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# hand-computed method cases
# ---------------------------------------------------------------------------------------------
def test_emr_hand_computed():
    # key a: tau_1 = [1, -2, 3, 0.5], tau_2 = [2, 1, -4, -0.5]; sum [3, -1, -1, 0] -> gamma [+, -, -, -]
    #   M_1 = [1, 1, 0, 0], M_2 = [1, 0, 1, 1], tau_uni = [2, -2, -4, -0.5]
    # key b: tau_1 = [1, 1], tau_2 = [-3, 0]; sum [-2, 1] -> gamma [-, +]
    #   M_1 = [0, 1], M_2 = [1, 0], tau_uni = [-3, 1]
    # l_1 = (6.5/4 + 2/2) / (4/4 + 1/2) = 1.75     (one mean over all 6 entries would give 1.7)
    # l_2 = (7.5/4 + 3/2) / (6.5/4 + 3/2) = 1.08
    pre = {"a": torch.zeros(4), "b": torch.ones(2)}
    fts = [
        {"a": torch.tensor([1.0, -2.0, 3.0, 0.5]), "b": torch.tensor([2.0, 2.0])},
        {"a": torch.tensor([2.0, 1.0, -4.0, -0.5]), "b": torch.tensor([-2.0, 1.0])},
    ]
    r = emr_merging(pre, fts)
    assert isinstance(r, TaskSpecificMerge) and r.n_tasks == 2
    assert torch.equal(r.shared["a"], torch.tensor([2.0, -2.0, -4.0, -0.5]))
    assert torch.equal(r.shared["b"], torch.tensor([-3.0, 1.0]))
    assert torch.equal(r.masks["a"], torch.tensor([[True, True, False, False], [True, False, True, True]]))
    assert torch.equal(r.masks["b"], torch.tensor([[False, True], [True, False]]))
    assert r.rescalers == pytest.approx([1.75, 1.08])
    torch.testing.assert_close(r.task_weights(0)["a"], torch.tensor([3.5, -3.5, 0.0, 0.0]))
    torch.testing.assert_close(r.task_weights(0)["b"], torch.tensor([1.0, 2.75]))
    torch.testing.assert_close(r.task_weights(1)["a"], 1.08 * torch.tensor([2.0, 0.0, -4.0, -0.5]))
    torch.testing.assert_close(r.task_weights(1)["b"], torch.tensor([1 - 3 * 1.08, 1.0]))
    assert r.bits_per_parameter(0) == pytest.approx((6 + 32) / 6)


def test_tall_and_consensus_hand_computed():
    # tau_1 = [1, 0.1, -1], tau_2 = [1, 2, 1]; tau_MTL = [2, 2.1, 0]; lambda = 0.5
    #   m_1: [1 >= 0.5, 0.1 >= 1.0, 1 >= 0.5] = [T, F, T];  m_2: [1 >= 0.5, 2 >= 0.05, 1 >= 0.5] = [T, T, T]
    #   consensus (k = 2): count [2, 1, 2] -> [T, F, T]; update alpha * [2, 0, 0]
    pre = {"w": torch.zeros(3)}
    fts = [{"w": torch.tensor([1.0, 0.1, -1.0])}, {"w": torch.tensor([1.0, 2.0, 1.0])}]
    r = tall_masks(pre, fts, lambdas=0.5)
    assert torch.equal(r.masks["w"], torch.tensor([[True, False, True], [True, True, True]]))
    torch.testing.assert_close(r.shared["w"], torch.tensor([2.0, 2.1, 0.0]))
    torch.testing.assert_close(r.task_weights(0)["w"], torch.tensor([2.0, 0.0, 0.0]))
    assert r.rescalers == [1.0, 1.0] and r.bits_per_parameter(0) == 1.0
    out = consensus_merging(pre, fts, k=2, lambdas=0.5, scaling_coef=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 0.0, 0.0]))
    out1 = consensus_merging(pre, fts, k=1, lambdas=0.5, scaling_coef=0.5)  # union: plain TA here
    torch.testing.assert_close(out1["w"], task_arithmetic(pre, fts, scaling_coef=0.5)["w"])
    # per-task lambdas: lambda_1 = 0.05 lets entry 2 through (0.1 >= 0.05 * 2)
    r2 = tall_masks(pre, fts, lambdas=[0.05, 0.5])
    assert torch.equal(r2.masks["w"][0], torch.tensor([True, True, True]))


def test_breadcrumbs_hand_computed():
    # |tau| = 1..10: gamma 0.1 drops the top 1 (10), density 0.5 keeps the next 5 (9..5), drops 4..1
    tau = torch.tensor([3.0, -10.0, 5.0, -1.0, 9.0, 2.0, -7.0, 8.0, -4.0, 6.0])
    pre = {"w": torch.zeros(10), "s": torch.tensor(2.0)}
    fts = [{"w": tau, "s": torch.tensor(3.0)}]
    out = breadcrumbs(pre, fts, density=0.5, gamma=0.1, scaling_coef=1.0)
    expected = torch.tensor([0.0, 0.0, 5.0, 0.0, 9.0, 0.0, -7.0, 8.0, 0.0, 6.0])
    assert torch.equal(out["w"], expected)
    assert out["s"].item() == 3.0  # 0-d keys are not masked
    # density 1 and gamma 0: plain task arithmetic
    out = breadcrumbs(pre, fts, density=1.0, gamma=0.0, scaling_coef=1.0)
    assert torch.equal(out["w"], tau)
    # tiny density: int(0.05 * 10) = 0 entries kept
    assert torch.equal(breadcrumbs(pre, fts, density=0.05, gamma=0.0)["w"], torch.zeros(10))


def test_kth_largest_pair_exact():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g).abs()
    x[:700] = x[700:1400]  # repeated values
    x[1400:1500] = 0.0
    srt = torch.sort(x, descending=True).values
    n = x.numel()
    for m1, m2 in [(1, 2), (30, 750), (750, 30), (0, 100), (100, 0), (n - 1, n), (7, 7), (n + 3, 1)]:
        a, b = kth_largest_pair(x, m1, m2)
        assert a == (srt[min(m1, n) - 1].item() if m1 > 0 else math.inf)
        assert b == (srt[min(m2, n) - 1].item() if m2 > 0 else math.inf)
        assert (a, b) == (kth_largest(x, m1), kth_largest(x, m2))
    assert kth_largest_pair(x, 0, 0) == (math.inf, math.inf)


def test_magmax_hand_computed():
    # tau_1 = [1, -3, 2, 2], tau_2 = [-2, 1, 2, -2]: [-2, -3, 2 (tie), 2 (tie, opposite signs: first task)]
    pre = {"w": torch.zeros(4)}
    fts = [{"w": torch.tensor([1.0, -3.0, 2.0, 2.0])}, {"w": torch.tensor([-2.0, 1.0, 2.0, -2.0])}]
    out = magmax(pre, fts, scaling_coef=0.5)
    assert torch.equal(out["w"], torch.tensor([-1.0, -1.5, 1.0, 1.0]))


def test_model_stock_hand_computed():
    pre = {"a": torch.zeros(2), "b": torch.zeros(2), "z": torch.ones(3)}
    fts = [
        {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 0.0]), "z": torch.tensor([1.0, 1.0, 1.0])},
        {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0, 1.0]), "z": torch.tensor([2.0, 1.0, 0.0])},
    ]
    out = model_stock(pre, fts)
    assert torch.equal(out["a"], torch.zeros(2))  # orthogonal: cos 0 -> t = 0
    c = 1 / math.sqrt(2)  # cos 45 degrees; t = 2c / (1 + c) = 0.5858; mean theta = [1, 0.5]
    t = 2 * c / (1 + c)
    torch.testing.assert_close(out["b"], torch.tensor([t, 0.5 * t]))
    assert torch.equal(out["z"], torch.ones(3))  # task 1's vector is zero: t = 0, theta_0 kept


# ---------------------------------------------------------------------------------------------
# random models against the references
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["task_arithmetic", "ties", "ties-mean"])
def test_consensus_reference(base, chunk):
    pre, fts = make_models()
    lams = [0.3, 0.5, 0.2, 0.6]
    base, _, agg = base.partition("-")
    kw = {"ties_agg": agg} if agg else {}
    out = consensus_merging(pre, fts, k=2, lambdas=lams, base=base, scaling_coef=0.7, ties_k=0.3, **kw)
    ref = ref_consensus(pre, fts, 2, lams, 0.7, base, ties_k=0.3, agg=agg or "sum")
    assert_close(out, ref)
    assert_buffers(out, pre)
    if base == "task_arithmetic":
        assert differs(out, task_arithmetic(pre, fts, scaling_coef=0.7))
    # some entries are dropped, but not all
    dropped = sum(int((out[k] == pre[k]).sum()) for k in KEYS)
    assert 0 < dropped < sum(pre[k].numel() for k in KEYS)


def test_consensus_k_changes_the_mask():
    pre, fts = make_models()
    outs = [consensus_merging(pre, fts, k=k, lambdas=0.4, scaling_coef=0.5) for k in (1, 2, 3, 4)]
    for k, out in zip((1, 2, 3, 4), outs):
        assert_close(out, ref_consensus(pre, fts, k, [0.4] * 4, 0.5, "task_arithmetic"))
    kept = [sum(int((o[key] != pre[key]).sum()) for key in KEYS) for o in outs]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]


@pytest.mark.parametrize("base", ["task_arithmetic", "ties", "ties-mean"])
def test_tall_masks_reference(base, chunk):
    pre, fts = make_models()
    lams = [0.2, 0.4, 0.6, 0.3]
    base, _, agg = base.partition("-")
    kw = {"ties_agg": agg} if agg else {}
    r = tall_masks(pre, fts, lambdas=lams, base=base, ties_k=0.3, **kw)
    mtl, masks = ref_tall(taus(pre, fts), lams, base, ties_k=0.3, agg=agg or "sum")
    assert r.n_tasks == 4 and r.rescalers == [1.0] * 4 and r.n_params == 30 + 7 + 12
    for key in KEYS:
        assert r.shared[key].dtype == torch.float32 and r.masks[key].dtype == torch.bool
        torch.testing.assert_close(r.shared[key].double(), mtl[key], atol=1e-6, rtol=1e-5)
        for t in range(4):
            assert torch.equal(r.masks[key][t], masks[t][key]), (key, t)
    for t in range(4):
        w = r.task_weights(t)
        assert_buffers(w, pre)
        assert_close(w, {key: pre[key].double() + masks[t][key] * mtl[key] for key in KEYS})
        assert r.bits_per_parameter(t) == 1.0
    assert differs(r.task_weights(0), task_arithmetic(pre, fts, scaling_coef=1.0))
    assert tall_mask_lambda_grid == (0.2, 0.3, 0.4, 0.5, 0.6)


def test_emr_reference(chunk):
    pre, fts = make_models()
    r = emr_merging(pre, fts)
    uni, masks, scales = ref_emr(pre, fts)
    assert r.rescalers == pytest.approx(scales, rel=1e-5)
    for key in KEYS:
        torch.testing.assert_close(r.shared[key].double(), uni[key], atol=1e-7, rtol=1e-6)
        for t in range(4):
            assert torch.equal(r.masks[key][t], masks[t][key]), (key, t)
    for t in range(4):
        w = r.task_weights(t)
        assert_buffers(w, pre)
        assert_close(w, {key: pre[key].double() + scales[t] * masks[t][key] * uni[key] for key in KEYS})
    assert r.bits_per_parameter(0) == pytest.approx(1 + 32 / 49)
    assert differs(r.task_weights(0), task_arithmetic(pre, fts, scaling_coef=1.0))


def test_emr_zero_sum_elects_minus():
    # sum of the task vectors is exactly 0 at entry 0: gamma = -1 there, so only the negative task agrees
    pre = {"w": torch.zeros(2)}
    fts = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([-1.0, 1.0])}]
    r = emr_merging(pre, fts)
    assert torch.equal(r.shared["w"], torch.tensor([-1.0, 1.0]))
    assert torch.equal(r.masks["w"], torch.tensor([[False, True], [True, True]]))
    # a task that never agrees with the elected sign keeps theta_0 (rescaler 1, no division by zero)
    r = emr_merging(pre, [{"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([-1.0, -1.0])}])
    assert r.rescalers[1] == 1.0 and torch.equal(r.task_weights(1)["w"], torch.zeros(2))


@pytest.mark.parametrize(("density", "gamma"), [(0.15, 0.006), (0.5, 0.1), (0.9, 0.05), (0.3, 0.0)])
def test_breadcrumbs_reference(density, gamma):
    pre, fts = make_models()
    coefs = [0.3, 0.5, 0.2, 0.4]
    out = breadcrumbs(pre, fts, density=density, gamma=gamma, scaling_coef=coefs)
    assert_close(out, ref_breadcrumbs(pre, fts, density, gamma, coefs))
    assert_buffers(out, pre)
    assert differs(out, task_arithmetic(pre, fts, scaling_coef=coefs))
    one = breadcrumbs(pre, fts, density=density, gamma=gamma, scaling_coef=0.3)
    assert_close(one, ref_breadcrumbs(pre, fts, density, gamma, [0.3] * 4))


def test_magmax_reference(chunk):
    pre, fts = make_models()
    out = magmax(pre, fts, scaling_coef=0.8)
    assert_close(out, ref_magmax(pre, fts, 0.8))
    assert_buffers(out, pre)
    assert differs(out, task_arithmetic(pre, fts, scaling_coef=0.8))


def test_model_stock_reference():
    pre, fts = make_models()
    pre["z"] = torch.randn(5)
    for ft in fts:
        ft["z"] = pre["z"].clone()  # no fine-tune moved this key
    fts[1]["z"] = pre["z"] + 1.0
    out = model_stock(pre, fts)
    ref = ref_model_stock(pre, fts)
    assert_close(out, ref, keys=[*KEYS, "z"])
    assert torch.equal(out["z"], pre["z"])  # three of four task vectors are zero: t = 0
    assert differs(out, task_arithmetic(pre, fts, scaling_coef=1 / 4))
    assert differs(out, task_arithmetic(pre, fts, scaling_coef=1.0))


# ---------------------------------------------------------------------------------------------
# lazy inputs, dtypes, errors, configs
# ---------------------------------------------------------------------------------------------
METHODS = [
    (consensus_merging, {"lambdas": [0.3, 0.4, 0.5, 0.2]}),
    (consensus_merging, {"base": "ties", "ties_k": 0.4}),
    (consensus_merging, {"base": "ties", "ties_k": 0.4, "ties_agg": "mean"}),
    (tall_masks, {"lambdas": 0.3}),
    (tall_masks, {"base": "ties"}),
    (emr_merging, {}),
    (breadcrumbs, {"density": 0.5, "gamma": 0.1}),
    (magmax, {}),
    (model_stock, {}),
]
IDS = [f"{fn.__name__}-{i}" for i, (fn, _) in enumerate(METHODS)]


def as_state_dicts(result):
    if isinstance(result, TaskSpecificMerge):
        return [result.task_weights(t) for t in range(result.n_tasks)]
    return [result]


@pytest.mark.parametrize(("fn", "kw"), METHODS, ids=IDS)
def test_lazy_safetensors_equal_dicts(tmp_path, fn, kw):
    pre, fts = make_models()
    lpre, lfts = save_models(tmp_path, pre, fts)
    a, b = fn(pre, fts, **kw), fn(lpre, lfts, **kw)
    for sa, sb in zip(as_state_dicts(a), as_state_dicts(b), strict=True):
        assert list(sb) == list(lpre)
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
        assert torch.equal(sb["steps"], pre["steps"]) and torch.equal(sb["flag"], pre["flag"])
    if isinstance(a, TaskSpecificMerge):
        assert a.rescalers == b.rescalers


@pytest.mark.parametrize(("fn", "kw"), METHODS, ids=IDS)
def test_bf16_in_bf16_out(fn, kw):
    pre, fts = make_models(dtype=torch.bfloat16)
    up = lambda sd: {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    out16 = as_state_dicts(fn(pre, fts, **kw))
    out32 = as_state_dicts(fn(up(pre), [up(ft) for ft in fts], **kw))
    for s16, s32 in zip(out16, out32, strict=True):
        for key in KEYS:
            assert s16[key].dtype == torch.bfloat16, key
            # fp32 arithmetic on the exactly upcast inputs, rounded once to bf16
            torch.testing.assert_close(
                s16[key].float(), s32[key].to(torch.bfloat16).float(), atol=0, rtol=2**-8
            )
        assert s16["steps"].dtype == torch.int64


def test_bad_hyperparameters():
    pre, fts = make_models()
    with pytest.raises(ValueError, match=r"k=5 must be in \[1, 4\]"):
        consensus_merging(pre, fts, k=5)
    with pytest.raises(ValueError, match="k=0"):
        consensus_merging(pre, fts, k=0)
    with pytest.raises(ValueError, match="k=1.5"):
        consensus_merging(pre, fts, k=1.5)
    with pytest.raises(ValueError, match="lambdas has 3 values but 4"):
        consensus_merging(pre, fts, lambdas=[0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="lambdas must be finite and >= 0"):
        tall_masks(pre, fts, lambdas=-0.1)
    with pytest.raises(TypeError, match="lambdas"):
        tall_masks(pre, fts, lambdas="search")
    with pytest.raises(ValueError, match="base='magic'"):
        tall_masks(pre, fts, base="magic")
    with pytest.raises(ValueError, match="ties_k"):
        consensus_merging(pre, fts, base="ties", ties_k=0.0)
    for fn in (consensus_merging, tall_masks):
        with pytest.raises(ValueError, match="ties_agg='max' must be 'sum'"):
            fn(pre, fts, base="ties", ties_agg="max")
    with pytest.raises(TypeError, match="scaling_coef"):
        consensus_merging(pre, fts, scaling_coef=[0.1, 0.2, 0.3, 0.4])
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="density"):
            breadcrumbs(pre, fts, density=density)
    for gamma in (1.0, -0.01):
        with pytest.raises(ValueError, match="gamma"):
            breadcrumbs(pre, fts, gamma=gamma)
    with pytest.raises(ValueError, match=r"density=0.95 \+ gamma=0.1 > 1"):
        breadcrumbs(pre, fts, density=0.95, gamma=0.1)
    with pytest.raises(ValueError, match="scaling_coef has 2 values"):
        breadcrumbs(pre, fts, scaling_coef=[0.1, 0.2])
    with pytest.raises(TypeError, match="scaling_coef"):
        magmax(pre, fts, scaling_coef="search")
    with pytest.raises(ValueError, match="at least 2"):
        model_stock(pre, fts[:1])
    bad = dict(fts[1], w=torch.zeros(6, 4))
    for fn in (consensus_merging, tall_masks, emr_merging, breadcrumbs, magmax, model_stock):
        with pytest.raises(ValueError, match=r"'w'.*finetuned\[1\]"):
            fn(pre, [fts[0], bad])
        with pytest.raises(ValueError, match="no finetuned checkpoints"):
            fn(pre, [])


@pytest.mark.parametrize(
    "name", ["consensus_ta", "consensus_ties", "tall_masks", "emr", "breadcrumbs", "magmax", "model_stock"]
)
def test_method_configs_instantiate(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    fn = instantiate(cfg)
    pre, fts = make_models()
    params = inspect.signature(fn).parameters
    chosen = {}  # the pipeline replaces "search" with numbers
    if cfg.get("lambdas") == "search":
        chosen["lambdas"] = [0.3] * len(fts)
    if name in ("consensus_ta", "consensus_ties", "breadcrumbs", "magmax"):
        assert cfg.scaling_coef == "search"
        out = fn(pre, fts, scaling_coef=0.25, **chosen)
    else:
        assert "scaling_coef" not in params
        out = fn(pre, fts, **chosen)
    for sd in as_state_dicts(out):
        assert_buffers(sd, pre)
    if name in ("tall_masks", "emr"):
        assert isinstance(out, TaskSpecificMerge)
