"""LOT Merging (fusion_bench/merging/lot.py) against a float64 least-squares reference written here (the stacked
exemplar features of every task, torch.linalg.lstsq), the norm-scale statistic it needs against its definition, and
the method through the pipeline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from fusion_bench.errors import ConfigError
from fusion_bench.merging import regmean
from fusion_bench.merging.lot import lot_merging
from fusion_bench.pipeline import run
from fusion_bench.statistics import input_grams

IN, OUT, EMBED = 8, 5, 3


def problem(rows=(30, 24, 40), seed=0, dtype=torch.float64, shared=1.0):
    """theta_0 and one fine-tune per task with task vectors sharing a direction (tau_t = shared * S + R_t), each
    task's exemplar inputs X_t (of the linear map ``w`` [OUT, IN] and of open_clip's ``x @ proj`` [IN, EMBED]) and
    normalised LayerNorm inputs H_t, drawn from overlapping subspaces (a common mixing matrix plus a task's own);
    a bias, a LayerNorm shift, an embedding without statistic and an integer buffer. Statistics as the store holds
    them: means over each task's rows."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (OUT, IN), "b": (OUT,), "visual.proj": (IN, EMBED), "ln.weight": (IN,), "ln.bias": (IN,),
              "emb": (4, IN)}
    pre = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    pre["steps"] = torch.tensor([7])
    common = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    mix = torch.randn(IN, IN, generator=g, dtype=torch.float64)
    fts, xs, hs = [], [], []
    for t, n in enumerate(rows):
        ft = {k: pre[k] + shared * common[k] + torch.randn(s, generator=g, dtype=torch.float64)
              for k, s in shapes.items()}
        fts.append({**{k: v.to(dtype) for k, v in ft.items()}, "steps": pre["steps"] + t})
        xs.append(torch.randn(n, IN, generator=g, dtype=torch.float64)
                  @ (mix + 0.5 * torch.randn(IN, IN, generator=g, dtype=torch.float64)))
        hs.append(F.layer_norm(torch.randn(n, IN, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, IN),
                               (IN,)))
    grams = [{"w": x.T @ x / len(x), "visual.proj": x.T @ x / len(x), "ln.weight": h.square().mean(0)}
             for x, h in zip(xs, hs)]
    pre = {k: v.to(dtype) if v.is_floating_point() else v for k, v in pre.items()}
    return pre, fts, xs, hs, grams


def reference(pre, fts, xs, hs, lam):
    """theta_0 + lam * T with T the minimum-norm least-squares task vector of each key, written out: per task the
    mean over its rows of the squared drift of the layer's output, summed over the tasks."""
    taus = [{k: ft[k].double() - pre[k].double() for k in pre if pre[k].is_floating_point()} for ft in fts]
    w8 = [1 / len(x) ** 0.5 for x in xs]
    a = torch.cat([x * c for x, c in zip(xs, w8)])  # stacked exemplar inputs of every task
    out = {}
    for key, as_rows in (("w", lambda t: t.T), ("visual.proj", lambda t: t)):  # y = x W^T, and y = x @ proj
        b = torch.cat([x @ as_rows(tau[key]) * c for x, tau, c in zip(xs, taus, w8)])
        sol = torch.linalg.lstsq(a, b, driver="gelsd").solution  # minimum norm where a is rank-deficient
        out[key] = as_rows(sol) if key == "w" else sol
    scale = torch.empty(IN, dtype=torch.float64)  # y = w * x_hat: one least-squares problem per dimension
    for d in range(IN):
        col = torch.cat([h[:, d:d + 1] / len(h) ** 0.5 for h in hs])
        rhs = torch.cat([h[:, d:d + 1] * tau["ln.weight"][d] / len(h) ** 0.5 for h, tau in zip(hs, taus)])
        scale[d] = torch.linalg.lstsq(col, rhs, driver="gelsd").solution[0, 0]
    out["ln.weight"] = scale
    for key in ("b", "ln.bias", "emb"):  # y = x + b: every task's rows weigh alike
        eye = torch.eye(pre[key].numel(), dtype=torch.float64)
        out[key] = torch.linalg.lstsq(torch.cat([eye] * len(fts)),
                                      torch.cat([tau[key].reshape(-1, 1) for tau in taus])
                                      ).solution.reshape(pre[key].shape)
    return {k: pre[k].double() + lam * t for k, t in out.items()}


