"""TSV-M, Iso-C, Iso-CTS and WUDI against plain references written here (full SVDs, autograd + Adam)."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest
import torch
from helpers import save_models

import fusion_bench.merging as fm
from fusion_bench.merging import iso_c, iso_cts, task_arithmetic, tsv_merging, wudi_merging
from fusion_bench.merging.iso import iso_cts_sizes
from fusion_bench.merging.wudi import wudi_optimise

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
SHAPES = {
    "tall": (24, 16),
    "wide": (16, 24),
    "square": (20, 20),
    "cube": (4, 3, 2),
    "bias": (7,),
    "scale": (),
}
KEYS_2D = ["tall", "wide", "square"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# inputs and plain references (float64, full torch.linalg.svd, the definitions written literally)
# ---------------------------------------------------------------------------------------------
def make_models(n_tasks: int = 4, seed: int = 0, dtype=torch.float32, scale: float = 0.1):
    """Pretrained + finetuned dicts: correlated task vectors (a shared part) and int / bool buffers."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    shared = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    pre["num_batches_tracked"] = torch.tensor([3, 1, 4], dtype=torch.int64)
    pre["mask"] = torch.tensor([True, False, True])
    fts = []
    for t in range(n_tasks):
        ft = {
            k: (pre[k].float() + scale * (0.5 * shared[k] + torch.randn(s, generator=g))).to(dtype)
            for k, s in SHAPES.items()
        }
        ft["num_batches_tracked"] = pre["num_batches_tracked"] + t + 1  # must NOT be merged
        ft["mask"] = ~pre["mask"]
        fts.append(ft)
    return pre, fts


def task_vectors64(pre, fts, key):
    return [ft[key].double() - pre[key].double() for ft in fts]


def polar(X):
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def ref_tsv_key(taus):
    T, r = len(taus), min(taus[0].shape)
    k = r // T
    Us, ss, Vs = [], [], []
    for tau in taus:
        U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
        Us.append(U[:, :k])
        ss.append(S[:k])
        Vs.append(Vh[:k].T)
    U, s, V = torch.cat(Us, 1), torch.cat(ss), torch.cat(Vs, 1)
    return polar(U) @ torch.diag(s) @ polar(V).T


def ref_iso_c_key(taus):
    U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return S.mean() * U @ Vh


def ref_iso_cts_key(taus, fraction=0.8):
    """The reference code's loop, written plainly."""
    T, r = len(taus), min(taus[0].shape)
    c = int(r * fraction)
    c = r - round((r - c) / T) * T
    d = (r - c) // T
    U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    Uc, Sc, Vc = U[:, :c], S[:c], Vh[:c].T
    Us, ss, Vs = [], [], []
    for tau in taus:
        w = tau - Uc @ Uc.T @ tau
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        Us.append(u[:, :d])
        ss.append(s[:d])
        Vs.append(vh[:d].T)
    U, s, V = torch.cat(Us + [Uc], 1), torch.cat(ss + [Sc]), torch.cat(Vs + [Vc], 1)
    return s.mean() * polar(U) @ polar(V).T


def ref_merge(pre, fts, key_fn, alpha):
    """theta_0 + alpha * (key_fn(taus) for 2-D keys, mean of taus otherwise), float64."""
    out = {}
    for k, shape in SHAPES.items():
        taus = task_vectors64(pre, fts, k)
        upd = key_fn(taus) if len(shape) == 2 else sum(taus) / len(taus)
        out[k] = pre[k].double() + alpha * upd
    return out


