"""PCB-merging (fusion_bench/merging/pcb.py) against a plain float64 reference written here: the official code's
steps on the whole flattened task vectors (full sorts for the quantiles, min-max normalisations, the three
inter-balancing forms written as explicit loops), on independent and on overlapping task vectors, tall, wide and
non-2-D keys; the streamed exact order statistics against sorting; a hand-computed case; bad settings refused;
one run through the pipeline."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers import assert_bad_values_refused_by_name, save_models, store_fake_finetunes
from safetensors.torch import load_file

import fusion_bench.merging.task_vectors as tv
from fusion_bench.errors import ConfigError
from fusion_bench.merging.pcb import INTERS, PCBState, RankSelect, key_value, order_keys, pcb_merging

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"tall": (40, 12), "wide": (10, 36), "square": (16, 16), "cube": (4, 3, 2), "bias": (9,), "scale": ()}


# ---------------------------------------------------------------------------------------------
# inputs and the plain reference (float64, whole flattened task vectors, full sorts)
# ---------------------------------------------------------------------------------------------
def make_models(n_tasks=4, seed=0, dtype=torch.float32, shapes=SHAPES, shared=0.5, scale=0.01):
    """theta_0 and fine-tunes whose task vectors share a part (tau_t = scale * (shared * c + z_t)); an int and a
    bool buffer that must not be merged."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    common = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = []
    for t in range(n_tasks):
        ft = {k: (pre[k] + scale * (shared * common[k] + torch.randn(s, generator=g))).to(dtype)
              for k, s in shapes.items()}
        ft["steps"] = torch.tensor(5 + t)
        ft["mask"] = torch.tensor([t % 2 == 0, True])
        fts.append(ft)
    pre = {k: v.to(dtype) for k, v in pre.items()}
    pre["steps"] = torch.tensor(3)
    pre["mask"] = torch.tensor([False, False])
    return pre, fts


def float_keys(pre):
    return [k for k, v in pre.items() if v.is_floating_point()]


def flat_task_vectors(pre, fts):
    """(n, d) float64: the fp32 task vectors (as the merge computes them) of every float key, flattened."""
    return torch.stack([torch.cat([(ft[k].float() - pre[k].float()).double().reshape(-1) for k in float_keys(pre)])
                        for ft in fts])


def minmax(x):
    """Per row (x - min) / (max - min); 0 for a constant row (the implementation's convention for 0 / 0)."""
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), torch.zeros_like(x))


def plain_pcb_flat(T, pcb_ratio, clamp_ratio, inter, lams):
    n, d = T.shape
    A = T.abs()
    srt = A.sort(1).values
    lo = srt[:, int(d * clamp_ratio)].unsqueeze(1)
    hi = srt[:, int(d * (1 - clamp_ratio) - 1)].unsqueeze(1)
    a = torch.clamp(A, lo, hi)
    u = minmax(a)
    intra = torch.exp(n * u**2)
    s = torch.sign(T) * u
    if inter == "sum":
        cross = torch.tanh(T * T.sum(0))
    elif inter == "normalized_sum":
        cross = torch.tanh(T * s.sum(0))
    else:
        cross = torch.zeros_like(T)
        for i in range(n):
            for j in range(n):
                cross[i] += torch.tanh(s[i] * s[j])
    beta = intra * cross
    q = beta.sort(1).values[:, int(d * (1 - pcb_ratio))].unsqueeze(1)
    w = minmax(torch.clamp(beta, min=q))
    lam = torch.tensor(lams, dtype=torch.float64).unsqueeze(1)
    return (torch.sign(T) * a * lam * w).sum(0) / torch.clamp(w.sum(0), min=1e-12)


def plain_pcb(pre, fts, pcb_ratio=0.1, clamp_ratio=0.01, inter="sum", lams=1.2):
    lams = [lams] * len(fts) if isinstance(lams, float) else lams
    merged = plain_pcb_flat(flat_task_vectors(pre, fts), pcb_ratio, clamp_ratio, inter, lams)
    out, off = {}, 0
    for k in float_keys(pre):
        m = pre[k].numel()
        out[k] = pre[k].double() + merged[off : off + m].reshape(pre[k].shape)
        off += m
    return out


