"""RegMean and Fisher merging against closed forms and hand-computed cases written here."""

from __future__ import annotations

import pytest
import torch

from fusion_bench.merging import fisher_merging, regmean, weight_average

pytestmark = pytest.mark.usefixtures("one_thread")

IN, OUT, EMBED = 5, 3, 4


def linear_tasks(n_tasks=3, seed=0, dtype=torch.float64):
    """One nn.Linear-like map ``w`` [OUT, IN], a bias, open_clip's ``proj`` [IN, EMBED] (x @ proj), a buffer;
    per task inputs X_t with different numbers of samples."""
    g = torch.Generator().manual_seed(seed)
    pre = {
        "w": torch.randn(OUT, IN, generator=g),
        "b": torch.randn(OUT, generator=g),
        "visual.proj": torch.randn(IN, EMBED, generator=g),
        "steps": torch.tensor([7]),
    }
    fts, xs = [], []
    for t in range(n_tasks):
        ft = {
            k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + t
            for k, v in pre.items()
        }
        fts.append({k: v.to(dtype) if v.is_floating_point() else v for k, v in ft.items()})
        xs.append(
            torch.randn(4 + 3 * t, IN, generator=g, dtype=torch.float64)
            @ torch.randn(IN, IN, generator=g, dtype=torch.float64)
        )
    pre = {k: v.to(dtype) if v.is_floating_point() else v for k, v in pre.items()}
    grams = [{"w": x.T @ x / len(x), "visual.proj": x.T @ x / len(x)} for x in xs]
    return pre, fts, xs, grams