def assert_merge_close(out, pre, ref, rtol=1e-5, atol=1e-6):
    for k in SHAPES:
        assert out[k].dtype == pre[k].dtype and out[k].shape == pre[k].shape, k
        torch.testing.assert_close(
            out[k].double(), ref[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
        )
    assert torch.equal(out["num_batches_tracked"], pre["num_batches_tracked"])
    assert torch.equal(out["mask"], pre["mask"])
    assert list(out) == list(pre)


# ---------------------------------------------------------------------------------------------
# TSV-M, Iso-C, Iso-CTS against full SVDs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_tasks", [3, 4])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_tsv_matches_full_svd_reference(n_tasks, alpha):
    pre, fts = make_models(n_tasks)
    out = tsv_merging(pre, fts, scaling_coef=alpha)
    assert_merge_close(out, pre, ref_merge(pre, fts, ref_tsv_key, alpha))


@pytest.mark.parametrize("n_tasks", [3, 4])
def test_iso_c_matches_full_svd_reference(n_tasks):
    pre, fts = make_models(n_tasks, seed=1)
    out = iso_c(pre, fts, scaling_coef=0.6)
    assert_merge_close(out, pre, ref_merge(pre, fts, ref_iso_c_key, 0.6))


@pytest.mark.parametrize("n_tasks", [3, 4])
@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_matches_full_svd_reference(n_tasks, fraction):
    pre, fts = make_models(n_tasks, seed=2)
    out = iso_cts(pre, fts, scaling_coef=0.9, common_space_fraction=fraction)
    ref = ref_merge(pre, fts, lambda taus: ref_iso_cts_key(taus, fraction), 0.9)
    assert_merge_close(out, pre, ref)


def test_iso_cts_sizes():
    assert iso_cts_sizes(768, 8, 0.8) == (616, 19)  # int(614.4) = 614, 154 / 8 = 19.25 -> 19
    assert iso_cts_sizes(16, 4, 0.8) == (12, 1)
    assert iso_cts_sizes(16, 3, 0.5) == (7, 3)  # 8 / 3 = 2.67 -> 3
    assert iso_cts_sizes(5, 8, 0.8) == (5, 0)  # T > r: no task-specific directions
    assert iso_cts_sizes(10, 4, 0.0) == (2, 2)  # budget capped at T * floor(r / T)
    for r in range(1, 40):
        for T in range(1, 12):
            for f in (0.0, 0.3, 0.8, 1.0):
                c, d = iso_cts_sizes(r, T, f)
                assert c + T * d == r and c >= 0 and d >= 0


def test_iso_cts_without_task_space_is_iso_c():
    pre, fts = make_models(4, seed=3)
    a = iso_cts(pre, fts, common_space_fraction=1.0)
    b = iso_c(pre, fts)
    for k in SHAPES:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_tsv_rank_deficient_and_too_many_tasks(caplog):
    """Numerically zero singular triplets are dropped (torch.linalg.svd's basis there is arbitrary)."""
    g = torch.Generator().manual_seed(4)
    pre = {"w": torch.randn(24, 16, generator=g), "narrow": torch.randn(2, 9, generator=g)}
    fts = []
    for _ in range(3):  # rank-2 task vectors, k = floor(16 / 3) = 5 triplets asked for
        tau = torch.randn(24, 2, generator=g) @ torch.randn(2, 16, generator=g) * 0.1
        fts.append({"w": pre["w"] + tau, "narrow": pre["narrow"] + 0.1 * torch.randn(2, 9, generator=g)})
    with caplog.at_level(logging.WARNING, logger="fusion_bench.merging"):
        out = tsv_merging(pre, fts)
    taus = [ft["w"].double() - pre["w"].double() for ft in fts]
    Us, ss, Vs = [], [], []
    for tau in taus:  # the reference restricted to the non-zero singular values
        U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
        Us.append(U[:, :2])
        ss.append(S[:2])
        Vs.append(Vh[:2].T)
    U, s, V = torch.cat(Us, 1), torch.cat(ss), torch.cat(Vs, 1)
    expected = pre["w"].double() + polar(U) @ torch.diag(s) @ polar(V).T
    torch.testing.assert_close(out["w"].double(), expected, rtol=1e-5, atol=1e-6)
    # r = 2 < T = 3: floor(r/T) = 0 triplets, the key keeps its pretrained value, with a warning
    assert torch.equal(out["narrow"], pre["narrow"])
    assert any("'narrow'" in r.getMessage() and "floor(r/T) = 0" in r.getMessage() for r in caplog.records)


def test_zero_task_vectors_give_pretrained():
    pre, _ = make_models(3)
    fts = [dict(pre) for _ in range(3)]
    for fn in (tsv_merging, iso_c, iso_cts, wudi_merging):
        out = fn(pre, fts, **({"keys": "all_2d"} if fn is wudi_merging else {}))
        assert all(torch.equal(out[k], pre[k]) for k in SHAPES), fn.__name__


# ---------------------------------------------------------------------------------------------
# WUDI against autograd + torch.optim.Adam on the literal loss
# ---------------------------------------------------------------------------------------------
def wudi_loss(m, taus):
    return sum(((m - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in taus)


def ref_wudi(taus, lr=1e-5, iterations=300):
    m = torch.nn.Parameter(sum(taus).detach().clone())
    opt = torch.optim.Adam([m], lr=lr)
    for _ in range(iterations):
        loss = wudi_loss(m, taus)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.detach()


def random_taus(shape, n_tasks, seed, dtype=torch.float64, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=g, dtype=torch.float64)
    return [(scale * (0.5 * shared + torch.randn(shape, generator=g, dtype=torch.float64))).to(dtype)
            for _ in range(n_tasks)]  # fmt: skip


# (24, 16) tall, (16, 24) wide with the cols x cols product, (3, 40) wide with 2 T rows < cols
# (the factored product); block_elems=50 runs the Adam loop in row blocks of 2-3 rows
@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (3, 40)])
@pytest.mark.parametrize("lr", [1e-5, 1e-2])
@pytest.mark.parametrize("block_elems", [None, 50])
def test_wudi_fast_adam_equals_autograd_adam_float64(shape, lr, block_elems):
    taus = random_taus(shape, 3, seed=5)
    m, st = wudi_optimise(taus, lr=lr, iterations=300, block_elems=block_elems)
    ref = ref_wudi(taus, lr=lr)
    m0 = sum(taus)
    moved = (ref - m0).abs().max().item()
    assert moved > (2e-4 if lr == 1e-5 else 0.1)  # the iterates move measurably
    torch.testing.assert_close(m, ref, rtol=1e-9, atol=1e-11 if lr == 1e-5 else 1e-9)
    assert st.loss_before == pytest.approx(wudi_loss(m0, taus).item(), rel=1e-10)
    assert st.loss_after == pytest.approx(wudi_loss(ref, taus).item(), rel=1e-8)
    assert st.loss_after < st.loss_before


@pytest.mark.parametrize("lr", [1e-5, 1e-3])
def test_wudi_merging_fp32_matches_float64_reference(lr):
    pre, fts = make_models(3, seed=6)
    out = wudi_merging(pre, fts, lr=lr, scaling_coef=0.8, keys="all_2d")
    ref = ref_merge(pre, fts, lambda taus: ref_wudi(taus, lr=lr), 0.8)
    assert_merge_close(out, pre, ref, rtol=1e-5, atol=2e-6)


def test_wudi_zero_iterations_is_sum_and_logs(caplog):
    pre, fts = make_models(3, seed=7)
    out = wudi_merging(pre, fts, iterations=0, keys="all_2d")
    ref = ref_merge(pre, fts, lambda taus: sum(taus), 1.0)
    assert_merge_close(out, pre, ref)
    with caplog.at_level(logging.INFO, logger="fusion_bench.merging"):
        wudi_merging(pre, fts, lr=1e-3, iterations=50, keys="all_2d")
    msg = [r.getMessage() for r in caplog.records if "wudi_merging: Adam" in r.getMessage()]
    assert len(msg) == 1 and "3 2-D keys" in msg[0]
    before, after = (float(x) for x in msg[0].split("loss ")[1].split(",")[0].split(" -> "))
    assert after < before


# ---------------------------------------------------------------------------------------------
# all four: differ from task arithmetic, lazy inputs, bf16, validation, configs, benchmark
# ---------------------------------------------------------------------------------------------
FNS = {
    "tsv_merging": (tsv_merging, {}),
    "iso_c": (iso_c, {}),
    "iso_cts": (iso_cts, {}),
    "wudi_merging": (wudi_merging, {"lr": 1e-2, "iterations": 50, "keys": "all_2d"}),  # generic key names
}


@pytest.mark.parametrize("name", list(FNS))
def test_differs_from_task_arithmetic(name):
    fn, kw = FNS[name]
    pre, fts = make_models(4, seed=8)
    out = fn(pre, fts, **kw)
    ta = task_arithmetic(pre, fts, scaling_coef=1.0)
    for k in KEYS_2D:  # not task arithmetic at any coefficient: not parallel to sum_t tau_t
        a = (out[k] - pre[k]).flatten().double()
        b = (ta[k] - pre[k]).flatten().double()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) < 0.99, k
    for k in ("cube", "bias", "scale"):  # the other float keys: mean of the task vectors
        torch.testing.assert_close(out[k] - pre[k], (ta[k] - pre[k]) / 4, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(FNS))