def assert_merge(out, pre, ref, rtol=2e-5):
    """The merged update (theta - theta_0) over all float keys equals the reference's to rtol of its size."""
    assert list(out) == list(pre)
    got = torch.cat([(out[k].double() - pre[k].double()).reshape(-1) for k in float_keys(pre)])
    want = torch.cat([(ref[k] - pre[k].double()).reshape(-1) for k in float_keys(pre)])
    for k in float_keys(pre):
        assert out[k].dtype == pre[k].dtype and out[k].shape == pre[k].shape, k
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= rtol, err
    assert torch.equal(out["steps"], pre["steps"]) and torch.equal(out["mask"], pre["mask"])


# ---------------------------------------------------------------------------------------------
# exact order statistics of streamed values
# ---------------------------------------------------------------------------------------------
def test_order_keys_order_like_the_floats():
    x = torch.tensor([-math.inf, -3.5, -1e-30, -0.0, 0.0, 1e-38, 2.0, 3e38, math.inf])
    keys = order_keys(x).to(torch.int64) & 0xFFFFFFFF  # the uint32 keys
    assert bool((keys[1:] > keys[:-1]).all())
    for v, k in zip(x.tolist(), keys.tolist()):
        assert key_value(k) == v or (v == 0.0 and key_value(k) == 0.0)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_rank_select_equals_sorting(chunk):
    g = torch.Generator().manual_seed(0)
    rows = [
        torch.randn(500, generator=g) * torch.logspace(-20, 20, 500),  # signed, many magnitudes
        torch.randint(-3, 4, (500,), generator=g).float(),  # heavy ties, zeros
        -torch.rand(500, generator=g),  # all negative
        torch.full((500,), 0.25),  # one value
    ]
    rows[1][::7] = -0.0
    X = torch.stack(rows)
    ranks = [1, 2, 17, 250, 499, 500]
    sel = RankSelect([ranks] * len(rows))
    for s in range(0, 500, chunk):
        sel.add_high(X[:, s : s + chunk])
    sel.split()
    for s in range(0, 500, chunk):
        sel.add_low(X[:, s : s + chunk])
    desc = X.sort(1, descending=True).values
    for i, got in enumerate(sel.values()):
        assert got == [desc[i, m - 1].item() for m in ranks], i
    with pytest.raises(ValueError, match="rank 501 of 500"):
        bad = RankSelect([[501]])
        bad.add_high(X[:1])
        bad.split()


# ---------------------------------------------------------------------------------------------
# whole merges against the plain reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inter", INTERS)
@pytest.mark.parametrize(("pcb_ratio", "clamp_ratio"), [(0.1, 0.01), (0.05, 0.0), (0.5, 0.2), (1.0, 0.01)])
def test_pcb_matches_plain_reference(inter, pcb_ratio, clamp_ratio):
    pre, fts = make_models(4, seed=1)
    out = pcb_merging(pre, fts, scaling_coef=1.2, pcb_ratio=pcb_ratio, clamp_ratio=clamp_ratio, inter=inter)
    assert_merge(out, pre, plain_pcb(pre, fts, pcb_ratio, clamp_ratio, inter, 1.2))


OVERLAP = {"attn": (192, 64), "mlp": (64, 192), "bias": (64,), "embed": (17, 64)}