def check(merged, want, pre, rtol=1e-9, atol=1e-10):
    """merged == want; the keys of the mean (biases, shift, embedding) are averaged in fp32 (fp32 tolerance)."""
    assert list(merged) == list(pre)
    assert torch.equal(merged["steps"], pre["steps"])  # integer buffer from pretrained
    for k, v in want.items():
        assert merged[k].dtype == pre[k].dtype, k
        tol = {"rtol": max(rtol, 1e-6), "atol": max(atol, 1e-6)} if k in ("b", "ln.bias", "emb") else \
            {"rtol": rtol, "atol": atol}
        torch.testing.assert_close(merged[k].double(), v, **tol, msg=k)


def test_lot_is_the_least_squares_task_vector_of_every_layer():
    pre, fts, xs, hs, grams = problem()
    merged = lot_merging(pre, fts, grams, scaling_coef=1.3)
    check(merged, reference(pre, fts, xs, hs, 1.3), pre)
    # the paper's point against RegMean: the same least squares, but over the task vectors (equal here: full rank)
    rm = regmean(pre, fts, [{k: g[k] for k in ("w", "visual.proj")} for g in grams], reduce_non_diagonal_ratio=1.0)
    torch.testing.assert_close(lot_merging(pre, fts, grams)["w"], rm["w"], rtol=1e-9, atol=1e-10)


def test_overlapping_task_vectors_are_not_added_up():
    """Task vectors dominated by one shared direction, inputs sharing a subspace: LOT stays near the common part (a
    weighted average where the tasks' inputs agree), task arithmetic at 1.0 adds it up once per task."""
    pre, fts, xs, hs, grams = problem(shared=5.0, seed=3)
    merged = lot_merging(pre, fts, grams)
    check(merged, reference(pre, fts, xs, hs, 1.0), pre)
    tau = merged["w"] - pre["w"]
    mean_tau = sum(ft["w"] - pre["w"] for ft in fts) / len(fts)
    assert float((tau - mean_tau).norm()) < 0.5 * float(mean_tau.norm())


@pytest.mark.parametrize("gram_dtype", [torch.float64, torch.float32])
def test_singular_grams_fewer_exemplars_than_inputs(gram_dtype):
    """2 + 1 + 2 exemplar rows for 8 inputs: the summed Gram has rank 5. The pseudo-inverse gives the minimum-norm
    least-squares task vector (no ridge): nothing moves along the directions no exemplar reaches. fp32 Grams (as the
    store holds them) are cut at their own precision (in * eps(float32)), fp64 Grams at theirs."""
    pre, fts, xs, hs, grams = problem(rows=(2, 1, 2), seed=1)
    grams = [{k: v.to(gram_dtype) for k, v in g.items()} for g in grams]
    merged = lot_merging(pre, fts, grams, scaling_coef=1.2)
    tol = {"rtol": 1e-9, "atol": 1e-10} if gram_dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    want = reference(pre, fts, xs, hs, 1.2)
    check(merged, want, pre, **tol)
    stacked = torch.cat(xs)
    assert int(torch.linalg.matrix_rank(stacked)) == 5
    null = torch.linalg.svd(stacked).Vh[5:]  # input directions no exemplar reaches
    assert float(((merged["w"] - pre["w"]) @ null.T).abs().max()) < 1e-6
    assert float((null @ (merged["visual.proj"] - pre["visual.proj"])).abs().max()) < 1e-6