def test_lazy_safetensors_equals_dicts(tmp_path, name):
    fn, kw = FNS[name]
    pre, fts = make_models(3, seed=9)
    lpre, lfts = save_models(tmp_path, pre, fts)
    a = fn(pre, fts, **kw)
    b = fn(lpre, lfts, **kw)
    assert list(b) == list(lpre) and set(a) == set(b)
    for k in a:  # per-key computations: the key order does not matter (BLAS may differ in the last bit)
        assert a[k].dtype == b[k].dtype
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert torch.equal(b["num_batches_tracked"], pre["num_batches_tracked"])
    assert torch.equal(b["mask"], pre["mask"])


@pytest.mark.parametrize("name", list(FNS))
def test_bf16_pretrained_gives_bf16_computed_in_fp32(name):
    fn, kw = FNS[name]
    pre, fts = make_models(3, seed=10, dtype=torch.bfloat16)
    out = fn(pre, fts, **kw)
    pre32 = {k: (v.float() if v.is_floating_point() else v) for k, v in pre.items()}
    fts32 = [{k: (v.float() if v.is_floating_point() else v) for k, v in ft.items()} for ft in fts]
    expected = fn(pre32, fts32, **kw)  # the same bf16 values computed in fp32, rounded once
    for k in SHAPES:
        assert out[k].dtype == torch.bfloat16, k
        torch.testing.assert_close(out[k], expected[k].to(torch.bfloat16), rtol=2**-8, atol=0)