def overlapping_models(T=8, seed=0, shared=3.0):
    """Task vectors sharing directions like real fine-tunes: a shared low-rank part (amplitude per task), a task
    low-rank part and noise, 1e-3 scale, on tall, wide, 1-D keys (as tests/test_spectral_overlap.py builds them)."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) * 0.05 for k, s in OVERLAP.items()}

    def part(shape, k):
        if len(shape) == 1:
            return torch.randn(shape, generator=g)
        return torch.randn(shape[0], k, generator=g) @ torch.randn(k, shape[1], generator=g) / k

    base = {k: part(s, 8) for k, s in OVERLAP.items()}
    fts = []
    for _ in range(T):
        amp = 0.5 + torch.rand(1, generator=g)
        fts.append({k: pre[k] + 1e-3 * (shared * amp * base[k] + part(s, 4) + 0.1 * torch.randn(s, generator=g))
                    for k, s in OVERLAP.items()})
    return pre, fts


@pytest.mark.parametrize("inter", INTERS)
@pytest.mark.parametrize("shared", [0.0, 3.0, 10.0])
def test_pcb_overlapping_task_vectors_match_plain_reference(inter, shared):
    pre, fts = overlapping_models(shared=shared)
    for pcb_ratio in (0.05, 0.2):
        out = pcb_merging(pre, fts, scaling_coef=1.0, pcb_ratio=pcb_ratio, inter=inter)
        ref = plain_pcb(pre, fts, pcb_ratio, 0.01, inter, 1.0)
        got = torch.cat([(out[k].double() - pre[k].double()).reshape(-1) for k in OVERLAP])
        want = torch.cat([(ref[k] - pre[k].double()).reshape(-1) for k in OVERLAP])
        assert float((got - want).abs().max() / want.abs().max()) <= 2e-5
        assert float((got - want).norm() / want.norm()) <= 1e-6


def test_many_tasks():
    """20 tasks: exp(N u^2) reaches e^20 (the implementation's exp(N (u^2 - 1)) stays <= 1); still the reference."""
    pre, fts = make_models(20, seed=11, shapes={"w": (30, 20), "b": (20,)})
    for inter in INTERS:
        out = pcb_merging(pre, fts, scaling_coef=1.0, pcb_ratio=0.2, inter=inter)
        assert_merge(out, pre, plain_pcb(pre, fts, 0.2, 0.01, inter, 1.0))


def test_overlap_is_real():
    """The shared cases do overlap: mean pairwise cosine of the task vectors well above the independent case."""
    def mean_cos(fts, pre):
        V = torch.stack([torch.cat([(ft[k] - pre[k]).reshape(-1) for k in OVERLAP]) for ft in fts]).double()
        V = V / V.norm(dim=1, keepdim=True)
        n = len(fts)
        return float(((V @ V.T).sum() - n) / (n * (n - 1)))

    assert mean_cos(*overlapping_models(shared=10.0)[::-1]) > 0.9
    assert abs(mean_cos(*overlapping_models(shared=0.0)[::-1])) < 0.05


def test_per_task_lambdas_match_the_reference_and_lie_on_one_line():
    pre, fts = make_models(3, seed=2)
    lams = [0.5, 1.0, 1.5]
    out = pcb_merging(pre, fts, scaling_coef=lams, inter="pairwise")
    assert_merge(out, pre, plain_pcb(pre, fts, 0.1, 0.01, "pairwise", lams))
    scaled = pcb_merging(pre, fts, scaling_coef=[2 * c for c in lams], inter="pairwise")
    for k in float_keys(pre):
        torch.testing.assert_close(scaled[k] - pre[k], 2 * (out[k] - pre[k]), rtol=1e-5, atol=1e-7)


def test_small_chunks_give_the_same_merge(monkeypatch):
    """Keys split into many chunks (every pass streams chunk by chunk): the same thresholds and merge."""
    pre, fts = make_models(3, seed=3)
    whole = pcb_merging(pre, fts, inter="normalized_sum", pcb_ratio=0.2)
    monkeypatch.setattr(tv, "CHUNK", 7)
    chunked = pcb_merging(pre, fts, inter="normalized_sum", pcb_ratio=0.2)
    for k in pre:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-6, atol=1e-8)


