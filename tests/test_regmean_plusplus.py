"""RegMean++ (fusion_bench/merging/regmean_pp.py) against a float64 brute force written here, its limits (one task,
the first block = RegMean), its refusals, and a run through the pipeline."""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fusion_bench import merging
from fusion_bench.clip.family import CLIPFamily
from fusion_bench.errors import ConfigError
from fusion_bench.families import build_family
from fusion_bench.merging.regmean_pp import regmean_plusplus
from fusion_bench.pipeline import run
from fusion_bench.stages import statistics
from fusion_bench.stages.layer_grams import NetworkLayerGrams
from fusion_bench.stages.merge import Method
from fusion_bench.statistics import input_grams
from fusion_bench.statistics.grams import linear_map_keys
from fusion_bench.validation.check import check_options

pytestmark = pytest.mark.usefixtures("one_thread")

RATIO = 0.8


def tiny_vit() -> open_clip.transformer.VisionTransformer:
    torch.manual_seed(0)
    vit = open_clip.transformer.VisionTransformer(image_size=16, patch_size=8, width=16, layers=3, heads=2,
                                                  mlp_ratio=2, output_dim=8)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vit.double().eval()


def finetunes(vit, n, blocks_only=False, scale=0.3):
    """Seeded fine-tunes; with `blocks_only` the stem and head stay at theta_0 (only the blocks move)."""
    g = torch.Generator().manual_seed(1)
    pre = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    fts = []
    for _ in range(n):
        fts.append({k: v + scale * v.std().clamp_min(0.1) * torch.randn(v.shape, generator=g, dtype=v.dtype)
                    if not blocks_only or ".resblocks." in k else v.clone() for k, v in pre.items()})
    return pre, fts


def task_batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(5, 3, 16, 16, generator=g, dtype=torch.float64) + t,
             torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)] for t in range(n)]


def at(vit, state):
    m = copy.deepcopy(vit)
    m.load_state_dict(state)
    return m.eval()


def implementation(vit, batches):
    """What the pipeline hands the merge, over a bare open_clip ViT (no family data)."""
    order = CLIPFamily(OmegaConf.create({})).regmean_layers(list(vit.state_dict()))
    return NetworkLayerGrams(order, lambda s: at(vit, s),
                             lambda m, b, ks, stop: input_grams(m, b, keys=ks, stop_after=stop)[0], batches,
                             linear_map_keys(vit))


# ---------------------------------------------------------------------------------------------
# the brute force: the official algorithm written out, activations carried from block to block in float64
# ---------------------------------------------------------------------------------------------
def gram(xs):
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
    return x.T @ x / x.shape[0]


def closed_form(ws, gs, right=False):
    red = [RATIO * g + (1 - RATIO) * torch.diag(torch.diagonal(g)) for g in gs]
    if right:  # x @ proj
        return torch.linalg.inv(sum(red)) @ sum(r @ w for r, w in zip(red, ws))
    return sum(w @ r for w, r in zip(ws, red)) @ torch.linalg.inv(sum(red))


