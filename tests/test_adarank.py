"""AdaRank (fusion_bench/merging/adarank.py) against independent plain forms: explicit float64 SVDs with the masks
applied by hand, the official straight-through formula under autograd, the official training loop written plainly,
the official hard-mask expression; its start is the base merge (task arithmetic, CART); bad settings are refused
before any work; and one run through the pipeline on tiny_clip."""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call

from fusion_bench import merging
from fusion_bench.errors import ConfigError
from fusion_bench.merging.adarank import (
    adarank,
    hard_mask,
    initial_logits,
    masked_keys,
    merged_weights,
    prepare_adarank,
)
from fusion_bench.pipeline import run
from fusion_bench.validation.check import check_options

pytestmark = pytest.mark.usefixtures("one_thread")

T = 3
# open_clip-like names: keys="official" masks the four block weights (tall, square, tall, wide), not proj
SHAPES = {
    "blocks.0.attn.in_proj_weight": (12, 8),
    "blocks.0.attn.in_proj_bias": (12,),
    "blocks.0.attn.out_proj.weight": (8, 8),
    "blocks.0.ln_1.weight": (8,),
    "blocks.0.mlp.c_fc.weight": (10, 8),
    "blocks.0.mlp.c_proj.weight": (8, 10),
    "proj": (8, 6),
}
OFFICIAL = ["blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight", "blocks.0.mlp.c_fc.weight",
            "blocks.0.mlp.c_proj.weight"]


