"""CART (fusion_bench/merging/cart.py) against a plain float64 reference written here (the centred task vectors,
one full torch.linalg.svd each, truncated, summed), on independent and on overlapping task vectors, tall, wide and
non-2-D keys; a hand-computed case; the official key rule; bad settings refused; one run through the pipeline."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import assert_bad_values_refused_by_name, save_models, store_fake_finetunes
from safetensors.torch import load_file

from fusion_bench.errors import ConfigError
from fusion_bench.merging.cart import cart, cart_key, cart_rank, is_official_key
from fusion_bench.merging.weight_average import weight_average

pytestmark = pytest.mark.usefixtures("one_thread")

# open_clip-like names: keys="official" truncates the two block weights and averages everything else
SHAPES = {
    "blocks.0.attn.in_proj_weight": (36, 12),  # tall
    "blocks.0.mlp.c_proj.weight": (12, 40),  # wide
    "blocks.0.attn.out_proj.weight": (12, 12),  # square
    "proj": (12, 8),  # 2-D, not an attn / mlp weight: the weight average under keys=official
    "conv1.weight": (4, 3, 2, 2),
    "blocks.0.attn.in_proj_bias": (36,),
    "logit_scale": (),
}
TRUNCATED_OFFICIAL = ["blocks.0.attn.in_proj_weight", "blocks.0.mlp.c_proj.weight", "blocks.0.attn.out_proj.weight"]


# ---------------------------------------------------------------------------------------------
# inputs and the plain reference
# ---------------------------------------------------------------------------------------------
def make_models(n_tasks=4, seed=0, dtype=torch.float32, shared=1.0):
    """theta_0 and fine-tunes whose task vectors overlap: a shared low-rank part with a task-dependent amplitude
    (so it survives the centring), a task-specific low-rank part and noise; an int and a bool buffer."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    base = {k: _low_rank(s, 3, g) if len(s) == 2 else torch.randn(s, generator=g) for k, s in SHAPES.items()}
    fts = []
    for t in range(n_tasks):
        amp = 0.5 + t / n_tasks
        ft = {}
        for k, s in SHAPES.items():
            own = _low_rank(s, 2, g) if len(s) == 2 else torch.zeros(s)
            ft[k] = (pre[k] + 0.05 * (shared * amp * base[k] + own + 0.2 * torch.randn(s, generator=g))).to(dtype)
        ft["steps"] = torch.tensor(5 + t)  # never merged
        ft["mask"] = torch.tensor([t % 2 == 0, True])
        fts.append(ft)
    pre = {k: v.to(dtype) for k, v in pre.items()}
    pre["steps"] = torch.tensor(3)
    pre["mask"] = torch.tensor([False, False])
    return pre, fts


def _low_rank(shape, k, g):
    return torch.randn(shape[0], k, generator=g) @ torch.randn(k, shape[1], generator=g) / k**0.5


def taus64(pre, fts, key):
    """The task vectors of one key as the merge sees them (fp32 differences), in float64."""
    return [(ft[key].float() - pre[key].float()).double() for ft in fts]


def plain_cart_update(taus, rank_ratio, lam):
    """mean_t tau_t + lam * sum_t SVD_k(tau_t - mean), k = max(1, int(rank_ratio * r)); one full SVD per task."""
    mean = sum(taus) / len(taus)
    r = min(mean.shape)
    k = 0 if rank_ratio == 0 else max(1, int(rank_ratio * r))
    low = torch.zeros_like(mean)
    for tau in taus:
        U, S, Vh = torch.linalg.svd(tau - mean, full_matrices=False)
        low += U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
    return mean + lam * low


def plain_cart(pre, fts, rank_ratio=0.12, lam=2.0, truncated=TRUNCATED_OFFICIAL):
    out = {}
    for k in SHAPES:
        taus = taus64(pre, fts, k)
        upd = plain_cart_update(taus, rank_ratio, lam) if k in truncated else sum(taus) / len(taus)
        out[k] = pre[k].double() + upd
    return out


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def assert_merge(out, pre, ref, tol=1e-5):
    assert list(out) == list(pre)
    for k in SHAPES:
        assert out[k].dtype == pre[k].dtype and out[k].shape == pre[k].shape, k
        upd, want = out[k].double() - pre[k].double(), ref[k] - pre[k].double()
        assert rel(upd, want) <= tol, (k, rel(upd, want))
    assert torch.equal(out["steps"], pre["steps"]) and torch.equal(out["mask"], pre["mask"])


