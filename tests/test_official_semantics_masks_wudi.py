"""Consensus / TALL masks and WUDI against plain re-implementations of the official code's semantics.

- Consensus and TALL masks: nik-dim/tall_masks (``src/eval/aggregation.py``, ``src/utils/ties_utils.py``,
  ``src/utils/tallmask_utils.py``, ``src/utils/utils.py::topk_values_mask``): one flattened vector over the
  (sorted) keys; TIES for ``tau_MTL`` with ``reset_thresh=20`` and ``merge_func="dis-sum"``; masks from the
  untrimmed task vectors.
- WUDI: nathanielyvo/WUDI-Merging (``vit/wudi_main.py``, ``vit/task_vectors.py``): only keys whose name
  contains a block linear map are optimised (autograd + ``torch.optim.Adam``), every other key stays at
  theta_0 (``apply_to`` loads the merged keys with ``strict=False``).

Written here entry by entry / key by key from those definitions (not with the library's helpers), on
open_clip-style state dicts whose task vectors share directions (a common component, one task of opposite
sign, frozen keys), not only on independent random task vectors.
"""

from __future__ import annotations

import logging

import pytest
import torch

from fusion_bench.merging import consensus_merging, tall_masks, task_arithmetic, wudi_merging

pytestmark = pytest.mark.usefixtures("one_thread")