def states(seed=0, n=T, low_rank=True):
    """theta_0 and n fine-tunes (fp32) whose task vectors share a direction; with `low_rank` task 1's out_proj
    update has rank 2 (numerically zero singular values); an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    pre["steps"] = torch.tensor(7)
    shared = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = []
    for t in range(n):
        ft = {k: pre[k] + shared[k] + 0.5 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
        if t == 1 and low_rank:
            low = torch.randn(8, 2, generator=g) @ torch.randn(2, 8, generator=g)
            ft["blocks.0.attn.out_proj.weight"] = pre["blocks.0.attn.out_proj.weight"] + low
        ft["steps"] = pre["steps"]
        fts.append(ft)
    return pre, fts


def plain_merge(pre, fts, coefs, masks, base="task_arithmetic"):
    """The definition in float64: explicit full SVD of each masked key's task vector, the hard masks applied by hand
    to its singular values; theta_c + sum_t lambda_{t,k} (masked) tau_t; integer keys copied."""
    keys = [k for k, v in pre.items() if v.is_floating_point()]
    taus = [{k: ft[k].double() - pre[k].double() for k in keys} for ft in fts]
    centre = {k: pre[k].double() for k in keys}
    if base == "cart":
        mean = {k: sum(t[k] for t in taus) / len(taus) for k in keys}
        centre = {k: centre[k] + mean[k] for k in keys}
        taus = [{k: t[k] - mean[k] for k in keys} for t in taus]
    out = {k: v for k, v in pre.items() if not v.is_floating_point()}
    for j, k in enumerate(keys):
        acc = centre[k].clone()
        for t, tau in enumerate(taus):
            if k in masks:
                U, S, Vh = torch.linalg.svd(tau[k], full_matrices=False)
                acc += float(coefs[t, j]) * (U * (S * masks[k][t].double())) @ Vh
            else:
                acc += float(coefs[t, j]) * tau[k]
        out[k] = acc
    return out


def random_masks(inp, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(T, inp.rank(k), generator=g) > 0.4 for k in inp.masked}


@pytest.mark.parametrize("base", ["task_arithmetic", "cart"])
@pytest.mark.parametrize("keys", ["official", "all_2d"])
def test_masked_merge_equals_the_plain_float64_definition(base, keys):
    pre, fts = states()
    inp = prepare_adarank(pre, fts, base=base, keys=keys)
    assert inp.masked == (OFFICIAL if keys == "official" else [*OFFICIAL, "proj"])
    assert inp.keys == [k for k in pre if k != "steps"]
    assert all(a.dtype == torch.float32 for fs in inp.factors.values() for pair in fs for a in pair)
    g = torch.Generator().manual_seed(2)
    coefs = 0.1 + 2 * torch.rand(T, len(inp.keys), generator=g)
    masks = random_masks(inp)
    got = merged_weights(inp, coefs, {k: m.float() for k, m in masks.items()})
    ref = plain_merge(pre, fts, coefs, masks, base)
    assert list(got) == list(pre) and got["steps"] is pre["steps"]
    for k in inp.keys:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=2e-5, msg=k)
    # the masks matter: dropping every component of a key leaves its centre
    none = merged_weights(inp, coefs, {k: torch.zeros(T, inp.rank(k)) for k in inp.masked})
    centre = _centre(pre, fts, base)
    for k in inp.masked:
        torch.testing.assert_close(none[k].double(), centre[k], rtol=1e-6, atol=1e-6)


def _centre(pre, fts, base):
    if base == "task_arithmetic":
        return {k: v.double() for k, v in pre.items() if v.is_floating_point()}
    return {k: sum(ft[k].double() for ft in fts) / len(fts) for k, v in pre.items() if v.is_floating_point()}


def test_all_masks_one_is_task_arithmetic_and_zero_steps_is_the_base_merge():
    pre, fts = states()
    inp = prepare_adarank(pre, fts)
    ones = {k: torch.ones(T, inp.rank(k)) for k in inp.masked}
    w = merged_weights(inp, torch.full((T, len(inp.keys)), 0.3), ones)
    ta = merging.task_arithmetic(pre, fts, scaling_coef=0.3)
    for k in pre:
        torch.testing.assert_close(w[k], ta[k], rtol=1e-5, atol=1e-5, msg=k)
    start = adarank(inp, _no_logits, _no_batches, init=0.3, steps=0)
    assert start.entropy == [] and all(bool(m.all()) for m in start.masks.values())
    assert start.kept() == [{k: inp.rank(k) for k in OFFICIAL}] * T
    sw = start.weights(inp)
    assert list(sw) == list(pre) and sw["steps"].dtype == torch.int64
    for k in pre:
        torch.testing.assert_close(sw[k], ta[k], rtol=1e-5, atol=1e-5, msg=k)
    # over CART: the start keeps CART's max(1, int(ratio r)) top components of each centred task vector
    cart_inp = prepare_adarank(pre, fts, base="cart")
    res = adarank(cart_inp, _no_logits, _no_batches, init=2.3, initial_rank_ratio=0.3, steps=0)
    assert res.kept()[0] == {k: max(1, int(0.3 * cart_inp.rank(k))) for k in OFFICIAL}
    cart = merging.cart.cart(pre, fts, scaling_coef=2.3, rank_ratio=0.3)
    cw = res.weights(cart_inp)
    for k in pre:
        torch.testing.assert_close(cw[k], cart[k], rtol=1e-5, atol=1e-5, msg=k)


def _no_logits(*a):
    raise AssertionError("steps=0 runs no forward")


def _no_batches(*a):
    raise AssertionError("steps=0 reads no batch")


def official_forward(pre, fts, lam, soft, keys, masked, base="task_arithmetic"):
    """The official `_merge_weights` in float64: explicit SVD, straight-through mask on the singular values
    (s_masked = q s + ((q > 0.5) - q) s, the second term detached), theta_c + sum_t lambda * task vector."""
    taus = [{k: ft[k].double() - pre[k].double() for k in keys} for ft in fts]
    centre = {k: pre[k].double() for k in keys}
    if base == "cart":
        mean = {k: sum(t[k] for t in taus) / len(taus) for k in keys}
        centre = {k: centre[k] + mean[k] for k in keys}
        taus = [{k: t[k] - mean[k] for k in keys} for t in taus]
    out = dict(centre)
    for t, tau in enumerate(taus):
        for j, k in enumerate(keys):
            if k in masked:
                U, s, Vh = torch.linalg.svd(tau[k], full_matrices=False)
                q = soft[k][t]
                s_masked = q * s + (((q > 0.5).double() - q) * s).detach()
                tv = (U * s_masked) @ Vh
            else:
                tv = tau[k]
            out[k] = out[k] + lam[t, j] * tv
    return out


@pytest.mark.parametrize("base", ["task_arithmetic", "cart"])
def test_gradients_reach_the_masks_as_the_official_straight_through_estimator(base):
    # no numerically zero singular value here: float64 checks of single components, which the Gram matrix
    # determines to about 1e-8 s_1 (spectral.py), below fp32 resolution but not below these tolerances
    pre, fts = states(seed=3, low_rank=False)
    pre64 = {k: v.double() if v.is_floating_point() else v for k, v in pre.items()}
    fts64 = [{k: v.double() if v.is_floating_point() else v for k, v in ft.items()} for ft in fts]
    inp = prepare_adarank(pre64, fts64, base=base, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    lam = (0.2 + torch.rand(T, len(inp.keys), generator=g, dtype=torch.float64)).requires_grad_(True)
    logits = {k: (0.3 * torch.randn(T, inp.rank(k), generator=g, dtype=torch.float64)).requires_grad_(True)
              for k in inp.masked}
    R = {k: torch.randn(pre[k].shape, generator=g, dtype=torch.float64) for k in inp.keys}

    def loss(w):
        return sum((R[k] * w[k]).sum() for k in inp.keys)

    temp = 2.0
    soft = {k: torch.sigmoid(v / temp) for k, v in logits.items()}
    ours = torch.autograd.grad(loss(merged_weights(inp, lam, soft)), [lam, *logits.values()])
    soft = {k: torch.sigmoid(v / temp) for k, v in logits.items()}
    ref = torch.autograd.grad(loss(official_forward(pre, fts, lam, soft, inp.keys, inp.masked, base)),
                              [lam, *logits.values()])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for k, gk in zip(inp.masked, ours[1:]):  # straight-through: dropped components get a gradient too
        dropped = hard_mask(logits[k].detach(), temp) == 0
        assert dropped.any() and (gk[dropped] != 0).all(), k
    # lambda: the merge is linear in it, checked by finite differences
    soft = {k: torch.sigmoid(v.detach() / temp) for k, v in logits.items()}
    assert torch.autograd.gradcheck(lambda c: merged_weights(inp, c, soft)["blocks.0.mlp.c_proj.weight"], (lam,))


def test_hard_mask_is_the_official_rule():
    x = torch.tensor([-1.0, -1e-9, 0.0, 1e-9, 1e-8, 1e-5, 0.1, 3.0])
    assert hard_mask(x, 10.0).tolist() == [False, False, False, False, False, True, True, True]
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.randn(500, generator=g) * 10 ** torch.randint(-10, 1, (500,), generator=g), x])
    for temp in (1.0, 10.0):  # the official expression, verbatim: (m / temp).sigmoid() > 0.5, fp32
        assert torch.equal(hard_mask(y, temp), (y.float() / temp).sigmoid() > 0.5)
        assert torch.equal(hard_mask(y.double(), temp), (y.float() / temp).sigmoid() > 0.5)
    m = initial_logits(10, 2, 3)
    assert torch.equal(m[:, :3], torch.full((2, 3), 0.1)) and torch.equal(m[:, 3:], torch.full((2, 7), -0.1))
    assert hard_mask(m, 10.0).sum(1).tolist() == [3, 3]


D, H, E, B = 5, 7, 4, 6
CLASSES = (3, 4, 2)


def tiny_problem(seed=0):
    """A 2-layer encoder with per-task heads (float64); its two weight matrices are masked with keys=all_2d."""
    g = torch.Generator().manual_seed(seed)
    enc = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, E)).double()
    pre = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in enc.state_dict().items()}
    fts = [{k: v + 0.6 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in pre.items()}
           for _ in range(T)]
    heads = [2.0 * torch.randn(c, E, generator=g, dtype=torch.float64) for c in CLASSES]
    pool = [[torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(4)] for _ in range(T)]

    def logits_fn(weights, t, x):
        return functional_call(enc, weights, (x,)) @ heads[t].T

    return pre, fts, logits_fn, lambda i, t: pool[t][i % 4]


def official_loop(pre, fts, keys, masked, logits_fn, batch, steps, lr, init, ratio, temp, base):
    """The official loop written plainly: nn.Parameters lambda (T x K, start `init`) and mask logits (+-0.1), one
    Adam; each step the SUM over tasks of one batch's mean entropy at the straight-through merge."""
    lam = nn.Parameter(torch.full((T, len(keys)), init, dtype=torch.float64))
    ml = {}
    for k in masked:
        r = min(pre[k].shape)
        m = torch.full((T, r), 0.1, dtype=torch.float64)
        m[:, max(1, int(ratio * r)):] = -0.1
        ml[k] = nn.Parameter(m)
    opt = torch.optim.Adam([lam, *ml.values()], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    for s in range(steps):
        w = official_forward(pre, fts, lam, {k: (v / temp).sigmoid() for k, v in ml.items()}, keys, masked, base)
        loss = 0.0
        for t in range(T):
            out = logits_fn(w, t, batch(s, t))
            loss = loss - (out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lam.detach(), {k: v.detach() for k, v in ml.items()}


@pytest.mark.parametrize("base,init,ratio", [("task_arithmetic", 0.3, 1.0), ("cart", 1.5, 0.4)])
def test_training_follows_the_official_loop(base, init, ratio):
    pre, fts, logits_fn, batch = tiny_problem()
    inp = prepare_adarank(pre, fts, base=base, keys="all_2d", dtype=torch.float64)
    steps, lr, temp = 12, 0.05, 1.0
    seen = []
    res = adarank(inp, logits_fn, batch, init=init, initial_rank_ratio=ratio, steps=steps, lr=lr, mask_temp=temp,
                  on_step=lambda s, e: seen.append(e))
    lam, ml = official_loop(pre, fts, inp.keys, inp.masked, logits_fn, batch, steps, lr, init, ratio, temp, base)
    torch.testing.assert_close(res.coefs, lam, rtol=0, atol=1e-9)
    start = {k: hard_mask(initial_logits(inp.rank(k), T, max(1, int(ratio * inp.rank(k)))), temp)
             for k in inp.masked}
    for k in inp.masked:
        assert torch.equal(res.masks[k], hard_mask(ml[k], temp)), k
    assert any(not torch.equal(res.masks[k], start[k]) for k in inp.masked)  # some mask flipped
    assert len(res.entropy) == steps and seen == res.entropy
    # the recorded entropy of step 0: the start's, summed over tasks
    w0 = official_forward(pre, fts, torch.full((T, len(inp.keys)), init, dtype=torch.float64),
                          {k: start[k].double() for k in inp.masked}, inp.keys, inp.masked, base)
    e0 = sum(float(-(torch.softmax(o, 1) * torch.log_softmax(o, 1)).sum(1).mean())
             for o in (logits_fn(w0, t, batch(0, t)) for t in range(T)))
    assert res.entropy[0] == pytest.approx(e0, rel=1e-10)
    # the merged model: the official forward at the learnt lambda and hard masks
    w = res.weights(inp)
    ref = official_forward(pre, fts, lam, {k: hard_mask(v, temp).double() for k, v in ml.items()}, inp.keys,
                           inp.masked, base)
    for k in inp.keys:
        torch.testing.assert_close(w[k], ref[k], rtol=1e-9, atol=1e-9)
    # learn_coefs=False: lambda stays at its start, only the masks move
    frozen = adarank(inp, logits_fn, batch, init=init, initial_rank_ratio=ratio, steps=3, lr=lr, mask_temp=temp,
                     learn_coefs=False)
    assert torch.equal(frozen.coefs, torch.full((T, len(inp.keys)), init, dtype=torch.float64))


def test_bad_inputs_are_refused_by_the_functions():
    pre, fts = states()
    inp = prepare_adarank(pre, fts)
    for kw, match in [({"steps": -1}, "steps=-1"), ({"lr": 0.0}, "lr=0.0"), ({"mask_temp": 0}, "mask_temp=0"),
                      ({"initial_rank_ratio": 1.5}, "initial_rank_ratio=1.5"), ({"batches_per_task": 0},
                      "batches_per_task=0"), ({"init": [0.3, 0.3]}, "one number per task")]:
        with pytest.raises(ValueError, match=match):
            adarank(inp, _no_logits, _no_batches, **kw)
    with pytest.raises(ValueError, match="keys='nope'"):
        prepare_adarank(pre, fts, keys="nope")
    with pytest.raises(ValueError, match="base='ties'"):
        prepare_adarank(pre, fts, base="ties")
    with pytest.raises(ValueError, match="selects none of the 1 2-D keys"):
        masked_keys({"w": torch.zeros(3, 2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"coefs has shape \(3,\)"):
        merged_weights(inp, torch.zeros(T), {})
    with pytest.raises(ValueError, match="the mask of 'blocks.0.attn.in_proj_weight' has shape"):
        merged_weights(inp, torch.zeros(T, len(inp.keys)), {k: torch.ones(T, 2) for k in inp.masked})


# ---------------------------------------------------------------------------------------------
# the pipeline: validation, refusals before any work, one run on tiny_clip
# ---------------------------------------------------------------------------------------------
TWO = ["taskpool.tasks=[shapes,colors]", "model.eval_batch_size=250"]


@pytest.mark.parametrize("option,value", [
    ("steps", -1), ("lr", 0), ("lr", float("nan")), ("batch_size", 0), ("mask_temp", 0), ("mask_temp", -2.0),
    ("mask_init", 0), ("initial_rank_ratio", 1.5), ("init", "search"), ("init", float("inf")), ("keys", "some"),
    ("learn_coefs", 2), ("split", "dev"), ("nope", 1),
])
def test_bad_settings_are_refused_by_the_validation_pass(make_cfg, option, value):
    cfg = make_cfg(*TWO, "method=adarank")
    assert check_options(cfg) == []
    bad = copy.deepcopy(cfg)
    OmegaConf.update(bad, f"method.coefficients.{option}", value, force_add=True)
    with pytest.raises(ConfigError, match=f"^method.coefficients.{option}="):
        check_options(bad)
    assert check_options(make_cfg(*TWO, "method=adarank_cart")) == []


def _no_training(monkeypatch):
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("fine-tuned"))


@pytest.mark.parametrize("overrides,match", [
    (["method=adarank", "method.scaling_coef=search"], "starts lambda at method.scaling_coef, which is 'search'"),
    (["method=ties", "coefficients=adarank"], "not of method=ties"),
    (["method=adarank_cart", "method.keys=all_2d"], "give both the same keys"),
    (["method=adarank", "finetune=l_lora"], "coefficients=adarank runs the encoder at merged weights"),
    (["method=adarank", "coefficients=adamerging"], "give one"),
])
def test_bad_runs_stop_before_any_training(make_cfg, tmp_path, monkeypatch, overrides, match):
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=match):
        run(make_cfg(*TWO, *overrides, f"paths.store={tmp_path}/empty"), tmp_path / "r", overrides[0][7:])


def _merged(report):
    return {t: v["merged"] for t, v in report["tasks"].items()}


def test_pipeline_starts_at_the_base_merge_and_learns_masks(make_cfg, tmp_path):
    """Real (few-step) fine-tunes of tiny_clip on two tasks; AdaRank with 0 steps is task arithmetic at 0.3 (and
    CART), with 2 steps it lowers the entropy, moves lambda and reports the components kept per key and task."""
    ft = [*TWO, "model.train.steps=6", "model.train.warmup_steps=1", "model.train.checkpoint_every=6"]
    ta = run(make_cfg(*ft, "method.scaling_coef=0.3"), tmp_path / "ta", "task_arithmetic")
    base = [*ft, "stage=evaluate"]
    zero = run(make_cfg(*base, "method=adarank", "method.coefficients.steps=0"), tmp_path / "a0", "adarank")
    assert _merged(zero) == pytest.approx(_merged(ta), abs=2.5e-3)  # fp32 rounding may flip a sample, no more
    learnt = zero["learnt_coefficients"]
    assert learnt["strategy"] == "adarank" and learnt["entropy_first"] is None
    assert all(learnt["kept"][t] == learnt["rank"] for t in ("shapes", "colors"))
    assert len(learnt["masked_keys"]) == 16 and all(k.split(".")[-1] in ("in_proj_weight", "weight")
                                                     for k in learnt["masked_keys"])
    ada = run(make_cfg(*base, "method=adarank", "method.coefficients.steps=2", "method.coefficients.batch_size=8",
                       "method.coefficients.lr=0.05", "method.coefficients.mask_temp=1"), tmp_path / "a2", "adarank")
    learnt = ada["learnt_coefficients"]
    assert ada["scaling_coef"] == "adarank" and learnt["inputs"] == "test split, no labels"
    assert learnt["entropy_last"] < learnt["entropy_first"]
    assert len(learnt["coefficients"]["shapes"]) == len(learnt["keys"])
    assert any(abs(c - 0.3) > 1e-3 for cs in learnt["coefficients"].values() for c in cs)
    assert any(learnt["kept"][t][k] < learnt["rank"][k] for t in ("shapes", "colors") for k in learnt["rank"])
    assert (tmp_path / "a2" / "ranks.png").is_file() and (tmp_path / "a2" / "coefficients.png").is_file()
    cart = run(make_cfg(*base, "method=cart", "method.scaling_coef=2.3", "method.rank_ratio=0.16"),
               tmp_path / "cart", "cart")
    zero_cart = run(make_cfg(*base, "method=adarank_cart", "method.coefficients.steps=0"), tmp_path / "c0",
                    "adarank_cart")
    assert _merged(zero_cart) == pytest.approx(_merged(cart), abs=2.5e-3)
    kept = zero_cart["learnt_coefficients"]["kept"]["shapes"]
    assert kept == {k: max(1, int(0.16 * r)) for k, r in zero_cart["learnt_coefficients"]["rank"].items()}
