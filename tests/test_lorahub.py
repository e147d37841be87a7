"""LoraHub: adapter combination against hand loops; the search on problems whose optimum is known."""

import math
import sys
import types

import numpy as np
import pytest
import torch

from fusion_bench.merging.lorahub import combine_adapters, l1_penalty, lorahub


def lora(seed, dtype=torch.float32, r=2, d_in=5, d_out=4):
    g = torch.Generator().manual_seed(seed)
    return {
        "q.lora_A.weight": torch.randn(r, d_in, generator=g).to(dtype),
        "q.lora_B.weight": torch.randn(d_out, r, generator=g).to(dtype),
    }


def test_combine_adapters_hand_loop_and_separate_sums():
    ads, w = [lora(0), lora(1), lora(2)], [0.5, -1.2, 0.3]
    got = combine_adapters(ads, w)
    for k in ads[0]:
        ref = torch.zeros_like(ads[0][k])
        for wt, ad in zip(w, ads):
            ref += wt * ad[k]
        torch.testing.assert_close(got[k], ref)
    delta = got["q.lora_B.weight"] @ got["q.lora_A.weight"]
    sum_of_products = sum(wt * ad["q.lora_B.weight"] @ ad["q.lora_A.weight"] for wt, ad in zip(w, ads))
    assert (delta - sum_of_products).abs().max() > 0.1


def test_combine_adapters_fp32_arithmetic_in_adapter_dtype():
    ads = [lora(0, torch.bfloat16), lora(1, torch.bfloat16)]
    got = combine_adapters(ads, [0.3, 0.7])
    for k in ads[0]:
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], (0.3 * ads[0][k].float() + 0.7 * ads[1][k].float()).bfloat16())


def test_combine_adapters_mismatches_are_named():
    a, b = lora(0), lora(1, r=3)
    with pytest.raises(ValueError, match=r"'q.lora_A.weight' has shape \(3, 5\) in adapters\[1\]"):
        combine_adapters([a, b], [1.0, 1.0])
    c = dict(lora(2))
    del c["q.lora_B.weight"]
    with pytest.raises(ValueError, match=r"'q.lora_B.weight' of adapters\[0\] is missing in adapters\[1\]"):
        combine_adapters([a, c], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        combine_adapters([a], [1.0, 2.0])


# ---- the search ------------------------------------------------------------------------------------------
TARGET = torch.tensor([0.7, -0.4, 0.0])
BASIS = [{"x": torch.eye(3)[i]} for i in range(3)]


def quad(ad):
    return float(((ad["x"] - TARGET) ** 2).sum())


class _StubArray:
    def __init__(self, *, init, lower, upper):
        self.init, self.lower, self.upper = np.asarray(init, dtype=float), lower, upper
        self.random_state = np.random.RandomState()


class _StubNGOpt:
    """Stand-in for NGOpt (random search around the incumbent; may step outside the bounds)."""

    def __init__(self, parametrization, budget):
        self.p, self.best = parametrization, (math.inf, parametrization.init)

    def ask(self):
        rs = self.p.random_state
        return types.SimpleNamespace(value=self.best[1] + rs.normal(0.0, 1.0, size=self.best[1].shape))

    def tell(self, cand, obj):
        if obj < self.best[0]:
            self.best = (obj, np.clip(cand.value, self.p.lower, self.p.upper))


def test_lorahub_plumbing_with_stub_optimizer(monkeypatch):
    stub = types.SimpleNamespace(
        p=types.SimpleNamespace(Array=_StubArray), optimizers=types.SimpleNamespace(NGOpt=_StubNGOpt)
    )
    monkeypatch.setitem(sys.modules, "nevergrad", stub)
    res = lorahub(BASIS, quad, budget=30, l1=0.3, seed=4)
    assert len(res.history) == 30
    for w, obj in res.history:
        assert all(-1.5 <= x <= 1.5 for x in w)
        assert obj == pytest.approx(quad(combine_adapters(BASIS, w)) + 0.3 * sum(map(abs, w)) / 3, rel=1e-12)
    assert res.objective == min(o for _, o in res.history)
    assert res.objective == pytest.approx(res.loss + l1_penalty(res.weights, 0.3))
    torch.testing.assert_close(res.adapters["x"], torch.tensor(res.weights, dtype=torch.float32))
    assert lorahub(BASIS, quad, budget=30, l1=0.3, seed=4).history == res.history
    assert lorahub(BASIS, quad, budget=30, l1=0.3, seed=5).history != res.history


def test_lorahub_finds_known_optimum():
    pytest.importorskip("nevergrad", reason="nevergrad is not installed")
    res = lorahub(BASIS, quad, budget=200, l1=0.0, seed=0)
    np.testing.assert_allclose(res.weights, [0.7, -0.4, 0.0], atol=0.1)
    assert all(-1.5 <= x <= 1.5 for w, _ in res.history for x in w)
    again = lorahub(BASIS, quad, budget=200, l1=0.0, seed=0)
    assert again.history[:40] == res.history[:40]  # the default budget: the same weights, evaluation by evaluation
    np.testing.assert_allclose(again.weights, res.weights, atol=1e-6)  # late CMA-ES steps: round-off apart


def test_lorahub_default_budget_beats_zero():
    pytest.importorskip("nevergrad", reason="nevergrad is not installed")
    res = lorahub(BASIS, quad)
    assert len(res.history) == 40
    assert res.objective < quad(combine_adapters(BASIS, [0.0, 0.0, 0.0]))
    assert res.objective == pytest.approx(res.loss + 0.05 * sum(map(abs, res.weights)) / 3)


def test_lorahub_l1_pulls_irrelevant_weight_to_zero():
    pytest.importorskip("nevergrad", reason="nevergrad is not installed")
    ads = [BASIS[0], BASIS[1], {"x": torch.zeros(3)}]  # the loss does not depend on w_3
    res = lorahub(ads, quad, budget=200, l1=0.5, seed=0)
    assert abs(res.weights[2]) < 0.15
    # the penalised optimum is the soft-thresholded target: 0.7 - 0.5/6, -0.4 + 0.5/6
    np.testing.assert_allclose(res.weights[:2], [0.7 - 0.5 / 6, -0.4 + 0.5 / 6], atol=0.1)