def block_inputs(block, h):
    """Run one open_clip residual block on h, hooks catching its linear maps' inputs; out_proj's by hand."""
    ins, handles = {}, []
    for mod, key in ((block.ln_1, "attn.in_proj_weight"), (block.ln_2, "mlp.c_fc.weight"),
                     (block.mlp.gelu, "mlp.c_proj.weight")):
        handles.append(mod.register_forward_hook(lambda m, a, out, key=key: ins.setdefault(key, []).append(out)))
    out = block(h)
    for hd in handles:
        hd.remove()
    a = block.attn
    for y in ins["attn.in_proj_weight"]:
        q, k, v = torch.nn.functional.linear(y, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
        B, L, D = q.shape
        q, k, v = (t.reshape(B, L, a.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        ins.setdefault("attn.out_proj.weight", []).append((w @ v).transpose(1, 2).reshape(B, L, D))
    return out, ins


def brute_force(vit, pre, fts, batches, after_blocks):
    n = len(fts)
    mean = {k: sum(ft[k] for ft in fts) / n for k in pre}
    merged = {k: mean[k] for k in pre if not k.startswith(("transformer.", "ln_post", "proj"))}  # the stem
    model = at(vit, {**pre, **merged})
    with torch.no_grad():
        hs = [[model._embeds(x) for x in b] for b in batches]
        for i in range(len(vit.transformer.resblocks)):
            p = f"transformer.resblocks.{i}."
            ins = []
            for t in range(n):
                own = at(vit, fts[t]).transformer.resblocks[i]  # task t's block on the merge's inputs
                per = {}
                for h in hs[t]:
                    for k, xs in block_inputs(own, h)[1].items():
                        per.setdefault(k, []).extend(xs)
                ins.append(per)
            for k in pre:
                if k.startswith(p):
                    short = k[len(p):]
                    merged[k] = (closed_form([ft[k] for ft in fts], [gram(x[short]) for x in ins])
                                 if short in ins[0] else mean[k])
            block = at(vit, {**pre, **mean, **merged}).transformer.resblocks[i]
            hs = [[block(h) for h in ht] for ht in hs]
        if after_blocks == "pretrained":
            merged.update({k: pre[k] for k in ("ln_post.weight", "ln_post.bias", "proj")})
        else:
            merged.update({k: mean[k] for k in ("ln_post.weight", "ln_post.bias")})
            pooled = [[at(vit, fts[t])._pool(h)[0] for h in hs[t]] for t in range(n)]  # task t's ln_post
            merged["proj"] = closed_form([ft["proj"] for ft in fts], [gram(x) for x in pooled], right=True)
    return merged


@pytest.mark.parametrize("after_blocks", ["pretrained", "regmean"])
def test_equals_the_brute_force_layer_by_layer(after_blocks):
    vit = tiny_vit()
    pre, fts = finetunes(vit, 3)
    batches = task_batches(3)
    want = brute_force(vit, pre, fts, batches, after_blocks)
    got = regmean_plusplus(pre, fts, implementation(vit, batches), reduce_non_diagonal_ratio=RATIO,
                           after_blocks=after_blocks)
    assert list(got) == list(pre) and set(want) == set(pre)
    for k in pre:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], want[k], rtol=2e-5, atol=2e-6, msg=k)


def test_one_task_gives_its_weights():
    vit = tiny_vit()
    pre, fts = finetunes(vit, 1)
    for after, head in (("regmean", fts[0]), ("pretrained", pre)):
        got = regmean_plusplus(pre, fts, implementation(vit, task_batches(1)), after_blocks=after)
        for k in pre:
            want = head[k] if k.startswith(("ln_post", "proj")) else fts[0][k]
            torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7, msg=k)


