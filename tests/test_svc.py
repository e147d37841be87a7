"""SVC, singular value calibration (fusion_bench/merging/svc.py), against the definition written plainly here (float64,
full torch.linalg.svd, explicit loops over directions and tasks); its composition with any merge through `method.svc`
(post=svc), its refusals, its settings' validation and its non-affinity in the merge's coefficient; end to end through
the pipeline after task arithmetic and TSV-M."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fusion_bench.errors import ConfigError
from fusion_bench.merging.svc import svc_alpha, svc_calibrate, svc_key
from fusion_bench.merging.task_arithmetic import task_arithmetic
from fusion_bench.merging.task_specific import TaskSpecificMerge
from fusion_bench.merging.tsv import tsv_merging
from fusion_bench.pipeline import run, validate_config
from fusion_bench.stages.merge import Method
from fusion_bench.validation.check import check_options

CONF = str(Path(__file__).resolve().parent.parent / "conf")

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# the definition, plainly
# ---------------------------------------------------------------------------------------------
def plain_svc(M, taus, alpha):
    """M = U diag(sigma) V^T; per direction r and task t: s = <u_r^T M, u_r^T tau_t> / max(||u_r^T tau_t||^2, 1e-12);
    gamma_r = T / sum_t max(alpha, s); U diag(gamma sigma) V^T."""
    M = M.double()
    taus = [t.double() for t in taus]
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    gamma = []
    for r in range(S.numel()):
        merged_response = U[:, r] @ M
        total = 0.0
        for tau in taus:
            task_response = U[:, r] @ tau
            s = float(merged_response @ task_response) / max(float(task_response @ task_response), 1e-12)
            total += max(alpha, s)
        gamma.append(len(taus) / total)
    return U @ torch.diag(torch.tensor(gamma, dtype=torch.float64) * S) @ Vh


def rel(ours, ref):
    return float((ours.double() - ref).norm() / ref.norm())


def overlapping(shape, T, shared=3.0, shared_rank=4, task_rank=2, noise=0.1, seed=0):
    """fp32 task vectors like real fine-tunes: a shared low-rank part + each task's own + noise, 1e-3 scale."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape

    def low_rank(k):
        return torch.randn(rows, k, generator=g) @ torch.randn(k, cols, generator=g) / k

    base = low_rank(shared_rank)
    return [((shared * base + low_rank(task_rank) + noise * torch.randn(rows, cols, generator=g)) * 1e-3).float()
            for _ in range(T)]


SHAPES = {"tall": (40, 24), "wide": (24, 40), "square": (32, 32)}


# ---------------------------------------------------------------------------------------------
# one key against the plain definition
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("T", [2, 5])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_key_equals_plain_definition_on_random_task_vectors(shape, T, alpha):
    g = torch.Generator().manual_seed(T)
    taus = [torch.randn(*shape, generator=g) * 1e-3 for _ in range(T)]
    M = 0.3 * sum(t.double() for t in taus)
    assert rel(svc_key(M, taus, alpha), plain_svc(M, taus, alpha)) <= 1e-10


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("merge", ["sum", "mean", "tsv"])
def test_key_equals_plain_definition_on_overlapping_task_vectors(shape, merge):
    """Shared directions: the top singular values of the sum are over-counted (s > 1), the merge differs from the sum."""
    from fusion_bench.merging.tsv import tsv_key

    taus = overlapping(shape, T=6)
    M = {"sum": lambda: sum(t.double() for t in taus), "mean": lambda: sum(t.double() for t in taus) / 6,
         "tsv": lambda: tsv_key(taus).double()}[merge]()
    ref = plain_svc(M, taus, 1 / 6)
    assert rel(svc_key(M, taus, 1 / 6), ref) <= 1e-10
    if merge == "sum":  # the shared directions of the sum shrink: sigma_1 drops
        assert torch.linalg.svdvals(ref)[0] < 0.9 * torch.linalg.svdvals(M)[0]


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_rank_deficient_and_zero_updates(shape):
    """LoRA-like rank-2 task vectors: the merged update has an exact null space, whose (arbitrary) basis contributes
    gamma * 0; a zero update stays zero."""
    g = torch.Generator().manual_seed(1)
    rows, cols = shape
    taus = [(torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g) * 1e-3) for _ in range(3)]
    M = sum(t.double() for t in taus)
    assert rel(svc_key(M, taus, 0.2), plain_svc(M, taus, 0.2)) <= 1e-9
    zero = svc_key(torch.zeros(rows, cols, dtype=torch.float64), taus, 0.2)
    assert zero.shape == (rows, cols) and float(zero.abs().max()) == 0.0