def test_regmean_a1_is_the_least_squares_merge():
    pre, fts, xs, grams = linear_tasks()
    merged = regmean(pre, fts, grams, reduce_non_diagonal_ratio=1.0)
    # min_W sum_t (1/N_t) ||X_t W^T - X_t W_t^T||^2: one stacked least-squares problem
    A = torch.cat([x / len(x) ** 0.5 for x in xs])
    for key, target in (("w", lambda ft: ft["w"].T), ("visual.proj", lambda ft: ft["visual.proj"])):
        Y = torch.cat([x @ target(ft) / len(x) ** 0.5 for x, ft in zip(xs, fts)])
        sol = torch.linalg.lstsq(A, Y).solution  # [IN, OUT] = W^T, or proj itself
        want = sol.T if key == "w" else sol
        torch.testing.assert_close(merged[key], want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(merged["b"], torch.stack([ft["b"] for ft in fts]).mean(0))
    assert torch.equal(merged["steps"], pre["steps"])  # integer buffer from pretrained


def test_regmean_a_below_1_is_the_hand_formula():
    pre, fts, _, grams = linear_tasks()
    a = 0.6
    red = [a * g["w"] + (1 - a) * torch.diag(torch.diagonal(g["w"])) for g in grams]
    want = sum(ft["w"] @ r for ft, r in zip(fts, red)) @ torch.linalg.inv(sum(red))
    want_proj = torch.linalg.inv(sum(red)) @ sum(r @ ft["visual.proj"] for ft, r in zip(fts, red))
    merged = regmean(pre, fts, grams, reduce_non_diagonal_ratio=a)
    torch.testing.assert_close(merged["w"], want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(merged["visual.proj"], want_proj, rtol=1e-8, atol=1e-10)


def test_regmean_with_identical_grams_is_the_mean_in_pretrained_dtype():
    pre, fts, _, grams = linear_tasks(dtype=torch.float32)
    same = [grams[0]] * len(fts)
    merged = regmean(pre, fts, same)
    mean = weight_average(pre, fts)
    for k in ("w", "b", "visual.proj"):
        torch.testing.assert_close(merged[k], mean[k], rtol=1e-5, atol=1e-6)
    bf = {k: v.bfloat16() if v.is_floating_point() else v for k, v in pre.items()}
    out = regmean(bf, fts, same)
    assert out["w"].dtype == torch.bfloat16 and out["steps"].dtype == torch.int64
    assert list(out) == list(pre)


def test_regmean_depends_on_the_grams_scale_per_task_not_on_a_common_one():
    """Why the Grams' normalisation matters: one factor for every task (per-token vs per-sample Grams of CLIP,
    where every image has the same number of tokens) leaves the merge unchanged; a factor per task (per-sample
    Grams of T5 tasks with different sequence lengths: 8, 40, 16 tokens) moves it."""
    pre, fts, _, grams = linear_tasks()
    ref = regmean(pre, fts, grams, reduce_non_diagonal_ratio=0.9)
    common = regmean(pre, fts, [{k: 50 * g for k, g in gs.items()} for gs in grams], reduce_non_diagonal_ratio=0.9)
    per_task = regmean(pre, fts, [{k: c * g for k, g in gs.items()} for c, gs in zip((8, 40, 16), grams)],
                       reduce_non_diagonal_ratio=0.9)
    for k in ("w", "visual.proj"):
        torch.testing.assert_close(common[k], ref[k], rtol=1e-12, atol=1e-12)
        assert float((per_task[k] - ref[k]).norm()) > 0.05 * float(ref[k].norm())


def test_regmean_errors_name_key_and_task():
    pre, fts, _, grams = linear_tasks()
    partial = [grams[0], {"visual.proj": grams[1]["visual.proj"]}, grams[2]]
    with pytest.raises(ValueError, match=r"'w'.*finetuned\[1\]"):
        regmean(pre, fts, partial)
    bad = [dict(g) for g in grams]
    bad[2]["w"] = torch.eye(OUT)
    with pytest.raises(ValueError, match=r"'w' for finetuned\[2\] has shape \(3, 3\)"):
        regmean(pre, fts, bad)
    with pytest.raises(ValueError, match="'b'"):
        regmean(pre, fts, [{**g, "b": torch.eye(OUT)} for g in grams])
    with pytest.raises(ValueError, match="one Gram mapping per"):
        regmean(pre, fts, grams[:2])
    with pytest.raises(ValueError, match="'w'.*singular"):
        regmean(pre, fts, [{"w": torch.zeros(IN, IN)} for _ in grams])


# ---------------------------------------------------------------------------------------------
# Fisher merging
# ---------------------------------------------------------------------------------------------
def test_fisher_merging_hand_computed():
    pre = {"p": torch.tensor([0.0, 0.0]), "n": torch.tensor([1, 2])}
    fts = [
        {"p": torch.tensor([1.0, 2.0]), "n": torch.tensor([5, 5])},
        {"p": torch.tensor([3.0, 4.0]), "n": pre["n"]},
    ]
    fishers = [{"p": torch.tensor([1.0, 0.0])}, {"p": torch.tensor([3.0, 0.0])}]
    # unnormalized: (1*1 + 3*3) / (1 + 3) = 2.5; both below the floor: plain mean (2 + 4) / 2 = 3
    out = fisher_merging(pre, fts, fishers, normalize=False)
    torch.testing.assert_close(out["p"], torch.tensor([2.5, 3.0]))
    assert torch.equal(out["n"], pre["n"])
    # normalized (reference default): c = 1/||F_t|| = (1, 1/3): (1*1 + 1 * 3) / 2 = 2; (2 + 4/3) / (4/3) = 2.5
    out = fisher_merging(pre, fts, fishers)
    torch.testing.assert_close(out["p"], torch.tensor([2.0, 2.5]))
    # per-model coefficients: (1*1*1 + 3*3*3) / (1 + 9) = 2.8
    out = fisher_merging(pre, fts, fishers, normalize=False, coefficients=[1.0, 3.0])
    torch.testing.assert_close(out["p"][0], torch.tensor(2.8))


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_merging_equal_fishers_mean_and_dominant_model(normalize):
    pre, fts, _, _ = linear_tasks(dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    f = {k: torch.rand(pre[k].shape, generator=g) for k in ("w", "b")}
    out = fisher_merging(pre, fts, [f] * len(fts), normalize=normalize)
    mean = weight_average(pre, fts)
    for k in ("w", "b", "visual.proj"):  # visual.proj has no Fisher: mean
        torch.testing.assert_close(out[k], mean[k], rtol=1e-5, atol=1e-6)
    dominant = [{k: v * (1e6 if t == 1 else 1.0) for k, v in f.items()} for t in range(len(fts))]
    out = fisher_merging(pre, fts, dominant, normalize=False)
    torch.testing.assert_close(out["w"], fts[1]["w"], rtol=1e-4, atol=1e-4)


def test_fisher_merging_errors():
    pre, fts, _, _ = linear_tasks()
    f = {"w": torch.ones(OUT, IN)}
    with pytest.raises(ValueError, match=r"'w'.*finetuned\[2\]"):
        fisher_merging(pre, fts, [f, f, {}])
    with pytest.raises(ValueError, match=r"'w' for finetuned\[0\] has shape"):
        fisher_merging(pre, fts, [{"w": torch.ones(IN, OUT)}, f, f])
    with pytest.raises(ValueError, match="zero everywhere"):
        fisher_merging(pre, fts, [f, f, {"w": torch.zeros(OUT, IN)}])
    with pytest.raises(ValueError, match="'steps'"):
        fisher_merging(pre, fts, [{"steps": torch.ones(1)}] * 3)