def test_ill_conditioned_directions_are_kept():
    """Inputs with singular values from 1 down to 1e-5 (Gram eigenvalues down to 1e-10 of the largest, fp64): real,
    tiny directions, not a null space. The default cut-off (eps * trace, eps of the Grams' dtype) keeps them all; a
    relative cut-off above them drops them."""
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(IN, IN, generator=g, dtype=torch.float64))[0]
    pre, fts, _, hs, grams = problem(seed=4)
    xs = []
    for t, n in enumerate((20, 30, 25)):
        u = torch.linalg.qr(torch.randn(n, IN, generator=g, dtype=torch.float64))[0]
        xs.append(u @ torch.diag(torch.logspace(0, -5, IN, dtype=torch.float64) * (1 + 0.3 * t)) @ basis.T * n ** 0.5)
    grams = [{"w": x.T @ x / len(x), "visual.proj": x.T @ x / len(x), "ln.weight": gr["ln.weight"]}
             for x, gr in zip(xs, grams)]
    want = reference(pre, fts, xs, hs, 1.0)
    check(lot_merging(pre, fts, grams), want, pre, rtol=1e-5, atol=1e-5)  # cond(sum G) = 1e10: fp64 gives 1e-6
    dropped = lot_merging(pre, fts, grams, pinv_cutoff=1e-6)["w"] - pre["w"]
    assert float((dropped @ basis[:, -2:]).abs().max()) < 1e-9  # the two weakest directions left at theta_0
    assert float((dropped - (want["w"] - pre["w"])).abs().max()) > 1e-3


def test_official_cutoff_is_torch_pinv_of_the_fp32_gram():
    """pinv_cutoff=official: the official code's torch.linalg.pinv of the summed fp32 Gram (default tolerance: in *
    eps(float32) * largest) times sum_t G_t tau_t^T, here with Gram eigenvalues 1, 0.1, ..., 1e-4, 3e-6, 3e-7, 1e-9:
    the two below 9.5e-7 are dropped (the default); data (below eps * trace = 1.3e-7) drops only the 1e-9 one. The
    reference takes that tolerance in float64 (an fp32 SVD is itself a few % off on eigenvalues of 1e-6)."""
    g = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(IN, IN, generator=g, dtype=torch.float64))[0]
    pre, fts, _, _, grams = problem(seed=5)
    s = torch.tensor([1, 1e-1, 1e-2, 1e-3, 1e-4, 3e-6, 3e-7, 1e-9], dtype=torch.float64).sqrt()
    xs = [torch.linalg.qr(torch.randn(n, IN, generator=g, dtype=torch.float64))[0] @ torch.diag(s) @ basis.T
          * n ** 0.5 for n in (20, 30, 25)]
    grams = [{**gr, "w": (x.T @ x / len(x)).float(), "visual.proj": (x.T @ x / len(x)).float()}
             for x, gr in zip(xs, grams)]
    lhs = sum(gr["w"].double() for gr in grams)
    rhs = sum(gr["w"].double() @ (ft["w"] - pre["w"]).T for gr, ft in zip(grams, fts))
    want = pre["w"] + 1.2 * (torch.linalg.pinv(lhs, rtol=IN * torch.finfo(torch.float32).eps) @ rhs).T
    got = lot_merging(pre, fts, grams, scaling_coef=1.2, pinv_cutoff="official")["w"]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert int(torch.linalg.matrix_rank(lhs.float())) == IN - 2  # torch's default tolerance: 2 directions dropped
    data = lot_merging(pre, fts, grams, scaling_coef=1.2, pinv_cutoff="data")["w"]
    assert float(((data - got) @ basis[:, -2]).abs().max()) > 1e-2  # the 3e-7 direction: kept by the exact form
    assert torch.equal(lot_merging(pre, fts, grams, scaling_coef=1.2)["w"], got)  # official: the default


