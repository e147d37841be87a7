"""Options that follow a reference code where the house default does not (issue 28), each against a plain
re-implementation written here: the exact label expectation of the Fisher (mmatena/model_merging) and Model
Stock's mean-of-angles ratio for more than two models (the reference framework, FusionBench)."""

from __future__ import annotations

import logging
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_fisher_close as assert_fisher_close_within
from helpers import classification_batches, tiny_classifier
from torch import nn

from fusion_bench.merging import model_stock
from fusion_bench.merging.model_stock import model_stock_ratio
from fusion_bench.statistics import diagonal_fisher, fisher

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]


# ---------------------------------------------------------------------------------------------
# Fisher: target="expected"
# ---------------------------------------------------------------------------------------------
def brute_expected_fisher(model, batches):
    """sum over samples and labels of p(y|x) (d log p(y|x))^2 / N, one autograd call per (sample, label)."""
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    n = 0
    for x, _ in batches:
        for i in range(len(x)):
            logp = F.log_softmax(model(x[i : i + 1]).double(), -1)[0]
            for y in range(logp.numel()):
                g = torch.autograd.grad(logp[y], list(params.values()), retain_graph=True)
                for k, gk in zip(params, g):
                    acc[k] += float(logp[y].detach().exp()) * gk.double() ** 2
            n += 1
    return {k: v / n for k, v in acc.items()}


def mlp(seed=0):
    return tiny_classifier(seed, classes=5)


def batches(sizes=(3, 2), shape=(4,), classes=5):
    return classification_batches(sizes=sizes, shape=shape, classes=classes)


def assert_fisher_close(got, want):
    assert_fisher_close_within(got, want, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 2, None])  # 5 classes: chunks of 1, 2 (+ a remainder of 1), all
def test_expected_fisher_matches_a_loop_over_labels(chunk, caplog):
    model, data = mlp(), batches()
    with caplog.at_level(logging.WARNING, logger="fusion_bench.statistics.fisher"):
        got, n = diagonal_fisher(model, data, target="expected", chunk=chunk)
    assert n == 5 and "vmap failed" not in caplog.text
    assert_fisher_close(got, brute_expected_fisher(model, data))
    # one sample: the p(y|x)-weighted mean of the label Fishers of every label
    x = data[0][0][:1]
    p = torch.softmax(model(x), -1)[0].detach()
    one, _ = diagonal_fisher(model, [(x, None)], target="expected")
    mix = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in one.items()}
    for y in range(5):
        fy, _ = diagonal_fisher(model, [(x, torch.tensor([y]))], target="label")
        for k in mix:
            mix[k] += float(p[y]) * fy[k].double()
    assert_fisher_close(one, mix)


def test_expected_fisher_through_open_clip_attention(caplog):
    torch.manual_seed(0)
    vit = open_clip.transformer.VisionTransformer(
        image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_ratio=2, output_dim=8
    )
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = nn.Sequential(vit, nn.Linear(8, 4)).eval()
    data = batches(sizes=(2,), shape=(3, 16, 16), classes=4)
    with caplog.at_level(logging.WARNING, logger="fusion_bench.statistics.fisher"):
        got, n = diagonal_fisher(model, data, target="expected", chunk=3)
    assert n == 2 and "vmap failed" not in caplog.text  # vmap over the vjp runs through nn.MultiheadAttention
    assert_fisher_close(got, brute_expected_fisher(model, data))


def test_expected_fisher_loop_fallback_and_bad_input(monkeypatch, caplog):
    model, data = mlp(), batches()

    def no_vmap(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no vmap here")

        return fail

    monkeypatch.setattr(fisher, "vmap", no_vmap)
    with caplog.at_level(logging.WARNING, logger="fusion_bench.statistics.fisher"):
        got, _ = diagonal_fisher(model, data, target="expected", chunk=2)
    assert caplog.text.count("vmap failed") == 1  # logged once, then the loop for every sample
    assert_fisher_close(got, brute_expected_fisher(model, data))
    with pytest.raises(ValueError, match="target='expected' sums over the classes"):
        diagonal_fisher(model, data, lambda m, x, y: m(x)[:, 0], target="expected")
    with pytest.raises(ValueError, match="one of \\('sample', 'label', 'expected'\\)"):
        diagonal_fisher(model, data, target="exact")


# ---------------------------------------------------------------------------------------------
# Model Stock: average="angle" (the reference framework's ratio for more than two models)
# ---------------------------------------------------------------------------------------------
def plain_model_stock(pre, fts, average):
    """Per key: pairwise cosines, then their mean or cos(mean arccos), t = k c / (1 + (k - 1) c)."""
    out = {}
    k = len(fts)
    for key in pre:
        if not pre[key].is_floating_point():
            out[key] = pre[key]
            continue
        vecs = [(ft[key].double() - pre[key].double()).reshape(-1) for ft in fts]
        cosines = [
            float(vecs[i] @ vecs[j] / (vecs[i].norm() * vecs[j].norm()))
            for i in range(k)
            for j in range(i + 1, k)
        ]
        if average == "cosine":
            c = sum(cosines) / len(cosines)
        else:
            c = math.cos(sum(math.acos(max(-1.0, min(1.0, x))) for x in cosines) / len(cosines))
        t = k * c / (1 + (k - 1) * c)
        out[key] = t * sum(ft[key].double() for ft in fts) / k + (1 - t) * pre[key].double()
    return out


def stock_models(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g), "n": torch.arange(3)}
    shared = {key: torch.randn(v.shape, generator=g) for key, v in pre.items() if v.is_floating_point()}
    fts = []
    for t in range(k):  # a shared direction plus task noise of growing size: unequal pairwise angles
        ft = dict(pre)
        for key, s in shared.items():
            ft[key] = pre[key] + s + (0.3 + 0.4 * t) * torch.randn(s.shape, generator=g)
        fts.append(ft)
    return pre, fts


@pytest.mark.parametrize("k", [2, 3, 5])
def test_model_stock_angle_and_cosine_averages_match_a_plain_loop(k):
    pre, fts = stock_models(k)
    got = {avg: model_stock(pre, fts, average=avg) for avg in ("cosine", "angle")}
    for avg, out in got.items():
        want = plain_model_stock(pre, fts, avg)
        assert torch.equal(out["n"], pre["n"])
        for key in ("a", "b"):
            torch.testing.assert_close(out[key].double(), want[key], rtol=1e-5, atol=1e-6, msg=f"{avg} {key}")
    same = all(
        torch.allclose(got["cosine"][key], got["angle"][key], rtol=1e-6, atol=1e-7) for key in ("a", "b")
    )
    assert same == (k == 2)  # two models: one angle, the averages agree; more: they differ
    with pytest.raises(ValueError, match="average='median'"):
        model_stock(pre, fts, average="median")


def test_model_stock_ratio_of_equal_angles_is_the_papers_formula():
    # three unit vectors with pairwise cosine 0.5 (60 degrees): both averages give t = 3 * 0.5 / (1 + 2 * 0.5)
    gram = torch.tensor([[1.0, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 1.0]])
    for avg in ("cosine", "angle"):
        assert model_stock_ratio(gram, avg) == pytest.approx(0.75, rel=1e-12)
