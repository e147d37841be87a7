"""LoraHub: adapter combination against hand loops; the search on problems whose optimum is known."""

import math
import sys
import types

import numpy as np
import pytest
import torch

from fusion_bench.merging.lorahub import combine_adapters, l1_penalty, lorahub, lorahub_origin


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


def test_combine_adapters_around_an_origin():
    ads, o, w = [lora(0), lora(1), lora(2)], lora(3), [0.5, -1.2, 0.3]
    got = combine_adapters(ads, w, o)
    for k in ads[0]:
        torch.testing.assert_close(got[k], o[k] + sum(wt * (ad[k] - o[k]) for wt, ad in zip(w, ads)))
    assert all(torch.equal(v, o[k]) for k, v in combine_adapters(ads, [0.0] * 3, o).items())  # w = 0: the origin
    assert all(torch.equal(v, torch.zeros_like(v)) for v in combine_adapters(ads, [0.0] * 3).values())
    for t in range(3):  # w = e_t: adapter t
        e = [float(i == t) for i in range(3)]
        for k, v in combine_adapters(ads, e, o).items():
            torch.testing.assert_close(v, ads[t][k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"'q.lora_A.weight' has shape \(3, 5\) in the origin"):
        combine_adapters(ads, w, lora(3, r=3))
    with pytest.raises(ValueError, match="the origin and the adapters have different keys"):
        combine_adapters(ads, w, {"q.lora_A.weight": o["q.lora_A.weight"]})


def test_lorahub_origin_is_zero_iff_the_zero_adapter_is_the_pretrained_model():
    phi0 = lora(0)
    assert all(torch.equal(v, phi0[k]) for k, v in lorahub_origin(phi0).items())  # compensated: B0 A0 != 0
    zero_b = {**phi0, "q.lora_B.weight": torch.zeros(4, 2)}  # peft's default init
    assert lorahub_origin(zero_b) is None
    assert lorahub_origin({**phi0, "q.lora_A.weight": torch.zeros(2, 5)}) is None
    with pytest.raises(KeyError, match="has no 'q.lora_B.weight'"):
        lorahub_origin({"q.lora_A.weight": phi0["q.lora_A.weight"]})
    with pytest.raises(KeyError, match="'q.weight' is no LoRA adapter"):
        lorahub_origin({**phi0, "q.weight": torch.ones(4, 5)})


# ---- the LoRA models of fusion_bench: w = 0 is the pretrained model; zero-B adapters are the reference's LoraHub -----
INITS = [("lora", "zero_b"), ("lora", "compensated"), ("l_lora", "zero_b"), ("l_lora", "compensated")]


@pytest.fixture(scope="module")
def tiny_encoder():
    from fusion_bench.clip.model import create_clip

    torch.manual_seed(0)
    return create_clip("tiny-clip").visual.double().eval()  # random weights (nothing downloaded), fp64


def _lora_finetunes(encoder, mode, init, n=3):
    from omegaconf import OmegaConf

    from fusion_bench.models.modes import build_mode_model, trainable_state

    cfg = OmegaConf.create({"mode": mode, "r": 4, "alpha": 8, "init": init, "task_vector": "adapters"})
    base = build_mode_model(cfg, encoder)
    phi0 = {k: v.detach().double() for k, v in trainable_state(base).items()}  # (peft's adapters are fp32)
    g = torch.Generator().manual_seed(7)
    fts = [{k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in phi0.items()} for _ in range(n)]
    return cfg, base, phi0, fts


@pytest.mark.parametrize("mode,init", INITS)
def test_w0_is_the_pretrained_model_for_every_lora_init(tiny_encoder, mode, init):
    from fusion_bench.models.lora import merged_weights
    from fusion_bench.models.modes import eval_model

    cfg, base, phi0, fts = _lora_finetunes(tiny_encoder, mode, init)
    origin = lorahub_origin(phi0)
    assert (origin is None) == (init == "zero_b")
    at0 = combine_adapters(fts, [0.0, 0.0, 0.0], origin)
    assert all(torch.equal(v, phi0[k] if origin is not None else torch.zeros_like(v)) for k, v in at0.items())
    w0 = dict(tiny_encoder.named_parameters())
    folded = merged_weights(base, at0)
    assert len(folded) == 2 * len(tiny_encoder.transformer.resblocks)  # in_proj and out_proj of every block
    for name, w in folded.items():
        if init == "zero_b":  # W0 + s * 0 @ 0
            assert torch.equal(w, w0[name]), name
        else:  # (W0 - s B0 A0) + s B0 A0: W0 up to the rounding of the base offset
            torch.testing.assert_close(w, w0[name], rtol=0, atol=1e-14, msg=name)
            # the reference's origin, the zero adapter, is W0 - s B0 A0 here: not the pretrained model
            assert (merged_weights(base, combine_adapters(fts, [0.0] * 3))[name] - w0[name]).abs().max() > 1e-2
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(eval_model(cfg, tiny_encoder, at0)(x), tiny_encoder(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["lora", "l_lora"])
def test_lorahub_on_zero_b_adapters_is_the_plain_reference(tiny_encoder, mode, monkeypatch):
    """A plain re-implementation of LoraHub's semantics (sail-sg/lorahub): A = sum_t w_t A_t, B = sum_t w_t B_t,
    W = W0 + (alpha/r) B A on the unmodified base; every point the search evaluates gives exactly those weights."""
    from fusion_bench.models.lora import adapted_weights, merged_weights, plain_name

    cfg, base, phi0, fts = _lora_finetunes(tiny_encoder, mode, "zero_b")
    assert all(not v.any() for k, v in phi0.items() if ".lora_B." in k)  # B0 = 0: peft's default init
    origin = lorahub_origin(phi0)
    w0 = dict(tiny_encoder.named_parameters())

    def reference(w):
        out = {}
        for name, (layer, scale) in adapted_weights(base).items():
            a = sum(wt * ft[f"{layer}.lora_A.default.weight"] for wt, ft in zip(w, fts))
            b = sum(wt * ft[f"{layer}.lora_B.default.weight"] for wt, ft in zip(w, fts))
            assert scale == cfg.alpha / cfg.r
            out[plain_name(name)] = w0[plain_name(name)] + cfg.alpha / cfg.r * (b @ a)
        return out

    seen = []

    def loss(adapters):
        seen.append(merged_weights(base, adapters))
        return float(sum(v.square().sum() for v in seen[-1].values()))

    stub = types.SimpleNamespace(
        p=types.SimpleNamespace(Array=_StubArray), optimizers=types.SimpleNamespace(NGOpt=_StubNGOpt)
    )
    monkeypatch.setitem(sys.modules, "nevergrad", stub)
    res = lorahub(fts, loss, origin=origin, budget=6, seed=0)
    assert len(seen) == 6
    for (w, _), got in zip(res.history, seen):
        want = reference(w)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, msg=k)


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