@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "cols"])
@pytest.mark.parametrize("pad", [0, 1], ids=["square", "rectangular"])
def test_hand_computed_case(transpose, pad):
    """tau_1 = e1 e1^T, tau_2 = e1 e1^T + e2 e2^T, M = tau_1 + tau_2 = diag(2, 1), alpha = 0.5:
    direction 1: both tasks respond (1, 0), merged (2, 0): s = 2, 2 -> gamma = 2 / 4, sigma 2 -> 1;
    direction 2: task 1 has no response (s = 0 -> alpha), task 2 s = 1 -> gamma = 2 / 1.5, sigma 1 -> 4/3."""
    def mat(entries):
        m = torch.zeros(2 + pad, 2, dtype=torch.float64)
        for (i, j), v in entries.items():
            m[i, j] = v
        return m.T if transpose else m

    tau1, tau2 = mat({(0, 0): 1.0}), mat({(0, 0): 1.0, (1, 1): 1.0})
    want = mat({(0, 0): 1.0, (1, 1): 4.0 / 3.0})
    torch.testing.assert_close(svc_key(tau1 + tau2, [tau1, tau2], 0.5), want, rtol=0, atol=1e-12)
    # through svc_calibrate, with theta_0 offsets, a bias and a buffer that must not move
    pre = {"w": torch.full_like(want, 5.0).float(), "b": torch.ones(3), "n": torch.tensor(4)}
    fts = [{"w": pre["w"] + t.float(), "b": pre["b"] + i, "n": torch.tensor(9)} for i, t in enumerate([tau1, tau2])]
    merged = {"w": pre["w"] + (tau1 + tau2).float(), "b": pre["b"] + 0.5, "n": pre["n"]}
    out = svc_calibrate(pre, fts, merged, alpha=0.5)
    torch.testing.assert_close(out["w"], pre["w"] + want.float(), rtol=0, atol=1e-6)
    assert torch.equal(out["b"], merged["b"]) and torch.equal(out["n"], pre["n"]) and list(out) == list(merged)


def test_alpha_one_over_T_and_scale_of_the_merge():
    """alpha="1/T" is 1/T; s scales with the merge's coefficient c, and where every c s >= alpha SVC undoes c."""
    assert svc_alpha("1/T", 8) == 0.125 and svc_alpha(1, 3) == 1.0
    taus = overlapping((24, 24), T=4, shared=10.0, noise=0.0, task_rank=1)
    M = sum(t.double() for t in taus)
    for c in (0.5, 2.0):  # gamma(c) = T / sum_t max(alpha, c s(1)), written out
        U, S, Vh = torch.linalg.svd(M)
        s1 = torch.stack([(U.T @ M * (U.T @ t.double())).sum(1) / (U.T @ t.double()).pow(2).sum(1).clamp_min(1e-12)
                          for t in taus])
        want = c * U @ torch.diag(4 / (c * s1).clamp_min(0.05).sum(0) * S) @ Vh
        assert rel(svc_key(c * M, taus, 0.05), want) <= 1e-9
    assert rel(svc_key(0.5 * M, taus, 0.05), svc_key(M, taus, 0.05)) > 1e-3  # not affine, not invariant either