OFFICIAL_WUDI_SUBSTRINGS = (
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


# ---------------------------------------------------------------------------------------------
# inputs: a tiny open_clip visual tower's state dict
# ---------------------------------------------------------------------------------------------
def clip_shapes(width: int = 6, layers: int = 2, tokens: int = 5, out_dim: int = 4) -> dict[str, tuple]:
    w = width
    shapes = {
        "class_embedding": (w,),
        "positional_embedding": (tokens, w),
        "proj": (w, out_dim),
        "conv1.weight": (w, 3, 2, 2),
        "ln_pre.weight": (w,),
        "ln_pre.bias": (w,),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        shapes |= {
            b + "ln_1.weight": (w,),
            b + "ln_1.bias": (w,),
            b + "attn.in_proj_weight": (3 * w, w),
            b + "attn.in_proj_bias": (3 * w,),
            b + "attn.out_proj.weight": (w, w),
            b + "attn.out_proj.bias": (w,),
            b + "ln_2.weight": (w,),
            b + "ln_2.bias": (w,),
            b + "mlp.c_fc.weight": (4 * w, w),
            b + "mlp.c_fc.bias": (4 * w,),
            b + "mlp.c_proj.weight": (w, 4 * w),
            b + "mlp.c_proj.bias": (w,),
        }
    shapes |= {"ln_post.weight": (w,), "ln_post.bias": (w,)}
    return shapes


def make_models(shapes: dict[str, tuple], n_tasks: int = 4, seed: int = 0, scale: float = 0.05):
    """theta_t = theta_0 + scale * (s_t c + 0.6 z_t + rank-1 shared part on 2-D keys): a common component c
    (task 2 has it with the opposite sign: sign conflicts), task noise z_t; ``ln_post.*`` is frozen for task 0
    (its task vector is exactly 0 there) and ``class_embedding`` for every task."""
    g = torch.Generator().manual_seed(seed)
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    common = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    rank1 = {
        k: torch.randn(s[0], 1, generator=g) @ torch.randn(1, s[1], generator=g)
        for k, s in shapes.items()
        if len(s) == 2
    }
    signs = [1.0, 1.0, -1.0, 1.0, 1.0, 1.0][:n_tasks]
    fts = []
    for t in range(n_tasks):
        ft = {}
        for k, s in shapes.items():
            tau = signs[t] * common[k] + 0.6 * torch.randn(s, generator=g)
            if k in rank1:
                tau = tau + 1.5 * rank1[k]
            frozen = k == "class_embedding" or (t == 0 and k.startswith("ln_post"))
            ft[k] = pre[k].clone() if frozen else pre[k] + scale * tau
        fts.append(ft)
    return pre, fts


# ---------------------------------------------------------------------------------------------
# the official TALL / Consensus code, written out (float64 arithmetic on the fp32 task vectors)
# ---------------------------------------------------------------------------------------------
def official_flat_task_vectors(pre, fts) -> tuple[list[str], list[list[float]]]:
    """``state_dict_to_vector`` (keys sorted) of each fine-tune minus that of theta_0, in fp32 as the official
    code computes them, as Python floats."""
    keys = sorted(pre)
    flat_pre = torch.cat([pre[k].reshape(-1) for k in keys])
    return keys, [(torch.cat([ft[k].reshape(-1) for k in keys]) - flat_pre).tolist() for ft in fts]


def official_topk_trim(x: list[float], reset_thresh: float) -> list[float]:
    """``topk_values_mask(M, K=reset_thresh)`` for one task: K >= 1 is a percentage; keep |x| >= the
    ``(d - int(d K))``-th smallest |x| (``kthvalue`` is 1-based)."""
    if reset_thresh == 100:
        return list(x)
    k_frac = reset_thresh / 100 if reset_thresh >= 1 else reset_thresh
    d = len(x)
    kth = sorted(abs(v) for v in x)[d - int(d * k_frac) - 1]
    return [v if abs(v) >= kth else 0.0 for v in x]


def official_ties_mtl(taus: list[list[float]], reset_thresh: float, merge_func: str) -> list[float]:
    """``ties_merging``: trim, ``resolve_sign`` (zero sums take the majority sign), ``disjoint_merge``."""
    trimmed = [official_topk_trim(x, reset_thresh) for x in taus]
    d = len(trimmed[0])
    signs = []
    for i in range(d):
        s = sum(x[i] for x in trimmed)
        signs.append((s > 0) - (s < 0))
    majority = sum(signs)
    majority = (majority > 0) - (majority < 0)
    out = []
    for i in range(d):
        sign = signs[i] if signs[i] != 0 else majority
        agree = [x[i] for x in trimmed if (x[i] > 0 if sign > 0 else x[i] < 0)]
        total = sum(agree)
        out.append(total / max(len(agree), 1) if merge_func == "dis-mean" else total)
    return out


def official_tall(taus, mtl, lambdas, strict: bool) -> list[list[bool]]:
    """``generate_task_masks``: ``|theta_0 - theta_t| > lambda |theta_MTL - theta_t|``; ``strict=False`` is
    the ``>=`` of the definition used by fusion_bench."""
    masks = []
    for x, lam in zip(taus, lambdas):
        if strict:
            masks.append([abs(v) > lam * abs(m - v) for v, m in zip(x, mtl)])
        else:
            masks.append([abs(v) >= lam * abs(m - v) for v, m in zip(x, mtl)])
    return masks


def official_mtl(taus, base: str, merge_func: str = "dis-sum") -> list[float]:
    if base == "ties":
        return official_ties_mtl(taus, 20, merge_func)  # hard-coded reset_thresh=20 in aggregation.py
    trimmed = [official_topk_trim(x, 100) for x in taus]  # method.k = 100: no trimming
    return [sum(x[i] for x in trimmed) for i in range(len(taus[0]))]


def unflatten(keys, pre, vec) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for k in keys:
        n = pre[k].numel()
        out[k] = torch.tensor(vec[off : off + n], dtype=torch.float64).reshape(pre[k].shape)
        off += n
    return out


def margin_guard(taus, mtl, lambdas, rel: float = 1e-5) -> None:
    """The data is far from every non-trivial mask tie: fp32 (library) and fp64 (here) give the same masks."""
    for x, lam in zip(taus, lambdas):
        for v, m in zip(x, mtl):
            a, b = abs(v), lam * abs(m - v)
            if a == 0.0 and b == 0.0:
                continue  # tau_t = tau_MTL = 0: a tie by construction, where the mask changes no weight
            assert abs(a - b) > rel * max(a, b), "seeded data too close to a mask tie: choose another seed"


# ---------------------------------------------------------------------------------------------
# Consensus-TIES and TALL over TIES: dis-sum, the official trim count
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("base", "agg"), [("ties", "sum"), ("ties", "mean"), ("task_arithmetic", "sum")])
def test_tall_and_consensus_equal_the_official_code(base, agg):
    shapes = clip_shapes()
    pre, fts = make_models(shapes, seed=1)
    keys, taus = official_flat_task_vectors(pre, fts)
    n = len(fts)
    mtl = official_mtl(taus, base, f"dis-{agg}")
    lambdas = [0.2, 0.4, 0.6, 0.3]
    margin_guard(taus, mtl, lambdas)
    kw = {"ties_k": 0.2, "ties_agg": agg} if base == "ties" else {}

    # TALL masks: the shared vector and every task's mask (>=), and task t's weights equal with > as well
    r = tall_masks(pre, fts, lambdas=lambdas, base=base, **kw)
    mtl_sd = unflatten(keys, pre, mtl)
    masks = official_tall(taus, mtl, lambdas, strict=False)
    masks_strict = official_tall(taus, mtl, lambdas, strict=True)
    for key in keys:
        torch.testing.assert_close(r.shared[key].double(), mtl_sd[key], rtol=1e-6, atol=1e-7, msg=key)
    for t in range(n):
        m_sd = unflatten(keys, pre, [float(b) for b in masks[t]])
        ms_sd = unflatten(keys, pre, [float(b) for b in masks_strict[t]])
        w = r.task_weights(t)
        for key in keys:
            assert torch.equal(r.masks[key][t], m_sd[key].bool()), (key, t)
            ref = pre[key].double() + ms_sd[key] * mtl_sd[key]  # the official code's > gives the same weights
            torch.testing.assert_close(w[key].double(), ref, rtol=1e-6, atol=1e-7, msg=key)

    # Consensus: keep entries selected by >= k TALL masks (with > as the official code: the same weights)
    for k in (1, 2, 3):
        out = consensus_merging(pre, fts, k=k, lambdas=lambdas, base=base, scaling_coef=0.7, **kw)
        for strict in (False, True):
            ms = masks_strict if strict else masks
            count = [sum(ms[t][i] for t in range(n)) for i in range(len(mtl))]
            upd = unflatten(keys, pre, [m if c >= k else 0.0 for m, c in zip(mtl, count)])
            for key in keys:
                ref = pre[key].double() + 0.7 * upd[key]
                torch.testing.assert_close(out[key].double(), ref, rtol=1e-6, atol=1e-7, msg=(key, k, strict))
        for key in ("class_embedding",):  # no task moves it: tau_MTL = 0 there
            assert torch.equal(out[key], pre[key])


def test_ties_trim_keeps_one_entry_more_than_int_k_n():
    """The official count: kthvalue(d - int(d K)) keeps int(d K) + 1 entries (no ties); here d = 10, K = 0.2:
    3 entries, not 2.  One task: the elected sign is its own, the dis-sum is the trimmed vector."""
    tau = torch.tensor([0.5, -4.0, 3.0, 0.1, -2.0, 1.0, 0.2, -0.3, 0.05, 0.7])
    pre = {"w": torch.zeros(10)}
    fts = [{"w": tau}, {"w": torch.zeros(10)}]  # a zero second task: its trimmed vector is all zero
    r = tall_masks(pre, fts, lambdas=0.0, base="ties", ties_k=0.2)
    assert torch.equal(r.shared["w"], torch.tensor([0.0, -4.0, 3.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    ref = official_ties_mtl([tau.tolist(), [0.0] * 10], 20, "dis-sum")
    assert torch.equal(r.shared["w"], torch.tensor(ref))


def test_dis_sum_is_the_default_and_differs_from_dis_mean():
    pre, fts = make_models(clip_shapes(), seed=2)
    default = consensus_merging(pre, fts, lambdas=0.4, base="ties", scaling_coef=0.5)
    as_sum = consensus_merging(pre, fts, lambdas=0.4, base="ties", scaling_coef=0.5, ties_agg="sum")
    as_mean = consensus_merging(pre, fts, lambdas=0.4, base="ties", scaling_coef=0.5, ties_agg="mean")
    assert all(torch.equal(default[k], as_sum[k]) for k in pre)
    assert any(not torch.allclose(as_sum[k], as_mean[k]) for k in pre)
    r = tall_masks(pre, fts, lambdas=0.4, base="ties")
    r_mean = tall_masks(pre, fts, lambdas=0.4, base="ties", ties_agg="mean")
    assert any(not torch.equal(r.masks[k], r_mean.masks[k]) for k in pre)


def test_consensus_ta_unchanged_by_ties_agg():
    """Consensus-TA: tau_MTL = sum_t tau_t, whatever ties_agg says; k = 1 with lambda 0 is task arithmetic."""
    pre, fts = make_models(clip_shapes(), seed=3)
    a = consensus_merging(pre, fts, lambdas=0.4, scaling_coef=0.5)
    b = consensus_merging(pre, fts, lambdas=0.4, scaling_coef=0.5, ties_agg="mean")
    assert all(torch.equal(a[k], b[k]) for k in pre)
    union = consensus_merging(pre, fts, k=1, lambdas=0.0, scaling_coef=0.5)
    ta = task_arithmetic(pre, fts, scaling_coef=0.5)
    for k in pre:
        torch.testing.assert_close(union[k], ta[k], rtol=1e-6, atol=1e-7)


def test_configs_default_to_dis_sum():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "method"
    for name in ("consensus_ties", "tall_masks"):
        assert OmegaConf.load(conf / f"{name}.yaml").ties_agg == "sum", name


# ---------------------------------------------------------------------------------------------
# WUDI: the official ViT code's keys
# ---------------------------------------------------------------------------------------------
def official_wudi(pre, fts, select, lr: float = 1e-5, iter_num: int = 300, mean_others: bool = False):
    """``decompose_task_vectors`` + ``apply_to(scaling_coef=1)`` in float64: Adam (lr, weight_decay 0) on
    sum_t ||(m - tau_t) tau_t^T||^2 / ||tau_t||^2 from m = sum_t tau_t for the selected keys; the rest
    theta_0 (or, ``mean_others``, theta_0 + mean_t tau_t for the non-selected float keys)."""
    out = {}
    for key in pre:
        tvs = torch.stack([ft[key].double() - pre[key].double() for ft in fts])
        if not select(key):
            out[key] = pre[key].double() + (tvs.mean(0) if mean_others else 0.0)
            continue
        merging_vector = torch.nn.Parameter(tvs.sum(0))
        opt = torch.optim.Adam([merging_vector], lr=lr, weight_decay=0)
        l2 = torch.square(torch.norm(tvs.reshape(tvs.shape[0], -1), p=2, dim=-1))
        for _ in range(iter_num):
            inner = torch.matmul(merging_vector.unsqueeze(0) - tvs, tvs.transpose(1, 2))
            loss = torch.sum(torch.square(inner) / l2.unsqueeze(-1).unsqueeze(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[key] = pre[key].double() + merging_vector.detach()
    return out


def official_clip_key(key: str) -> bool:
    return any(s in key for s in OFFICIAL_WUDI_SUBSTRINGS)


def test_wudi_official_keys_equal_the_official_code(caplog):
    shapes = clip_shapes()
    pre, fts = make_models(shapes, n_tasks=3, seed=4)
    with caplog.at_level(logging.INFO, logger="fusion_bench.merging"):
        out = wudi_merging(pre, fts)  # keys="official" is the default
    ref = official_wudi(pre, fts, official_clip_key)
    optimised = [k for k in shapes if official_clip_key(k)]
    assert len(optimised) == 8
    for key in shapes:
        if key in optimised:
            torch.testing.assert_close(out[key].double(), ref[key], rtol=1e-5, atol=2e-6, msg=key)
            m0 = pre[key].double() + sum(ft[key].double() - pre[key].double() for ft in fts)
            assert (ref[key] - m0).abs().max() > 1e-3, key  # Adam moved it well beyond the tolerance
        else:  # positional_embedding, proj, conv1, norms, biases, class_embedding: theta_0, bit for bit
            assert torch.equal(out[key], pre[key]), key
    assert any("8 block linear maps optimised, 24 other float keys left at theta_0" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_wudi_all_2d_is_the_reference_framework():
    shapes = clip_shapes(layers=1)
    pre, fts = make_models(shapes, n_tasks=3, seed=5)
    out = wudi_merging(pre, fts, keys="all_2d", lr=1e-4, iterations=50)
    ref = official_wudi(pre, fts, lambda k: len(shapes[k]) == 2, lr=1e-4, iter_num=50, mean_others=True)
    for key in shapes:
        torch.testing.assert_close(out[key].double(), ref[key], rtol=1e-5, atol=2e-6, msg=key)
    official = wudi_merging(pre, fts, lr=1e-4, iterations=50)
    for key in ("positional_embedding", "proj", "ln_post.weight"):  # the two key sets differ here only
        assert not torch.equal(out[key], pre[key]) and torch.equal(official[key], pre[key]), key
    for key in ("transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_proj.weight"):
        assert torch.equal(out[key], official[key]), key


def t5_shapes(d: int = 4, ff: int = 6, vocab: int = 9, buckets: int = 5, heads: int = 2) -> dict[str, tuple]:
    shapes = {"shared.weight": (vocab, d), "encoder.embed_tokens.weight": (vocab, d)}
    b = "encoder.block.0.layer."
    shapes |= {f"{b}0.SelfAttention.{p}.weight": (d, d) for p in "qkvo"}
    shapes |= {
        f"{b}0.SelfAttention.relative_attention_bias.weight": (buckets, heads),
        f"{b}0.layer_norm.weight": (d,),
    }
    shapes |= {f"{b}1.DenseReluDense.wi_0.weight": (ff, d), f"{b}1.DenseReluDense.wi_1.weight": (ff, d),
               f"{b}1.DenseReluDense.wo.weight": (d, ff), f"{b}1.layer_norm.weight": (d,)}  # fmt: skip
    b = "decoder.block.0.layer."
    shapes |= {f"{b}1.EncDecAttention.{p}.weight": (d, d) for p in "qkvo"}
    shapes |= {f"{b}2.DenseReluDense.wi.weight": (ff, d), f"{b}2.DenseReluDense.wo.weight": (d, ff)}
    shapes |= {"decoder.final_layer_norm.weight": (d,), "lm_head.weight": (vocab, d)}
    return shapes


def test_wudi_official_on_t5_optimises_the_block_linear_maps():
    shapes = t5_shapes()
    pre, fts = make_models(shapes, n_tasks=3, seed=6)
    out = wudi_merging(pre, fts, lr=1e-4, iterations=40)

    def t5_linear(key: str) -> bool:
        return ".block." in key and key.rsplit(".", 2)[-2] in ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")

    ref = official_wudi(pre, fts, t5_linear, lr=1e-4, iter_num=40)
    optimised = [k for k in shapes if t5_linear(k)]
    assert len(optimised) == 4 + 3 + 4 + 2
    for key in shapes:
        if key in optimised:
            torch.testing.assert_close(out[key].double(), ref[key], rtol=1e-5, atol=2e-6, msg=key)
            assert not torch.equal(out[key], pre[key]), key
        else:  # embeddings, lm_head, relative_attention_bias, layer norms
            assert torch.equal(out[key], pre[key]), key


def test_wudi_official_refuses_a_space_without_block_linear_maps():
    lora = {"transformer.resblocks.0.attn.lora_A.default.weight": (2, 6),
            "transformer.resblocks.0.attn.base_layer.out_proj.lora_B.default.weight": (6, 2)}  # fmt: skip
    pre, fts = make_models(lora, n_tasks=2, seed=7)
    with pytest.raises(ValueError, match=r"keys='official' selects none of the 2 2-D keys.*keys='all_2d'"):
        wudi_merging(pre, fts, iterations=1)
    out = wudi_merging(pre, fts, iterations=1, keys="all_2d")
    assert all(not torch.equal(out[k], pre[k]) for k in lora)
    with pytest.raises(ValueError, match="keys='every' must be 'official'"):
        wudi_merging(pre, fts, keys="every")


def test_tall_lambda_search_uses_the_methods_ties_agg(monkeypatch, make_cfg):
    """The pipeline picks lambda_t with the masks of the configured tau_MTL (base, ties_k, ties_agg)."""
    from types import SimpleNamespace

    import fusion_bench.stages.coefficients.grid as co

    seen = []
    monkeypatch.setattr(co, "tall_masks", lambda pre, fts, lambdas, **kw: seen.append(kw) or "merge")
    monkeypatch.setattr(co, "merged_accuracies", lambda fam, merged, split, linearized=False: {"a": 0.5})
    fam = SimpleNamespace(pretrained_state={}, tasks=["a"])
    for overrides, expected in (
        (["method=consensus_ties"], {"base": "ties", "ties_k": 0.2, "ties_agg": "sum"}),
        (
            ["method=consensus_ties", "method.ties_agg=mean"],
            {"base": "ties", "ties_k": 0.2, "ties_agg": "mean"},
        ),
        (["method=tall_masks", "method.base=ties"], {"base": "ties", "ties_k": 0.2, "ties_agg": "sum"}),
    ):
        seen.clear()
        method = SimpleNamespace(cfg=make_cfg(*overrides).method, evaluate_linearized=False)
        assert co.choose_tall_lambdas(fam, method, []) == [0.2]
        assert len(seen) == 5 and all(kw == expected for kw in seen), (overrides, seen)