def overlapping(shape, T, shared=3.0, shared_rank=8, task_rank=4, noise=0.1, seed=0):
    """fp32 task vectors of one key sharing directions: a shared low-rank part (amplitude varying by task, so the
    centred vectors share it too), a task low-rank part, noise; 1e-3 scale (as test_spectral_overlap)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape

    def lr(k):
        return torch.randn(rows, k, generator=g) @ torch.randn(k, cols, generator=g) / k

    base = lr(shared_rank)
    out = []
    for _ in range(T):
        amp = 0.5 + torch.rand(1, generator=g)
        out.append((1e-3 * (shared * amp * base + lr(task_rank) + noise * torch.randn(rows, cols, generator=g))).float())
    return out


def run_key(taus, k, lam=1.0):
    upd = cart_key(taus, k, lam)
    return upd() if callable(upd) else upd


# ---------------------------------------------------------------------------------------------
# the fast form (Gram eigendecompositions, one product) against the plain one
# ---------------------------------------------------------------------------------------------
CASES = {
    "independent": {"shape": (96, 96), "T": 8, "shared": 0.0},
    "overlapping": {"shape": (96, 96), "T": 8},
    "strongly_overlapping": {"shape": (96, 96), "T": 8, "shared": 10.0},
    "tall": {"shape": (192, 64), "T": 8},
    "wide": {"shape": (64, 192), "T": 8},
    "many_tasks": {"shape": (120, 100), "T": 20},
    "three_tasks": {"shape": (80, 48), "T": 3},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rank_ratio", [0.12, 0.3])
def test_cart_key_equals_plain_float64_definition(case, rank_ratio):
    taus = overlapping(**CASES[case])
    r = min(taus[0].shape)
    want = plain_cart_update([t.double() for t in taus], rank_ratio, 1.7)
    got = run_key(taus, cart_rank(r, rank_ratio), 1.7)
    assert got.dtype == torch.float32
    assert rel(got, want) <= 1e-5
    low_got = got.double() - sum(t.double() for t in taus) / len(taus)  # the low-rank part alone, too
    low_want = want - sum(t.double() for t in taus) / len(taus)
    assert rel(low_got, low_want) <= 1e-5


def test_overlap_survives_the_centring():
    """The overlapping cases do share directions after centring (the shared part's amplitude varies by task): the
    centred task vectors are far from orthogonal, unlike independent ones (|cos| ~ 1 / (T - 1) from the centring)."""
    def mean_abs_cos(taus):
        mean = sum(t.double() for t in taus) / len(taus)
        C = torch.stack([(t.double() - mean).flatten() for t in taus])
        C = C / C.norm(dim=1, keepdim=True)
        n = len(taus)
        return float(((C @ C.T).abs().sum() - n) / (n * (n - 1)))

    assert mean_abs_cos(overlapping(**CASES["strongly_overlapping"])) > 0.5
    assert mean_abs_cos(overlapping(**CASES["independent"])) < 0.16


def test_rank_deficient_task_vectors_need_no_tolerance():
    """LoRA-like rank-4 task vectors: each centred vector has rank <= 12, far below r = 64; beyond its rank the
    Gram eigenvectors are arbitrary, but c q = 0 there, so the truncation equals the plain one (unique)."""
    g = torch.Generator().manual_seed(3)
    taus = [(torch.randn(96, 4, generator=g) @ torch.randn(4, 64, generator=g) * 1e-3).float() for _ in range(3)]
    for k in (6, 20, 40):  # below, above and far above the centred vectors' rank
        want = plain_cart_update([t.double() for t in taus], k / 64, 1.0)
        assert cart_rank(64, k / 64) == k
        assert rel(run_key(taus, k), want) <= 1e-5, k


def test_full_rank_and_zero_rank_give_the_weight_average():
    taus = overlapping((40, 24), 4)
    mean = sum(t.double() for t in taus) / 4
    for k in (0, 24):  # nothing added / every c_t whole: sum_t c_t = 0
        assert rel(run_key(taus, k, 2.0), mean) <= 1e-6, k


def test_cart_rank_is_the_official_parsed_dim():
    assert cart_rank(768, 0.12) == 92  # int(92.16)
    assert cart_rank(768, 0.08) == 61
    assert cart_rank(10, 0.05) == 1  # max(1, int(0.5))
    assert cart_rank(10, 0.0) == 0  # the code's rank_ratio == 0 branch: nothing added
    assert cart_rank(10, 1.0) == 10
    assert cart_rank(100, 0.29) == 28  # Python's int(0.29 * 100) = int(28.999999999999996), as the code


# ---------------------------------------------------------------------------------------------
# whole merges
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_tasks", [3, 5])
@pytest.mark.parametrize(("rank_ratio", "lam"), [(0.12, 2.0), (0.3, 0.7)])
def test_cart_matches_plain_reference_official_keys(n_tasks, rank_ratio, lam):
    pre, fts = make_models(n_tasks, seed=n_tasks)
    out = cart(pre, fts, scaling_coef=lam, rank_ratio=rank_ratio)
    assert_merge(out, pre, plain_cart(pre, fts, rank_ratio, lam))


def test_cart_all_2d_truncates_every_2d_key():
    pre, fts = make_models(4, seed=7)
    two_d = [k for k, s in SHAPES.items() if len(s) == 2]
    out = cart(pre, fts, scaling_coef=1.5, rank_ratio=0.25, keys="all_2d")
    assert_merge(out, pre, plain_cart(pre, fts, 0.25, 1.5, truncated=two_d))
    official = cart(pre, fts, scaling_coef=1.5, rank_ratio=0.25)
    assert not torch.allclose(out["proj"], official["proj"])  # proj: truncated vs averaged
    torch.testing.assert_close(out["blocks.0.attn.in_proj_weight"], official["blocks.0.attn.in_proj_weight"])


def test_untruncated_keys_are_the_weight_average():
    pre, fts = make_models(4, seed=8)
    out, avg = cart(pre, fts), weight_average(pre, fts)
    for k in ("proj", "conv1.weight", "blocks.0.attn.in_proj_bias", "logit_scale"):
        torch.testing.assert_close(out[k], avg[k], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(out["blocks.0.attn.in_proj_weight"], avg["blocks.0.attn.in_proj_weight"])


def test_hand_computed_case():
    """Three tasks, one 2x2 key: mean M = [[1, 1], [0, 1]], centred c_1 = diag(4, 1), c_2 = diag(-1, -3),
    c_3 = diag(-3, 2) (sum 0). k = max(1, int(0.5 * 2)) = 1: SVD_1 keeps the largest |diagonal| entry:
    diag(4, 0) + diag(0, -3) + diag(-3, 0) = diag(1, -3). theta = theta_0 + M + 2 * diag(1, -3)."""
    M = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    C = [torch.diag(torch.tensor(v)) for v in ([4.0, 1.0], [-1.0, -3.0], [-3.0, 2.0])]
    pre = {"l.attn.out_proj.weight": torch.tensor([[0.5, -1.0], [2.0, 0.0]]), "l.attn.out_proj.bias": torch.zeros(2)}
    fts = [{"l.attn.out_proj.weight": pre["l.attn.out_proj.weight"] + M + c,
            "l.attn.out_proj.bias": torch.tensor([float(t), 0.0])} for t, c in enumerate(C)]
    out = cart(pre, fts, scaling_coef=2.0, rank_ratio=0.5)
    want = pre["l.attn.out_proj.weight"] + M + 2.0 * torch.tensor([[1.0, 0.0], [0.0, -3.0]])
    torch.testing.assert_close(out["l.attn.out_proj.weight"], want)
    torch.testing.assert_close(out["l.attn.out_proj.bias"], torch.tensor([1.0, 0.0]))  # the mean of 0, 1, 2


def test_two_tasks_is_weight_averaging():
    """c_2 = -c_1 and SVD_k(-c) = -SVD_k(c): the truncations cancel."""
    pre, fts = make_models(2, seed=9)
    out, avg = cart(pre, fts, scaling_coef=2.0, rank_ratio=0.3), weight_average(pre, fts)
    for k in SHAPES:
        torch.testing.assert_close(out[k], avg[k], rtol=1e-5, atol=1e-6)


def test_not_affine_a_line_through_the_weight_average():
    """theta(c) = theta_avg + c * L: the line passes through theta_avg at c = 0, not theta_0 (affine=False)."""
    pre, fts = make_models(4, seed=10)
    avg = weight_average(pre, fts)
    at0 = cart(pre, fts, scaling_coef=0.0)
    at1 = cart(pre, fts, scaling_coef=1.0)
    at3 = cart(pre, fts, scaling_coef=3.0)
    for k in SHAPES:
        torch.testing.assert_close(at0[k], avg[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(at3[k], avg[k] + 3.0 * (at1[k] - avg[k]), rtol=1e-5, atol=1e-5)
    assert cart.affine_in_scaling_coef is False


def test_zero_task_vectors_and_one_task():
    pre, _ = make_models(1)
    same = cart(pre, [dict(pre) for _ in range(3)])
    assert all(torch.equal(same[k], pre[k]) for k in pre)
    _, fts = make_models(1, seed=11)
    one = cart(pre, fts[:1])  # one task: theta_avg = theta_1, the centred vector is 0
    for k in SHAPES:
        torch.testing.assert_close(one[k], fts[0][k], rtol=1e-6, atol=1e-6)


def test_official_key_rule():
    for name in ("visual.transformer.resblocks.11.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.weight",
                 "transformer.resblocks.3.mlp.c_fc.weight", "transformer.resblocks.3.mlp.c_proj.weight",
                 "encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.1.layer.2.DenseReluDense.wo.weight"):
        assert is_official_key(name), name
    for name in ("transformer.resblocks.0.attn.in_proj_bias", "transformer.resblocks.0.ln_1.weight",
                 "positional_embedding", "proj", "conv1.weight", "shared.weight", "class_embedding"):
        assert not is_official_key(name), name


def test_official_keys_refused_without_any_block_weight():
    g = torch.Generator().manual_seed(12)
    pre = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(3, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    with pytest.raises(ValueError, match=r"keys='official' selects none of the 1 2-D keys.*keys='all_2d'"):
        cart(pre, fts)
    out = cart(pre, fts, keys="all_2d", rank_ratio=0.25)
    want = pre["w"].double() + plain_cart_update(taus64(pre, fts, "w"), 0.25, 2.0)
    assert rel(out["w"].double() - pre["w"].double(), want - pre["w"].double()) <= 1e-5


def test_logs_the_truncated_keys(caplog):
    pre, fts = make_models(3, seed=13)
    with caplog.at_level(logging.INFO, logger="fusion_bench.merging"):
        cart(pre, fts, rank_ratio=0.25)
    msg = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cart:")]
    assert len(msg) == 1 and "3 keys truncated" in msg[0] and "3 of 12" in msg[0]


def test_lazy_safetensors_equal_dicts(tmp_path):
    pre, fts = make_models(3, seed=14)
    lpre, lfts = save_models(tmp_path, pre, fts)
    a, b = cart(pre, fts), cart(lpre, lfts)
    assert list(b) == list(lpre) and set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_bf16_in_bf16_out_computed_in_fp32():
    pre, fts = make_models(3, seed=15, dtype=torch.bfloat16)
    up = lambda sd: {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    out, ref = cart(pre, fts), cart(up(pre), [up(ft) for ft in fts])
    for k in SHAPES:
        assert out[k].dtype == torch.bfloat16
        torch.testing.assert_close(out[k], ref[k].to(torch.bfloat16), rtol=2**-8, atol=0)


# ---------------------------------------------------------------------------------------------
# bad settings: refused by the function and by the validation pass, before any work
# ---------------------------------------------------------------------------------------------
def test_bad_settings_refused_by_the_function():
    pre, fts = make_models(2, seed=16)
    for bad in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match=r"cart: rank_ratio=.* must be a fraction in \[0, 1\]"):
            cart(pre, fts, rank_ratio=bad)
    with pytest.raises(ValueError, match="keys='some' must be 'official'"):
        cart(pre, fts, keys="some")
    with pytest.raises(TypeError, match="scaling_coef"):
        cart(pre, fts, scaling_coef="search")
    with pytest.raises(TypeError, match="scaling_coef must be one float"):
        cart(pre, fts, scaling_coef=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"'blocks.0.attn.in_proj_weight' has shape \(36, 11\) in finetuned\[1\]"):
        cart(pre, [fts[0], {**fts[1], "blocks.0.attn.in_proj_weight": torch.zeros(36, 11)}])
    with pytest.raises(ValueError, match="no finetuned checkpoints"):
        cart(pre, [])


@pytest.mark.parametrize(("override", "message"), [
    ("method.rank_ratio=1.5", r"method.rank_ratio=1.5: must be a finite number in \[0, 1\]"),
    ("method.rank_ratio=-0.2", r"method.rank_ratio=-0.2: must be a finite number in \[0, 1\]"),
    ("method.keys=every", r"method.keys='every': must be one of 'official', 'all_2d'"),
    ("method.scaling_coef=[1.0,2.0]", r"method.scaling_coef=\[1.0, 2.0\]: must be a finite number"),
    ("+method.rank=5", r"method.rank=5: method cart has no setting 'rank'"),
])
def test_bad_settings_refused_by_the_validation_pass(make_cfg, override, message):
    from fusion_bench.validation.check import check_options

    check_options(make_cfg("method=cart"))  # the YAML's own settings pass
    with pytest.raises(ConfigError, match=message):
        check_options(make_cfg("method=cart", override))


def test_table_entry_yaml_and_declared_affinity(tmp_path):
    """The table's row, the YAML's settings, and affine=False being needed (tests/test_search.py's checks, on
    method_cases' states): theta(c) is not theta_0 + c (theta(1) - theta_0)."""
    from method_cases import line_gap, merge, method_config, states

    from fusion_bench.merging.registry import methods

    spec = methods()["cart"]
    assert spec.kind == "data-free" and spec.affine is False and spec.target == "fusion_bench.merging.cart.cart"
    cfg = method_config("cart")
    assert {k: cfg[k] for k in ("scaling_coef", "rank_ratio", "keys")} == \
        {"scaling_coef": 2.0, "rank_ratio": 0.12, "keys": "official"}
    pre, fts = states()
    assert max(line_gap("cart", pre, fts, c) for c in (0.3, 1.7)) > 1e-4
    lpre, lfts = save_models(tmp_path, pre, fts)
    a, b = merge("cart", pre, fts), merge("cart", lpre, lfts)
    for k in pre:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_every_numeric_setting_refuses_bad_values_by_name(make_cfg):
    """As tests/test_validation_ranges.py walks every config: the YAML validates as a whole run; each numeric
    setting has a declared range, and the usual bad values are refused naming the setting, or lie inside it."""
    from fusion_bench.pipeline import validate_config

    cfg = make_cfg("method=cart")
    validate_config(cfg)
    assert_bad_values_refused_by_name(cfg, ('method.scaling_coef', 'method.rank_ratio'))


# ---------------------------------------------------------------------------------------------
# through the pipeline: `python run.py method=cart stage=merge` on stored (fake) fine-tunes
# ---------------------------------------------------------------------------------------------
def test_pipeline_run_merges_as_the_function(make_cfg, tmp_path, monkeypatch):
    from fusion_bench.families import build_family
    from fusion_bench.pipeline import run

    pool = ["taskpool.tasks=[shapes,colors,digits]"]
    fam = build_family(make_cfg(*pool))
    fts = store_fake_finetunes(fam, seed=5)
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("fine-tuned"))
    run(make_cfg(*pool, "method=cart", "stage=merge", "method.rank_ratio=0.2"), tmp_path / "run", "cart")
    merged = load_file(tmp_path / "run" / "merged.safetensors")
    expected = cart(fam.pretrained_state, fts, scaling_coef=2.0, rank_ratio=0.2)
    assert set(merged) == set(expected)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    block = "transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.allclose(merged[block], weight_average(fam.pretrained_state, fts)[block])