# ---------------------------------------------------------------------------------------------
# whole merges
# ---------------------------------------------------------------------------------------------
def states(T=3, seed=0):
    """theta_0 and T fine-tunes: tall, wide and square 2-D keys, an embedding-named 2-D key, 1-D, 4-D, a buffer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.attn.in_proj_weight": (24, 8), "blocks.0.mlp.c_proj.weight": (8, 20), "proj": (12, 12),
              "positional_embedding": (5, 12), "blocks.0.ln.weight": (12,), "conv1.weight": (4, 3, 2, 2)}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    pre["steps"] = torch.tensor(3)
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{**{k: pre[k] + 0.1 * (shared[k] + torch.randn(s, generator=g)) for k, s in shapes.items()},
            "steps": torch.tensor(7)} for _ in range(T)]
    return pre, fts


@pytest.mark.parametrize("keys", ["official", "all_2d"])
def test_calibrate_whole_merge_key_by_key(keys):
    pre, fts = states()
    merged = task_arithmetic(pre, fts, scaling_coef=0.4)
    out = svc_calibrate(pre, fts, merged, alpha=0.2, keys=keys)
    calibrated = {"blocks.0.attn.in_proj_weight", "blocks.0.mlp.c_proj.weight", "proj"}
    if keys == "all_2d":
        calibrated.add("positional_embedding")
    for k, v in merged.items():
        if k in calibrated:
            taus = [ft[k].double() - pre[k].double() for ft in fts]
            want = pre[k].double() + plain_svc(v.double() - pre[k].double(), taus, 0.2)
            torch.testing.assert_close(out[k].double(), want, rtol=1e-6, atol=1e-6)
            assert not torch.equal(out[k], v)
        else:
            assert torch.equal(out[k], v), k
        assert out[k].dtype == v.dtype


def test_calibrate_reads_lazy_files_and_keeps_bf16(tmp_path):
    from helpers import save_models

    pre, fts = states()
    pre = {k: v.bfloat16() if v.is_floating_point() else v for k, v in pre.items()}
    fts = [{k: v.bfloat16() if v.is_floating_point() else v for k, v in ft.items()} for ft in fts]
    merged = task_arithmetic(pre, fts, scaling_coef=0.3)
    lazy_pre, lazy_fts = save_models(tmp_path, pre, fts)
    a, b = svc_calibrate(pre, fts, merged), svc_calibrate(lazy_pre, lazy_fts, merged)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == merged[k].dtype for k in merged)


def test_bad_inputs_and_settings_refused():
    pre, fts = states()
    merged = task_arithmetic(pre, fts, scaling_coef=0.3)
    for bad in (0, -1, float("nan"), float("inf"), "abc", True, None):
        with pytest.raises(ValueError, match="alpha"):
            svc_calibrate(pre, fts, merged, alpha=bad)
    with pytest.raises(ValueError, match="keys="):
        svc_calibrate(pre, fts, merged, keys="every")
    with pytest.raises(TypeError, match="task-specific"):
        svc_calibrate(pre, fts, TaskSpecificMerge.__new__(TaskSpecificMerge))
    with pytest.raises(ValueError, match="conv1.weight"):
        svc_calibrate(pre, fts, {k: v for k, v in merged.items() if k != "conv1.weight"})
    only_1d = {"b": torch.zeros(3)}
    with pytest.raises(ValueError, match="selects none"):
        svc_calibrate(only_1d, [{"b": torch.ones(3)}], {"b": torch.ones(3)})


# ---------------------------------------------------------------------------------------------
# the option: method.svc / post=svc, validation, refusals, the coefficient search
# ---------------------------------------------------------------------------------------------
def _cfg(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["paths.root=/tmp/val_work/svc", *overrides])


def test_post_svc_composes_validates_and_records_the_defaults():
    cfg = _cfg("method=tsv_merging", "post=svc", "method.svc.alpha=1.0")
    assert OmegaConf.to_container(cfg.method.svc) == {"alpha": 1.0, "keys": "official"}
    validate_config(cfg)
    assert "svc" not in _cfg().method  # off by default
    for method in ("task_arithmetic", "ties", "tsv_merging", "iso_c", "iso_cts", "wudi", "dare", "ace_merging"):
        validate_config(_cfg(f"method={method}", "post=svc"))
    validate_config(_cfg("method=ties", "+method.svc={}"))  # the block alone, defaults


@pytest.mark.parametrize(("option", "value"), [("method.svc.alpha", 0), ("method.svc.alpha", -1.0),
                                               ("method.svc.alpha", float("nan")), ("method.svc.alpha", "abc"),
                                               ("method.svc.keys", "every"), ("method.svc.extra", 1),
                                               ("method.svc", 5)])
def test_bad_svc_settings_refused_by_name(option, value):
    cfg = _cfg("post=svc")
    OmegaConf.update(cfg, option, value, merge=False, force_add=True)
    with pytest.raises(ConfigError, match=rf"^{option}"):
        check_options(cfg)


@pytest.mark.parametrize(("overrides", "why"), [
    (["method=tall_masks"], "task-specific"),
    (["method=emr"], "task-specific"),
    (["coefficients=adamerging"], "coefficients=adamerging"),
    (["method=adamerging"], "coefficients=adamerging"),
    (["finetune=l_lora", "method=task_arithmetic"], "LoRA adapters"),
    (["finetune=lora", "finetune.task_vector=adapters"], "LoRA adapters"),
])
def test_svc_refused_where_undefined(overrides, why):
    cfg = _cfg(*overrides, "post=svc")
    check_options(cfg)  # the settings are fine: the relation to the method is the run's check
    with pytest.raises(ConfigError, match=f"^method.svc: .*{why}"):
        validate_config(cfg)
    if why == "task-specific":  # the merge stage refuses too (a Method built without the validation pass)
        with pytest.raises(ConfigError, match="task-specific"):
            Method(cfg.method, "standard")


def test_method_with_svc_calibrates_every_merge_and_is_not_affine():
    pre, fts = states()
    plain = Method(_cfg("method=tsv_merging").method, "standard")
    svc = Method(_cfg("method=tsv_merging", "post=svc", "method.svc.alpha=0.5").method, "standard")
    assert plain.affine and not svc.affine  # the search merges (and calibrates) at every grid point
    for c in (0.3, 1.0):
        want = svc_calibrate(pre, fts, tsv_merging(pre, fts, scaling_coef=c), alpha=0.5)
        got = svc(pre, fts, c)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_search_merges_at_every_grid_point(monkeypatch):
    """grid_accuracies takes the per-coefficient path for a non-affine Method (stages/evaluate.py)."""
    from fusion_bench.stages import evaluate

    pre, fts = states()
    method = Method(_cfg("method=task_arithmetic", "post=svc").method, "standard")
    seen = []

    class Fam:
        fast_search, pretrained_state, tasks = True, pre, ["a", "b"]

    monkeypatch.setattr(evaluate, "merged_accuracies",
                        lambda fam, merged, split, tasks, lin: seen.append(merged) or {t: 0.5 for t in tasks})
    evaluate.grid_accuracies(Fam(), method, fts, [0.2, 0.6], "val")
    assert len(seen) == 2
    for c, merged in zip([0.2, 0.6], seen):
        want = svc_calibrate(pre, fts, task_arithmetic(pre, fts, scaling_coef=c))
        assert all(torch.equal(merged[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------
# end to end through the pipeline (two tiny tasks, a few steps)
# ---------------------------------------------------------------------------------------------
FAST = ["taskpool.tasks=[colors,position]", "model.train.steps=4", "model.train.warmup_steps=1",
        "model.train.batch_size=16", "model.train.checkpoint_every=10"]


def test_end_to_end_after_task_arithmetic_and_tsv(make_cfg, tmp_path):
    from fusion_bench.families import build_family
    from fusion_bench.stages.finetune import finetuned_state

    report = run(make_cfg(*FAST, "method=task_arithmetic", "method.scaling_coef=0.3", "post=svc"),
                 tmp_path / "ta", "task_arithmetic")  # the search's per-coefficient path: test_search_merges_at_...
    assert report["method_config"]["svc"] == {"alpha": "1/T", "keys": "official"} and report["scaling_coef"] == 0.3
    assert all(0.0 <= r["merged"] <= 1.0 for r in report["tasks"].values())
    ta = load_file(tmp_path / "ta" / "merged.safetensors")

    cfg = make_cfg(*FAST, "method=tsv_merging", "post=svc", "method.svc.alpha=1.0", "stage=merge")
    run(cfg, tmp_path / "tsv", "tsv_merging")
    written = load_file(tmp_path / "tsv" / "merged.safetensors")
    fam = build_family(cfg)
    pre, fts = fam.pretrained_state, [finetuned_state(fam, t) for t in fam.tasks]
    want_ta = svc_calibrate(pre, fts, task_arithmetic(pre, fts, scaling_coef=0.3))
    assert all(torch.equal(ta[k], want_ta[k].contiguous()) for k in want_ta)
    plain = tsv_merging(pre, fts, scaling_coef=1.0)
    want = svc_calibrate(pre, fts, plain, alpha=1.0)
    assert set(written) == set(want)
    assert all(torch.equal(written[k], want[k].contiguous()) for k in want)
    moved = [k for k in want if want[k].is_floating_point() and not torch.equal(want[k], plain[k])]
    assert moved and all(want[k].dim() == 2 and "embedding" not in k for k in moved)