@pytest.mark.parametrize("name", list(FNS))
def test_bad_inputs_raise_clear_errors(tmp_path, name):
    fn, _ = FNS[name]
    pre, fts = make_models(2, seed=11)
    bad = dict(fts[1])
    bad["tall"] = torch.zeros(24, 15)
    with pytest.raises(ValueError, match=rf"{name}: key 'tall' has shape \(24, 15\) in finetuned\[1\]"):
        fn(pre, [fts[0], bad])
    missing = {k: v for k, v in fts[1].items() if k != "wide"}
    with pytest.raises(ValueError, match=r"'wide'.*missing from finetuned\[1\]"):
        fn(pre, [fts[0], missing])
    extra = dict(fts[0], extra_key=torch.zeros(2))
    with pytest.raises(ValueError, match=r"'extra_key'.*finetuned\[0\]"):
        fn(pre, [extra, fts[1]])
    lpre, lfts = save_models(tmp_path, pre, [fts[0], bad])
    with pytest.raises(ValueError, match=r"'tall'.*task1\.safetensors"):
        fn(lpre, lfts)
    with pytest.raises(ValueError, match="no finetuned checkpoints"):
        fn(pre, [])
    with pytest.raises(TypeError, match="scaling_coef"):
        fn(pre, fts, scaling_coef="search")


def test_bad_hyperparameters():
    pre, fts = make_models(2, seed=12)
    with pytest.raises(ValueError, match="common_space_fraction"):
        iso_cts(pre, fts, common_space_fraction=1.5)
    with pytest.raises(ValueError, match="lr"):
        wudi_merging(pre, fts, lr=-1.0)
    with pytest.raises(ValueError, match="iterations"):
        wudi_merging(pre, fts, iterations=2.5)
    with pytest.raises(ValueError, match="betas"):
        wudi_merging(pre, fts, betas=(0.9, 1.0))


@pytest.mark.parametrize(
    ("name", "fn_name", "coef"),
    [("tsv_merging", "tsv_merging", 1.0), ("iso_c", "iso_c", "search"), ("iso_cts", "iso_cts", "search"),
     ("wudi", "wudi_merging", 1.0)],
)  # fmt: skip
def test_method_configs_instantiate(name, fn_name, coef):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg._target_ == f"fusion_bench.merging.{fn_name}" and cfg.scaling_coef == coef
    fn = instantiate(cfg)
    assert "scaling_coef" in inspect.signature(fn).parameters
    pre, fts = make_models(3, seed=13)
    kw = {"iterations": 5, "keys": "all_2d"} if name == "wudi" else {}  # generic key names
    out = fn(pre, fts, scaling_coef=0.25, **kw)  # the pipeline overrides the YAML's value
    assert list(out) == list(pre)
    if name == "wudi":
        assert cfg.lr == 1e-5 and cfg.iterations == 300 and cfg["keys"] == "official"
    if name == "iso_cts":
        assert cfg.common_space_fraction == 0.8


def test_benchmark_registers_methods():
    from fusion_bench.benchmarks.merge import METHODS

    for name in ("tsv_merging", "iso_c", "iso_cts", "wudi"):
        fn_name, kwargs = METHODS[name]
        params = inspect.signature(getattr(fm, fn_name)).parameters
        assert set(kwargs) <= set(params), name


def test_eigh_pool_leaves_caller_threads_alone():
    from fusion_bench.merging.spectral import eigh_many

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(14)
    X = torch.randn(30, 12, generator=g, dtype=torch.float64)
    G = X.T @ X
    ((L, Q),) = eigh_many([G])
    L0 = torch.linalg.eigvalsh(G)
    torch.testing.assert_close(L, L0.flip(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((Q * L) @ Q.T, G, rtol=1e-12, atol=1e-12)
    assert torch.get_num_threads() == 2  # the pool's single-threaded BLAS is local to its threads
