"""AdaMerging / AdaMerging++ against independent references (hand loops, finite differences, torch.topk)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fusion_bench.merging.adamerging import (
    adamerging,
    entropy_loss_and_grad,
    merged_weights,
    ties_task_vectors,
)
from fusion_bench.merging.ties import ties_merging

T, D, H, E, B = 3, 5, 6, 4, 8
CLASSES = (3, 4, 5)


def make_problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, E)).to(dtype)
    enc.register_buffer("count", torch.tensor(7))
    pre = {
        k: torch.randn(v.shape, generator=g, dtype=dtype) if v.is_floating_point() else v.clone()
        for k, v in enc.state_dict().items()
    }
    tvs = [
        {
            k: 0.5 * torch.randn(v.shape, generator=g, dtype=dtype)
            for k, v in pre.items()
            if v.is_floating_point()
        }
        for _ in range(T)
    ]
    heads = [2.0 * torch.randn(c, E, generator=g, dtype=dtype) for c in CLASSES]
    xs = [torch.randn(B, D, generator=g, dtype=dtype) for _ in range(T)]
    keys = [k for k, v in pre.items() if v.is_floating_point()]

    def logits_fn(weights, t, x):
        return functional_call(enc, weights, (x,)) @ heads[t].T

    return pre, tvs, keys, logits_fn, xs


def ref_merge(pre, tvs, coefs, keys):
    """Hand loop: theta_0 + sum_t c[t] (or c[t, k]) * tau_t, python floats."""
    out = dict(pre)
    for j, key in enumerate(keys):
        acc = pre[key].clone()
        for t, tv in enumerate(tvs):
            c = float(coefs[t]) if coefs.dim() == 1 else float(coefs[t, j])
            acc = acc + c * tv[key]
        out[key] = acc
    return out


def ref_loss(pre, tvs, coefs, keys, logits_fn, xs):
    w = ref_merge(pre, tvs, coefs, keys)
    total = 0.0
    for t, x in enumerate(xs):
        p = torch.softmax(logits_fn(w, t, x), -1)
        total += float(-(p * torch.log(p)).sum(-1).mean())
    return total


@pytest.mark.parametrize("layer_wise", [False, True])
def test_gradient_matches_central_differences(layer_wise):
    pre, tvs, keys, logits_fn, xs = make_problem()
    g = torch.Generator().manual_seed(1)
    shape = (T, len(keys)) if layer_wise else (T,)
    coefs = 0.2 + 0.6 * torch.rand(shape, generator=g, dtype=torch.float64)
    loss, grad = entropy_loss_and_grad(pre, tvs, coefs, keys, logits_fn, xs)
    assert loss == pytest.approx(ref_loss(pre, tvs, coefs, keys, logits_fn, xs), rel=1e-12)
    h = 1e-6
    fd = torch.empty_like(coefs).view(-1)
    for i in range(coefs.numel()):
        cp, cm = coefs.clone().view(-1), coefs.clone().view(-1)
        cp[i] += h
        cm[i] -= h
        fd[i] = (
            ref_loss(pre, tvs, cp.view(shape), keys, logits_fn, xs)
            - ref_loss(pre, tvs, cm.view(shape), keys, logits_fn, xs)
        ) / (2 * h)
    assert grad.shape == coefs.shape
    torch.testing.assert_close(grad.view(-1), fd, rtol=1e-6, atol=1e-8)


def test_tied_layer_wise_equals_task_wise():
    pre, tvs, keys, logits_fn, xs = make_problem()
    c_task = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    c_layer = c_task[:, None].expand(T, len(keys)).clone()
    l_task, g_task = entropy_loss_and_grad(pre, tvs, c_task, keys, logits_fn, xs)
    l_layer, g_layer = entropy_loss_and_grad(pre, tvs, c_layer, keys, logits_fn, xs)
    assert l_task == pytest.approx(l_layer, rel=1e-13)
    w_task, w_layer = merged_weights(pre, tvs, c_task, keys), merged_weights(pre, tvs, c_layer, keys)
    for k in pre:
        torch.testing.assert_close(w_task[k], w_layer[k], rtol=0, atol=0)
    torch.testing.assert_close(g_task, g_layer.sum(1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("tv_dtype", [torch.float32, torch.bfloat16])
def test_merged_weights_hand_loop_and_no_copy(tv_dtype):
    pre, tvs, keys, _, _ = make_problem(torch.float32)
    tvs = [{k: v.to(tv_dtype) for k, v in tv.items()} for tv in tvs]
    coefs = torch.tensor(
        [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 0.0, 0.3]], requires_grad=True
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        w = merged_weights(pre, tvs, coefs, keys)
    ref = ref_merge(pre, [{k: v.float() for k, v in tv.items()} for tv in tvs], coefs.detach(), keys)
    for k in keys:
        assert w[k].dtype == torch.float32 and w[k].requires_grad
        torch.testing.assert_close(w[k], ref[k], rtol=1e-6, atol=1e-6)
    assert w["count"] is pre["count"]  # non-float buffer: the pretrained tensor itself
    # everything the graph keeps is a task vector itself (same storage and dtype), never a stacked/upcast copy
    tau_ptrs = {tv[k].data_ptr() for tv in tvs for k in keys}
    big = [s for s in saved if s.numel() > 1]
    assert big and all(s.data_ptr() in tau_ptrs and s.dtype == tv_dtype for s in big)
    assert sum(s.numel() for s in big) == sum(tv[k].numel() for tv in tvs for k in keys)


def test_bad_inputs_are_named():
    pre, tvs, keys, _, _ = make_problem()
    with pytest.raises(ValueError, match=r"expected \(3,\) \(task-wise\) or \(3, 4\)"):
        merged_weights(pre, tvs, torch.zeros(2), keys)
    del tvs[1]["2.bias"]
    with pytest.raises(ValueError, match=r"'2.bias' is missing from task_vectors\[1\]"):
        merged_weights(pre, tvs, torch.zeros(3), keys)


@pytest.mark.parametrize("layer_wise,clamp_in_forward", [(True, False), (False, False), (True, True)])
def test_adamerging_lowers_entropy_inside_the_box(layer_wise, clamp_in_forward):
    pre, tvs, keys, logits_fn, xs = make_problem(torch.float32)
    seen = []
    res = adamerging(
        pre,
        tvs,
        logits_fn,
        lambda step, t: xs[t],
        layer_wise=layer_wise,
        steps=40,
        lr=0.05,
        clamp=(0.0, 0.6),
        clamp_in_forward=clamp_in_forward,
        on_step=lambda s, loss, c: seen.append(c.clone()),
    )
    shape = (T, len(keys)) if layer_wise else (T,)
    init = torch.full(shape, 0.3)
    assert res.coefs.shape == shape and res.keys == keys and len(res.entropy) == 40
    assert res.entropy[0] == pytest.approx(ref_loss(pre, tvs, init.double(), keys, logits_fn, xs), rel=1e-5)
    assert res.entropy[-1] < res.entropy[0] - 0.05
    assert all(((c >= 0.0) & (c <= 0.6)).all() for c in seen)
    assert ((res.coefs == 0.0) | (res.coefs == 0.6)).any()  # the box was active
    w = res.weights(pre, tvs)
    ref = ref_merge(pre, tvs, res.coefs, keys)
    assert list(w) == list(pre) and w["count"].dtype == torch.int64
    for k in keys:
        torch.testing.assert_close(w[k], ref[k], rtol=1e-6, atol=1e-6)


def ref_official_loop(pre, tvs, keys, logits_fn, batch, steps, lr, box, layer_wise, project, m=2):
    """The official loop written plainly: raw nn.Parameter, Adam, per step the SUM over tasks of m batches'
    mean entropy at clamp(raw) (project=False) or at raw, projected into the box after each step (project)."""
    lo, hi = box
    raw = nn.Parameter(torch.full((T, len(keys)) if layer_wise else (T,), 0.3))
    opt = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    for s in range(steps):
        lam = raw if project else torch.clamp(raw, min=lo, max=hi)
        w = dict(pre)
        for j, key in enumerate(keys):
            w[key] = pre[key] + sum((lam[t, j] if layer_wise else lam[t]) * tvs[t][key] for t in range(T))
        loss = 0.0
        for t in range(T):
            for i in range(m):
                logits = logits_fn(w, t, batch(s * m + i, t))
                loss = loss - (logits.softmax(1) * logits.log_softmax(1)).sum(1).mean(0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if project:
            with torch.no_grad():
                raw.clamp_(lo, hi)
    return raw.detach()


@pytest.mark.parametrize("layer_wise,project", [(True, False), (False, False), (True, True)])
def test_adamerging_defaults_follow_the_official_loop(layer_wise, project):
    """Default: two batches per task and step, clamp in the forward (raw coefficients never projected)."""
    pre, tvs, keys, logits_fn, _ = make_problem(torch.float64)
    g = torch.Generator().manual_seed(4)
    pool = [[torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(5)] for _ in range(T)]
    drawn = []

    def batch(i, t):
        drawn.append((i, t))
        return pool[t][i % 5]

    box, steps, lr = (0.2, 0.45), 30, 0.05
    kw = {} if not project else {"clamp_in_forward": False}
    res = adamerging(pre, tvs, logits_fn, batch, layer_wise=layer_wise, steps=steps, lr=lr, clamp=box, **kw)
    assert drawn[: 2 * T] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    raw = ref_official_loop(pre, tvs, keys, logits_fn, batch, steps, lr, box, layer_wise, project)
    torch.testing.assert_close(res.coefs, raw.clamp(*box), rtol=0, atol=1e-5)
    if not project:
        assert ((raw < box[0]) | (raw > box[1])).any()  # some raw coefficient left the box: frozen there
        other = adamerging(
            pre,
            tvs,
            logits_fn,
            batch,
            layer_wise=layer_wise,
            steps=steps,
            lr=lr,
            clamp=box,
            clamp_in_forward=False,
        )
        assert not torch.allclose(other.coefs, res.coefs, atol=1e-3)  # the two rules part ways
    # recorded entropy: the loss / batches_per_task, before each step
    first = (
        sum(
            ref_loss(
                pre,
                tvs,
                torch.full(res.coefs.shape, 0.3, dtype=torch.float64),
                keys,
                logits_fn,
                [pool[t][i] for t in range(T)],
            )
            for i in (0, 1)
        )
        / 2
    )
    assert res.entropy[0] == pytest.approx(first, rel=1e-6)
    one = adamerging(
        pre, tvs, logits_fn, batch, layer_wise=layer_wise, steps=3, lr=lr, clamp=box, batches_per_task=1, **kw
    )
    raw1 = ref_official_loop(pre, tvs, keys, logits_fn, batch, 3, lr, box, layer_wise, project, m=1)
    torch.testing.assert_close(one.coefs, raw1.clamp(*box), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="batches_per_task=0"):
        adamerging(pre, tvs, logits_fn, batch, steps=1, batches_per_task=0)


def test_adamerging_first_step_and_start():
    pre, tvs, keys, logits_fn, xs = make_problem(torch.float32)
    res0 = adamerging(pre, tvs, logits_fn, lambda s, t: xs[t], steps=0)
    assert torch.equal(res0.coefs, torch.full((T, len(keys)), 0.3)) and res0.entropy == []
    # Adam's first step moves every coefficient by lr against the sign of its gradient
    res = adamerging(pre, tvs, logits_fn, lambda s, t: xs[t], layer_wise=False, steps=1, lr=0.01, init=0.5)
    c = torch.full((T,), 0.5, dtype=torch.float64)
    fd = []
    for i in range(T):
        e = torch.zeros(T, dtype=torch.float64)
        e[i] = 1e-5
        fd.append(
            ref_loss(pre, tvs, c + e, keys, logits_fn, xs) - ref_loss(pre, tvs, c - e, keys, logits_fn, xs)
        )
    torch.testing.assert_close(res.coefs, 0.5 - 0.01 * torch.tensor(fd).sign().float(), rtol=0, atol=1e-6)


def brute_ties_vectors(pre, fts, k):
    keys = [key for key, v in pre.items() if v.is_floating_point()]
    taus = torch.stack(
        [torch.cat([(ft[key].float() - pre[key].float()).reshape(-1) for key in keys]) for ft in fts]
    )
    m = int(k * taus.shape[1])
    thr = torch.topk(taus.abs(), m, dim=1).values[:, -1:]
    trimmed = taus * (taus.abs() >= thr)
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    sel = trimmed * (trimmed * sign > 0)
    out = []
    for row in sel:
        d, off = {}, 0
        for key in keys:
            d[key] = row[off : off + pre[key].numel()].view(pre[key].shape)
            off += pre[key].numel()
        out.append(d)
    return out


@pytest.mark.parametrize("k", [0.2, 0.5])
def test_ties_task_vectors_brute_force(k):
    g = torch.Generator().manual_seed(3)
    pre = {
        "a": torch.randn(7, 9, generator=g),
        "b": torch.randn(13, generator=g).bfloat16(),
        "n": torch.arange(4),
        "c": torch.randn(3, 2, 2, generator=g),
    }
    fts = [
        {
            key: (v + torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v
            for key, v in pre.items()
        }
        for _ in range(3)
    ]
    got, ref = ties_task_vectors(pre, fts, k), brute_ties_vectors(pre, fts, k)
    assert [list(d) for d in got] == [["a", "b", "c"]] * 3
    for gd, rd in zip(got, ref):
        for key in rd:
            assert gd[key].dtype == torch.float32
            assert torch.equal(gd[key], rd[key]), key
    # the house TIES merge (disjoint mean) = sum of the selected entries / number of agreeing tasks
    ties = ties_merging(pre, fts, k=k, scaling_coef=1.0)
    for key in ["a", "b", "c"]:
        sel = torch.stack([d[key] for d in got])
        mean = sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
        torch.testing.assert_close(ties[key], (pre[key].float() + mean).to(pre[key].dtype))
    # AdaMerging++ with all coefficients lambda = TIES with disjoint sum
    lam = 0.4
    w = merged_weights(pre, got, torch.full((3,), lam), ["a", "b", "c"])
    torch.testing.assert_close(w["a"], pre["a"] + lam * sum(d["a"] for d in got))


def test_ties_task_vectors_zero_sum_elects_plus():
    pre = {"w": torch.zeros(3)}
    fts = [{"w": torch.tensor([1.0, -2.0, 0.5])}, {"w": torch.tensor([-1.0, 1.0, 0.1])}]
    got = ties_task_vectors(pre, fts, k=1.0)
    assert torch.equal(got[0]["w"], torch.tensor([1.0, -2.0, 0.5]))
    assert torch.equal(got[1]["w"], torch.tensor([0.0, 0.0, 0.1]))