def test_first_block_is_regmean_later_ones_are_not():
    """Fine-tunes of the blocks only: block 0 reads the same inputs in the merge and in every fine-tune, so it is
    RegMean's merge over each fine-tune's own Grams; block 1 reads the merged block 0's outputs instead."""
    vit = tiny_vit()
    pre, fts = finetunes(vit, 3, blocks_only=True, scale=0.6)
    batches = task_batches(3)
    got = regmean_plusplus(pre, fts, implementation(vit, batches), reduce_non_diagonal_ratio=RATIO)
    grams = [input_grams(at(vit, ft), b)[0] for ft, b in zip(fts, batches)]
    plain = merging.regmean(pre, fts, grams, reduce_non_diagonal_ratio=RATIO)
    for k in pre:
        if k.startswith("transformer.resblocks.0."):
            torch.testing.assert_close(got[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    later = [k for k in pre if k.startswith("transformer.resblocks.1.") and pre[k].dim() == 2]
    gap = max(float((got[k] - plain[k]).norm() / plain[k].norm()) for k in later)
    assert gap > 1e-3, gap


def test_stop_after_cuts_the_forward_and_leaves_the_grams():
    vit, b = tiny_vit(), task_batches(1)[0]
    keys = [k for k in linear_map_keys(vit) if k.startswith("transformer.resblocks.1.")]
    ran = []
    hook = vit.transformer.resblocks[2].register_forward_hook(lambda *a: ran.append(1))
    cut = input_grams(vit, b, keys=keys, stop_after=vit.transformer.resblocks[1])[0]
    assert not ran and vit.proj is not None
    full = input_grams(vit, b, keys=keys)[0]
    hook.remove()
    assert ran and set(cut) == set(full) == set(keys) and all(torch.equal(cut[k], full[k]) for k in keys)


def test_bad_layer_orders_and_settings_are_refused():
    vit = tiny_vit()
    pre, fts = finetunes(vit, 2)
    lg = implementation(vit, task_batches(2))
    with pytest.raises(ValueError, match="reduce_non_diagonal_ratio"):
        regmean_plusplus(pre, fts, lg, reduce_non_diagonal_ratio=1.5)
    with pytest.raises(ValueError, match="after_blocks"):
        regmean_plusplus(pre, fts, lg, after_blocks="mean")
    short = copy.copy(lg)
    short.order = type(lg.order)(lg.order.stem[1:], lg.order.blocks, lg.order.head)
    with pytest.raises(ValueError, match=f"{lg.order.stem[0]!r} is in no layer"):
        regmean_plusplus(pre, fts, short)


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
TASKS = ["shapes", "colors"]
POOL = [f"taskpool.tasks=[{','.join(TASKS)}]", "model.eval_batch_size=64"]
FEW = ["method=regmean_plusplus", "method.statistics.num_samples=24", "method.statistics.batch_size=8"]


@pytest.mark.parametrize("overrides,match", [
    (["method.reduce_non_diagonal_ratio=1.5"], r"method.reduce_non_diagonal_ratio=1.5"),
    (["method.after_blocks=mean"], r"method.after_blocks='mean'"),
    (["method.statistics.num_samples=0"], r"method.statistics.num_samples=0"),
])
def test_bad_settings_are_refused_by_the_validation_pass(make_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_options(make_cfg(*POOL, *FEW, *overrides))


@pytest.mark.parametrize("overrides,match", [
    (["method.statistics.kind=gram"], r"statistics.kind='gram' is not what it merges with; use .*layer_gram"),
    (["finetune=linear"], r"needs input Gram matrices of the partial merge.*linearized model"),
])
def test_bad_input_stops_before_any_training(make_cfg, tmp_path, monkeypatch, overrides, match):
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("fine-tuned"))
    with pytest.raises(ConfigError, match=match):
        run(make_cfg(*POOL, *FEW, *overrides, f"paths.store={tmp_path}/empty"), tmp_path / "r", "regmean_plusplus")
    with pytest.raises(ConfigError, match="statistics.kind='layer_gram' is not what it merges with; use statistics.kind='gram'"):
        run(make_cfg(*POOL, "method=regmean", "method.statistics.kind=layer_gram", f"paths.store={tmp_path}/empty"),
            tmp_path / "r2", "regmean")


def test_run_merges_and_evaluates_two_tasks(make_cfg, tmp_path, monkeypatch):
    fam = build_family(make_cfg(*POOL))
    g = torch.Generator().manual_seed(5)
    fts = []
    for t in TASKS:  # fine-tunes as the store keeps them, without training
        state = {k: v + 0.3 * v.std().clamp_min(0.05) * torch.randn(v.shape, generator=g)
                 for k, v in fam.trainable_state(fam.base).items()}
        fam.store.save(fam.checkpoint(t), state, {"task": t, "pretrained": fam.fingerprint})
        fts.append(fam.to_merge_space(state))
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("fine-tuned"))
    cfg = make_cfg(*POOL, *FEW, "method.after_blocks=regmean")
    report = run(cfg, tmp_path / "r", "regmean_plusplus")
    assert set(report["tasks"]) == set(TASKS) and all(0 <= report["tasks"][t]["merged"] <= 1 for t in TASKS)
    merged = load_file(tmp_path / "r" / "merged.safetensors")
    method = Method(cfg.method, "standard", "regmean_plusplus")
    lg = statistics.task_statistics(fam, method, TASKS)["layer_grams"]
    assert len(lg.order.blocks) == 4 and lg.order.head.keys == ("proj", "ln_post.weight", "ln_post.bias")
    want = regmean_plusplus(fam.pretrained_state, fts, lg, reduce_non_diagonal_ratio=0.95, after_blocks="regmean")
    assert set(merged) == set(want)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    grams = statistics.task_statistics(fam, Method(make_cfg(*POOL, "method=regmean", "method.statistics.num_samples=24"
                                                            ).method, "standard"), TASKS)["grams"]
    plain = merging.regmean(fam.pretrained_state, fts, grams, reduce_non_diagonal_ratio=0.95)
    last = [k for k in want if k.startswith("transformer.resblocks.3.") and want[k].dim() == 2]
    assert all(not torch.allclose(want[k], plain[k], rtol=1e-3, atol=1e-5) for k in last)
    assert not any(p.name.startswith(fam.checkpoint(TASKS[0]).stem + ".stat-layer") for p in
                   fam.checkpoint(TASKS[0]).parent.iterdir())  # nothing stored: the Grams depend on the merge


def test_a_family_without_a_layer_order_is_refused_before_any_training(make_cfg, tmp_path, monkeypatch):
    def no_order(self, keys):
        raise NotImplementedError("CLIPFamily gives no layer order (regmean_layers)")

    monkeypatch.setattr(CLIPFamily, "regmean_layers", no_order)
    monkeypatch.setattr("fusion_bench.clip.train.finetune", lambda *a, **k: pytest.fail("fine-tuned"))
    with pytest.raises(ConfigError, match="merges block by block, but model=tiny_clip declares no layer order"):
        run(make_cfg(*POOL, *FEW, f"paths.store={tmp_path}/empty"), tmp_path / "r", "regmean_plusplus")


def test_t5_encoder_then_decoder_with_the_merged_encoder_output(make_cfg):
    """T5: the same rule over encoder blocks, the encoder's final norm, decoder blocks. Fine-tunes of the blocks
    only: the first encoder block and the first decoder block's maps that read decoder tokens are RegMean's; its
    cross-attention keys / values read the merged encoder's output, and the second blocks the merged first's."""
    cfg = make_cfg("model=tiny_t5", "taskpool=tiny_glue", "taskpool.tasks=[sst2,rte]", *FEW[:2],
                   "method.statistics.batch_size=8", "num_threads=1")
    fam = build_family(cfg)
    pre = fam.pretrained_state
    g = torch.Generator().manual_seed(0)
    fts = [{k: v + (0.3 * v.std() * torch.randn(v.shape, generator=g) if ".block." in k else 0) for k, v in pre.items()}
           for _ in range(2)]
    lg = statistics.task_statistics(fam, Method(cfg.method, "standard", "regmean_plusplus"), ["sst2", "rte"])
    lg = lg["layer_grams"]
    assert [b.name for b in lg.order.blocks] == ["encoder.block.0", "encoder.block.1", "encoder.final_layer_norm",
                                                 "decoder.block.0", "decoder.block.1"]
    assert lg.order.stem == ("shared.weight",) and lg.order.head.keys == ("decoder.final_layer_norm.weight",)
    got = regmean_plusplus(pre, fts, lg)
    grams = [{k: v for k, v in fam.grams(fam.model_with(ft), b).items() if k in pre} for ft, b in zip(fts, lg.batches)]
    plain = merging.regmean(pre, fts, grams, reduce_non_diagonal_ratio=0.95)
    dec = "decoder.block.0.layer."
    same = [k for k in pre if k.startswith(("encoder.block.0.", dec + "0.", dec + "1.EncDecAttention.q"))]
    differ = [k for k in pre if pre[k].dim() == 2 and k.startswith(("encoder.block.1.", dec + "1.EncDecAttention.k",
                                                                    dec + "1.EncDecAttention.v", "decoder.block.1."))]
    for k in same:
        torch.testing.assert_close(got[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    assert len(differ) == 20 and all(float((got[k] - plain[k]).norm() / plain[k].norm()) > 1e-3 for k in differ)
    assert torch.equal(got["decoder.final_layer_norm.weight"], pre["decoder.final_layer_norm.weight"])