def test_one_task_returns_its_weights():
    pre, fts, _, _, grams = problem(rows=(30,))
    merged = lot_merging(pre, fts, grams)
    for k in pre:  # the mean keys (biases, shift, embedding) in fp32
        tol = 1e-6 if k in ("b", "ln.bias", "emb") else 1e-10
        torch.testing.assert_close(merged[k], fts[0][k] if pre[k].is_floating_point() else pre[k], rtol=tol,
                                   atol=tol, msg=k)
    # with a singular Gram: theta_0 plus the task vector projected onto the exemplars' row space
    pre, fts, xs, _, grams = problem(rows=(3,), seed=2)
    merged = lot_merging(pre, fts, grams)
    proj = torch.linalg.pinv(xs[0]) @ xs[0]
    torch.testing.assert_close(merged["w"], pre["w"] + (fts[0]["w"] - pre["w"]) @ proj, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(merged["b"], fts[0]["b"], rtol=1e-6, atol=1e-6)


def test_scales_without_statistic_and_bf16():
    """Grams without the norm scales' moments (RegMean's): the scales take the mean of the task vectors; bf16 weights
    are merged in fp32 / fp64 and returned in bf16."""
    pre, fts, _, _, grams = problem()
    no_scales = [{k: v for k, v in g.items() if k != "ln.weight"} for g in grams]
    merged = lot_merging(pre, fts, no_scales, scaling_coef=0.5)
    mean = sum(ft["ln.weight"] - pre["ln.weight"] for ft in fts) / len(fts)
    torch.testing.assert_close(merged["ln.weight"], pre["ln.weight"] + 0.5 * mean, rtol=1e-6, atol=1e-7)
    bf = {k: v.bfloat16() if v.is_floating_point() else v for k, v in pre.items()}
    out = lot_merging(bf, [{k: v.bfloat16() if v.is_floating_point() else v for k, v in ft.items()} for ft in fts],
                      grams)
    assert out["w"].dtype == torch.bfloat16 and out["steps"].dtype == torch.int64


def test_errors_name_the_key_and_the_task():
    pre, fts, _, _, grams = problem()
    with pytest.raises(ValueError, match=r"'w'.*finetuned\[1\]"):
        lot_merging(pre, fts, [grams[0], {k: v for k, v in grams[1].items() if k != "w"}, grams[2]])
    bad = [dict(g) for g in grams]
    bad[2]["w"] = torch.eye(OUT, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lot_merging: the Gram of 'w' for finetuned\[2\] has shape \(5, 5\)"):
        lot_merging(pre, fts, bad)
    with pytest.raises(ValueError, match=r"'ln.weight' for finetuned\[0\] has shape \(3,\)"):
        lot_merging(pre, fts, [{**g, "ln.weight": torch.ones(3)} for g in grams])
    with pytest.raises(ValueError, match=r"'ln.weight' for finetuned\[0\] has negative"):
        lot_merging(pre, fts, [{**g, "ln.weight": -torch.ones(IN)} for g in grams])
    with pytest.raises(ValueError, match="'steps'"):
        lot_merging(pre, fts, [{**g, "steps": torch.ones(1)} for g in grams])
    with pytest.raises(ValueError, match="one Gram mapping per"):
        lot_merging(pre, fts, grams[:2])
    for bad_cutoff in (1.0, -0.1, "exact", None):
        with pytest.raises(ValueError, match="pinv_cutoff"):
            lot_merging(pre, fts, grams, pinv_cutoff=bad_cutoff)
    with pytest.raises(TypeError, match="scaling_coef"):
        lot_merging(pre, fts, grams, scaling_coef=[1.0, 1.0, 1.0])


def test_norm_scale_statistic_is_the_mean_of_x_hat_squared():
    """input_grams(norm_scales=True): per normalisation scale the mean of x_hat^2 over the positions counted (padding
    excluded with `positions`), next to the unchanged Grams: open_clip's LayerNorm and T5's RMS norm."""
    from open_clip.transformer import LayerNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(0)
    model = nn.Sequential(LayerNorm(6), nn.Linear(6, 6), T5LayerNorm(6), nn.Linear(6, 2)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5), model[2].weight.uniform_(0.5, 1.5)
    batches = [torch.randn(3, 4, 6) * torch.linspace(0.5, 4, 6) + 1.0 for _ in range(2)]
    mask = [torch.rand(3, 4) > 0.3 for _ in batches]
    which = {id(b): m for b, m in zip(batches, mask)}
    positions = lambda key, b: which[id(b)]
    plain, _ = input_grams(model, batches, positions=positions)
    got, n = input_grams(model, batches, positions=positions, norm_scales=True)
    assert n == 6 and set(got) == set(plain) | {"0.weight", "2.weight"}
    assert all(torch.equal(got[k], plain[k]) for k in plain)
    ln_in = torch.cat([b[m] for b, m in zip(batches, mask)]).double()
    x_hat = (ln_in - ln_in.mean(-1, keepdim=True)) / (ln_in.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(got["0.weight"].double(), x_hat.square().mean(0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        rms_in = torch.cat([model[1](model[0](b))[m] for b, m in zip(batches, mask)]).double()
    r_hat = rms_in / (rms_in.square().mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(got["2.weight"].double(), r_hat.square().mean(0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# through the pipeline
# ---------------------------------------------------------------------------------------------
FAST = ["taskpool.tasks=[colors,position]", "model.train.steps=4", "model.train.warmup_steps=1",
        "model.train.batch_size=16", "model.train.checkpoint_every=10", "model.eval_batch_size=200"]


def _no_training(monkeypatch):
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("fine-tuned"))


@pytest.mark.parametrize("overrides,match", [
    (["method.pinv_cutoff=1.5"], r"method\.pinv_cutoff=1\.5"),
    (["method.pinv_cutoff=exact"], r"method\.pinv_cutoff='exact'"),
    (["method.scaling_coef=[1.0,1.0]"], r"method\.scaling_coef"),
    (["method.statistics.norm_scales=3"], r"method\.statistics\.norm_scales=3: must be true or false"),
    (["method.statistics.num_samples=0"], r"method\.statistics\.num_samples=0"),
    (["+method.ridge=0.1"], r"method\.ridge=0\.1: method lot_merging has no setting 'ridge'"),
    (["finetune=linear"], "method=lot_merging needs input Gram matrices.*linearized model"),
], ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_bad_settings_refused_before_any_training(make_cfg, tmp_path, monkeypatch, overrides, match):
    _no_training(monkeypatch)
    with pytest.raises(ConfigError, match=match):
        run(make_cfg(*FAST, "method=lot_merging", *overrides, f"paths.store={tmp_path}/empty"), tmp_path / "r",
            "lot_merging")
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.safetensors"))


def test_end_to_end_merge_equals_the_function_over_the_stored_statistics(make_cfg, tmp_path, monkeypatch):
    from fusion_bench.families import build_family
    from fusion_bench.stages import statistics
    from fusion_bench.stages.finetune import finetuned_state
    from fusion_bench.stages.merge import Method

    cfg = make_cfg(*FAST, "method=lot_merging", "method.statistics.num_samples=24")
    report = run(cfg, tmp_path / "lot", "lot_merging")
    assert report["scaling_coef"] == 1.2 and all(0.0 <= r["merged"] <= 1.0 for r in report["tasks"].values())
    fam = build_family(cfg)
    tasks = list(fam.tasks)
    method = Method(cfg.method, "standard", "lot_merging")
    spec = statistics.spec(method)
    regmean_spec = statistics.spec(Method(make_cfg(*FAST, "method=regmean", "method.statistics.num_samples=24"
                                                   ).method, "standard", "regmean"))
    assert statistics.path(fam, tasks[0], spec) != statistics.path(fam, tasks[0], regmean_spec)
    monkeypatch.setattr(type(fam), "grams", lambda *a, **k: pytest.fail("recomputed a stored statistic"))
    stats = statistics.task_statistics(fam, method, tasks)["grams"]
    fts = [finetuned_state(fam, t) for t in tasks]
    scales = [k for k in fam.pretrained_state if k.endswith((".ln_1.weight", ".ln_2.weight")) or k in
              ("ln_pre.weight", "ln_post.weight")]
    assert scales and all(s[k].dim() == 1 for s in stats for k in scales)
    assert all(s["transformer.resblocks.0.attn.in_proj_weight"].shape == (128, 128) for s in stats)
    want = lot_merging(fam.pretrained_state, fts, stats, scaling_coef=1.2)
    written = load_file(tmp_path / "lot" / "merged.safetensors")
    assert set(written) == set(want)
    for k in want:
        torch.testing.assert_close(written[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    # the stored moments are those of each task's own fine-tune on its exemplars
    model = fam.model_with(fts[0])
    direct, _ = input_grams(model, fam.batches(tasks[0], "train", 24, 0, 16), forward=lambda m, b: m(b[0]),
                            size=lambda b: len(b[0]), norm_scales=True)
    for k in scales[:2]:
        torch.testing.assert_close(stats[0][k], direct[k], rtol=1e-5, atol=1e-6)