def test_hand_computed_case():
    """Two tasks, one key of four entries, clamp_ratio 0 (lo = min |tau|, hi = max |tau|), inter 'sum':
    tau_1 = [.1, -.2, .3, .4], tau_2 = [.2, .2, -.1, .4]; u_1 = [0, 1/3, 2/3, 1], u_2 = [1/3, 1/3, 0, 1];
    sum_j tau_j = [.3, 0, .2, .8];
    beta_1 = e^(2 u_1^2) tanh(tau_1 S) = [tanh .03, 0, e^(8/9) tanh .06, e^2 tanh .32]  (ascending 0 < .030 < .146 < 2.29)
    beta_2 = [e^(2/9) tanh .06, 0, tanh(-.02), e^2 tanh .32]                            (-.020 < 0 < .075 < 2.29).
    pcb_ratio 0.75: q = sort(beta)[int(4 * 0.25)] = the 2nd smallest: q_1 = tanh .03, q_2 = 0, so
    w_1 = [0, 0, (beta_13 - q_1) / (beta_14 - q_1), 1], w_2 = [beta_21 / beta_24, 0, 0, 1] (the threshold entry
    and everything below get 0); tau_m = sum w tau / sum w = [.2, 0 (no weight), .3, (.4 + .4) / 2].
    pcb_ratio 0.5 keeps each task's maximum only; pcb_ratio 1 drops only the minimum (weights written below)."""
    pre = {"w": torch.zeros(4)}  # theta_0 = 0: the task vectors are the fp32 numbers themselves
    fts = [{"w": torch.tensor([0.1, -0.2, 0.3, 0.4])}, {"w": torch.tensor([0.2, 0.2, -0.1, 0.4])}]
    X = torch.stack([ft["w"] for ft in fts])
    state = PCBState(X.abs().amin(1).tolist(), X.abs().amax(1).tolist(), "sum")
    _, u = state.clamped(X)
    torch.testing.assert_close(u, torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0], [1 / 3, 1 / 3, 0.0, 1.0]]))
    beta = state.scores(X, u) * math.exp(2)  # the implementation's exp(N (u^2 - 1)): a factor e^-N per task
    th = math.tanh
    b = [[th(0.03), 0.0, math.exp(8 / 9) * th(0.06), math.exp(2) * th(0.32)],
         [math.exp(2 / 9) * th(0.06), 0.0, th(-0.02), math.exp(2) * th(0.32)]]
    torch.testing.assert_close(beta, torch.tensor(b), rtol=1e-5, atol=1e-7)
    # pcb_ratio 1: q = the minimum (beta_12 = 0, beta_23 = tanh(-.02)), which gets 0; the rest is weighted
    w10, w13 = b[0][0] / b[0][3], b[0][2] / b[0][3]
    w20, w21 = (b[1][0] - b[1][2]) / (b[1][3] - b[1][2]), (0 - b[1][2]) / (b[1][3] - b[1][2])
    keep_all = [(0.1 * w10 + 0.2 * w20) / (w10 + w20), 0.2 * w21 / w21, 0.3 * w13 / w13, 0.4]
    for ratio, lam, merged in [(0.75, 1.0, [0.2, 0.0, 0.3, 0.4]), (0.75, 2.0, [0.4, 0.0, 0.6, 0.8]),
                               (0.5, 1.0, [0.0, 0.0, 0.0, 0.4]),  # int(4 * 0.5) = 2: only each task's maximum
                               (1.0, 1.0, keep_all)]:
        out = pcb_merging(pre, fts, scaling_coef=lam, pcb_ratio=ratio, clamp_ratio=0.0, inter="sum")
        torch.testing.assert_close(out["w"], torch.tensor(merged), rtol=1e-6, atol=1e-7)
    out = pcb_merging(pre, fts, scaling_coef=[1.0, 3.0], pcb_ratio=0.75, clamp_ratio=0.0)
    torch.testing.assert_close(out["w"], torch.tensor([0.6, 0.0, 0.3, 0.8]), rtol=1e-6, atol=1e-7)


def test_clamp_uses_the_official_quantile_indices():
    """d = 200, clamp_ratio 0.01: |tau| clamped to sort(|tau|)[2] and sort(|tau|)[int(200 * 0.99 - 1)] = [197]."""
    g = torch.Generator().manual_seed(4)
    pre = {"w": torch.zeros(200)}
    fts = [{"w": torch.randn(200, generator=g)} for _ in range(2)]
    X = torch.stack([ft["w"] for ft in fts])
    from fusion_bench.merging.pcb import clamp_bounds
    from fusion_bench.merging.task_vectors import prepare

    lo, hi = clamp_bounds(prepare(pre, fts), 0.01)
    srt = X.abs().sort(1).values
    assert lo == srt[:, 2].tolist() and hi == srt[:, 197].tolist()


