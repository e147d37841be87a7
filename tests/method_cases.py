"""Every method of the table (fusion_bench/merging/registry.py) called as the pipeline calls it: conf/method/<name>.yaml
composed by Hydra, the pipeline's keys left out, what the pipeline chooses on val ("search") at the function's
default, small synthetic statistics for the statistics methods. Shared by tests/test_search.py (affinity) and
tests/test_method_table.py (imported as `method_cases`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fusion_bench.merging.registry import STATISTICS, methods
from fusion_bench.stages.merge import Method

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SKIP = ("_target_", "_partial_", *Method.PIPELINE_KEYS)


EXTRA_CONF: list[str] = []  # more config dirs (hydra.searchpath), for methods declared by a test


def compose_overrides(*overrides: str) -> list[str]:
    extra = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in EXTRA_CONF)}]"] if EXTRA_CONF else []
    return [*overrides, *extra]


@functools.cache
def _method_config(name: str, searchpath: tuple[str, ...]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=compose_overrides(f"method={name}")).method)


def method_config(name: str) -> dict:
    """method=<name> composed as the pipeline composes it (defaults lists followed), as a plain dict."""
    return _method_config(name, tuple(EXTRA_CONF))


def settings(name: str, **over) -> dict:
    """The YAML's settings the function takes; "search" (chosen on val by the pipeline) -> the function's default."""
    params = inspect.signature(methods()[name].function).parameters
    out = {k: params[k].default if v == "search" else v for k, v in method_config(name).items() if k not in SKIP}
    return {**out, **over}


# open_clip-like names: WUDI's keys=official optimises the two block linear maps
KEYS_2D = {"blocks.0.attn.in_proj_weight": (12, 8), "blocks.0.mlp.c_fc.weight": (10, 8), "proj": (8, 6)}
KEYS_1D = {"blocks.0.attn.in_proj_bias": (12,), "ln.weight": (8,)}


def states(n: int = 3, seed: int = 0, small: float = 0.3):
    """theta_0 and n fine-tunes whose task vectors share a direction: tau_t = shared + small * noise_t (fp32),
    and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    shapes = {**KEYS_2D, **KEYS_1D}
    pre = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    pre["steps"] = torch.tensor(7)
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{**{k: pre[k] + shared[k] + small * torch.randn(s, generator=g) for k, s in shapes.items()},
            "steps": pre["steps"]} for _ in range(n)]
    return pre, fts


class FixedLayerGrams:
    """RegMean++'s layer Grams (layer_gram) that do not depend on the weights: the synthetic Grams of `statistics`,
    each layer's own; the layer order of the keys of `states` (block blocks.0, head proj)."""

    def __init__(self, grams: list[dict[str, torch.Tensor]]):
        from fusion_bench.merging.regmean_pp import layer_order

        self.grams = grams
        self.order = layer_order([*KEYS_2D, *KEYS_1D, "steps"], block=r"blocks\.\d+", head=r"proj$")

    def __call__(self, states, layer):
        return [{k: g[k] for k in layer.keys if k in g} for g in self.grams]


def statistics(statistic: str, n: int, seed: int = 1):
    """Per task, a Gram matrix of inputs (gram: [in, in] of each 2-D map, open_clip's x @ proj: [rows, rows]) or a
    positive diagonal Fisher (fisher: the weight's shape); for layer_gram (RegMean++) those Grams layer by layer."""
    if statistic == "layer_gram":
        return FixedLayerGrams(statistics("gram", n, seed))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if statistic == "gram":
            stat = {}
            for k, (rows, cols) in KEYS_2D.items():
                size = rows if k == "proj" else cols
                x = torch.randn(4 * size, size, generator=g)
                stat[k] = x.T @ x / len(x)
        else:
            stat = {k: torch.rand(s, generator=g) + 0.1 for k, s in {**KEYS_2D, **KEYS_1D}.items()}
        out.append(stat)
    return out


def merge(name: str, pre, fts, **over):
    """The merge of method=<name> (its YAML's settings, `over` on top) as the pipeline runs it."""
    spec = methods()[name]
    kw = settings(name, **over)
    if spec.statistic is not None:
        kw[STATISTICS[spec.statistic]] = statistics(spec.statistic, len(fts))
    return spec.function(pre, fts, **kw)


def line_gap(name: str, pre, fts, c, at_one=1.0, **over) -> float:
    """max over keys of ||merge(c) - (theta_0 + c (merge(at_one) - theta_0))|| / ||theta_0 + c (...)||, in float64,
    where merge(x) has scaling_coef = x (`at_one` a list: one per task, and merge(c) then gets c * at_one)."""
    one = merge(name, pre, fts, scaling_coef=at_one, **over)
    at_c = [c * a for a in at_one] if isinstance(at_one, list) else c * at_one
    got = merge(name, pre, fts, scaling_coef=at_c, **over)
    gap = 0.0
    for k, v in pre.items():
        if not v.is_floating_point():
            assert torch.equal(got[k], v), k
            continue
        want = v.double() + c * (one[k].double() - v.double())
        gap = max(gap, float((got[k].double() - want).norm() / want.norm()))
    return gap


def moved(name: str, pre, fts, **over) -> bool:
    """Whether merge(scaling_coef=1) moved away from theta_0 (an affinity check on theta_0 alone proves nothing)."""
    one = merge(name, pre, fts, scaling_coef=1.0, **over)
    return any(not torch.equal(one[k], v) for k, v in pre.items() if v.is_floating_point())