def test_degenerate_cases():
    pre, _ = make_models(1)
    same = pcb_merging(pre, [dict(pre) for _ in range(3)])  # zero task vectors: weights 0, theta_0
    assert all(torch.equal(same[k], pre[k]) for k in pre)
    # constant magnitudes per task: Norm of a constant is 0 (the code's 0 / 0), still the reference's merge
    g = torch.Generator().manual_seed(5)
    p = {"w": torch.randn(6, 5, generator=g)}
    signs = [torch.randint(0, 2, (6, 5), generator=g).float() * 2 - 1 for _ in range(3)]
    fts = [{"w": p["w"] + 0.01 * (t + 1) * s} for t, s in enumerate(signs)]
    out = pcb_merging(p, fts, clamp_ratio=0.0, pcb_ratio=0.5)
    assert torch.isfinite(out["w"]).all()
    ref = plain_pcb(p, fts, 0.5, 0.0, "sum", 1.2)
    torch.testing.assert_close(out["w"].double(), ref["w"], rtol=1e-5, atol=1e-7)
    # one task: the kept entries of its (clamped) task vector, times lambda
    pre1, fts1 = make_models(1, seed=6)
    one = pcb_merging(pre1, fts1, scaling_coef=1.0, pcb_ratio=0.3, clamp_ratio=0.0)
    assert_merge(one, pre1, plain_pcb(pre1, fts1, 0.3, 0.0, "sum", 1.0))


def test_logs_the_kept_share(caplog):
    pre, fts = make_models(3, seed=7)
    with caplog.at_level(logging.INFO, logger="fusion_bench.merging"):
        pcb_merging(pre, fts, pcb_ratio=0.2)
    msg = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pcb_merging:")]
    d = sum(v.numel() for v in pre.values() if v.is_floating_point())
    assert len(msg) == 1 and f"over {d} entries" in msg[0]
    shares = [float(x.rstrip("%")) for x in msg[0].split("kept (weight > 0) ")[1].split(", ")]
    assert all(19.0 <= s <= 20.0 for s in shares)  # the top 20% minus the threshold entry itself


def test_lazy_safetensors_equal_dicts(tmp_path):
    pre, fts = make_models(3, seed=8)
    lpre, lfts = save_models(tmp_path, pre, fts)
    a, b = pcb_merging(pre, fts, inter="pairwise"), pcb_merging(lpre, lfts, inter="pairwise")
    assert list(b) == list(lpre) and set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8)


def test_bf16_in_bf16_out_computed_in_fp32():
    pre, fts = make_models(3, seed=9, dtype=torch.bfloat16, scale=0.1)
    up = lambda sd: {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    out, ref = pcb_merging(pre, fts), pcb_merging(up(pre), [up(ft) for ft in fts])
    for k in float_keys(pre):
        assert out[k].dtype == torch.bfloat16
        torch.testing.assert_close(out[k], ref[k].to(torch.bfloat16), rtol=2**-8, atol=0)


# ---------------------------------------------------------------------------------------------
# bad settings: refused by the function and by the validation pass, before any work
# ---------------------------------------------------------------------------------------------
def test_bad_settings_refused_by_the_function():
    pre, fts = make_models(2, seed=10)
    for bad in (0.0, -0.1, 1.5, float("nan"), "most"):
        with pytest.raises(ValueError, match=r"pcb_merging: pcb_ratio=.* must be a fraction in \(0, 1\]"):
            pcb_merging(pre, fts, pcb_ratio=bad)
    for bad in (0.5, -0.01, 1.0):
        with pytest.raises(ValueError, match=r"pcb_merging: clamp_ratio=.* must be in \[0, 0.5\)"):
            pcb_merging(pre, fts, clamp_ratio=bad)
    with pytest.raises(ValueError, match=r"pcb_ratio=1e-17 keeps none of the 1130 entries"):
        pcb_merging(pre, fts, pcb_ratio=1e-17)
    with pytest.raises(ValueError, match="inter='softmax' must be one of"):
        pcb_merging(pre, fts, inter="softmax")
    with pytest.raises(ValueError, match="scaling_coef has 3 values but 2 task vectors"):
        pcb_merging(pre, fts, scaling_coef=[1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="scaling_coef"):
        pcb_merging(pre, fts, scaling_coef="search")
    with pytest.raises(ValueError, match=r"key 'tall' has shape \(40, 11\) in finetuned\[1\]"):
        pcb_merging(pre, [fts[0], {**fts[1], "tall": torch.zeros(40, 11)}])
    with pytest.raises(ValueError, match="no finetuned checkpoints"):
        pcb_merging(pre, [])


@pytest.mark.parametrize(("override", "message"), [
    ("method.pcb_ratio=0", r"method.pcb_ratio=0: must be a finite number in \(0, 1\]"),
    ("method.pcb_ratio=1.5", r"method.pcb_ratio=1.5: must be a finite number in \(0, 1\]"),
    ("method.clamp_ratio=0.5", r"method.clamp_ratio=0.5: must be a finite number in \[0, 0.5\)"),
    ("method.inter=softmax", r"method.inter='softmax': must be one of 'sum', 'normalized_sum', 'pairwise'"),
    ("method.scaling_coef=[1.0,2.0,3.0]", r"method.scaling_coef=\[1.0, 2.0, 3.0\]: has 3 values for 8 tasks"),
])
def test_bad_settings_refused_by_the_validation_pass(make_cfg, override, message):
    from fusion_bench.validation.check import check_options

    check_options(make_cfg("method=pcb_merging"))  # the YAML's own settings pass
    with pytest.raises(ConfigError, match=message):
        check_options(make_cfg("method=pcb_merging", override))


def test_table_entry_yaml_and_declared_affinity(tmp_path):
    """The table's row, the YAML's settings, and affine=True holding: theta(c) = theta_0 + c (theta(1) - theta_0),
    also per task (tests/test_search.py's checks, on method_cases' states)."""
    from method_cases import line_gap, merge, method_config, moved, states

    from fusion_bench.merging.registry import methods

    spec = methods()["pcb_merging"]
    assert spec.kind == "data-free" and spec.affine is True and spec.target == "fusion_bench.merging.pcb.pcb_merging"
    cfg = method_config("pcb_merging")
    assert {k: cfg[k] for k in ("scaling_coef", "pcb_ratio", "clamp_ratio", "inter")} == \
        {"scaling_coef": 1.2, "pcb_ratio": 0.1, "clamp_ratio": 0.01, "inter": "sum"}
    pre, fts = states()
    assert moved("pcb_merging", pre, fts)
    for c in (0.0, 0.3, 1.7):
        assert line_gap("pcb_merging", pre, fts, c) < 1e-6
        assert line_gap("pcb_merging", pre, fts, c, at_one=[0.5, 1.0, 1.5]) < 1e-6
        assert line_gap("pcb_merging", pre, fts, c, at_one=[0.5, 1.0, 1.5], inter="pairwise") < 1e-6
    lpre, lfts = save_models(tmp_path, pre, fts)
    a, b = merge("pcb_merging", pre, fts), merge("pcb_merging", lpre, lfts)
    for k in pre:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_every_numeric_setting_refuses_bad_values_by_name(make_cfg):
    """As tests/test_validation_ranges.py walks every config: the YAML validates as a whole run; each numeric
    setting has a declared range, and the usual bad values are refused naming the setting, or lie inside it."""
    from fusion_bench.pipeline import validate_config

    cfg = make_cfg("method=pcb_merging")
    validate_config(cfg)
    assert_bad_values_refused_by_name(cfg, ('method.scaling_coef', 'method.pcb_ratio', 'method.clamp_ratio'))


# ---------------------------------------------------------------------------------------------
# through the pipeline: `python run.py method=pcb_merging stage=merge` on stored (fake) fine-tunes
# ---------------------------------------------------------------------------------------------
def test_pipeline_run_merges_as_the_function(make_cfg, tmp_path, monkeypatch):
    from fusion_bench.families import build_family
    from fusion_bench.merging.task_arithmetic import task_arithmetic
    from fusion_bench.pipeline import run

    pool = ["taskpool.tasks=[shapes,colors]"]
    fam = build_family(make_cfg(*pool))
    fts = store_fake_finetunes(fam, seed=5)
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("fine-tuned"))
    run(make_cfg(*pool, "method=pcb_merging", "stage=merge", "method.inter=pairwise"), tmp_path / "run", "pcb_merging")
    merged = load_file(tmp_path / "run" / "merged.safetensors")
    expected = pcb_merging(fam.pretrained_state, fts, scaling_coef=1.2, pcb_ratio=0.1, clamp_ratio=0.01,
                           inter="pairwise")
    assert set(merged) == set(expected)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    ta = task_arithmetic(fam.pretrained_state, fts, scaling_coef=0.6)
    assert any(not torch.allclose(merged[k], ta[k]) for k in merged)
