"""RegMean++'s statistics (method.statistics.kind=layer_gram): the input Grams of one layer's linear maps of the
network at given weights, on each task's training examples, asked for by the merge layer by layer
(fusion_bench/merging/regmean_pp.py). They depend on the partial merge, so, unlike RegMean's, nothing is stored: the
statistics stage hands the merge a :class:`NetworkLayerGrams` over the family's network and the tasks' batches.

Per call and task: the network at the weights the merge gives (``model_at``, the family's ``model_with``), the task's
batches run through it with hooks on the layer's linear maps (the family's ``grams``: the same Grams as RegMean's,
means over the positions each map reads, padding excluded for T5), the forward cut short after the layer's module.
The batches are drawn once per task (seeded, without replacement) and kept on the evaluation device for every layer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from fusion_bench.errors import ConfigError
from fusion_bench.families.base import ModelFamily
from fusion_bench.merging.regmean_pp import Layer, LayerOrder
from fusion_bench.statistics.grams import linear_map_keys

log = logging.getLogger(__name__)

#: grams(model, batches, keys, stop_after) -> {key: Gram} of the maps `keys` (the family's `grams`)
Grams = Callable[[nn.Module, list, list[str], nn.Module | None], Mapping[str, Tensor]]


class NetworkLayerGrams:
    """:class:`fusion_bench.merging.regmean_pp.LayerGrams` over a network: ``model_at(state)`` builds it at merge-space
    weights, ``grams`` computes the Grams of some of its maps, ``batches[t]`` are task ``t``'s examples."""

    def __init__(self, order: LayerOrder, model_at: Callable[[dict[str, Tensor]], nn.Module], grams: Grams,
                 batches: Sequence[list], linear_keys: Sequence[str]):
        self.order = order
        self.model_at = model_at
        self.grams = grams
        self.batches = list(batches)
        self.linear_keys = set(linear_keys)

    def __call__(self, states: Sequence[Mapping[str, Tensor]], layer: Layer) -> list[dict[str, Tensor]]:
        if len(states) != len(self.batches):
            raise ValueError(f"layer Grams: {len(states)} weight sets for {len(self.batches)} tasks' batches")
        keys = [k for k in layer.keys if k in self.linear_keys]
        if not keys:
            return [{} for _ in states]
        t0, out = time.perf_counter(), []
        for state, batches in zip(states, self.batches):
            model = self.model_at(dict(state))
            stop = model.get_submodule(layer.name) if layer.name else None
            out.append({k: v.detach().float() for k, v in self.grams(model, batches, keys, stop).items()})
            del model
        log.info("RegMean++ Grams of %s (%d maps, %d tasks) in %.1f s", layer.name or "the head", len(keys),
                 len(states), time.perf_counter() - t0)
        return out


def check(fam: ModelFamily, who: str) -> None:
    """Stop before any work when the family gives no layer order (RegMean++ merges block by block)."""
    try:
        fam.regmean_layers(list(fam.pretrained_state))
    except NotImplementedError as e:
        raise ConfigError(f"{who} merges block by block, but model={fam.cfg.model.name} declares no layer order: "
                          f"{e}") from e


def layer_grams(fam: ModelFamily, tasks: list[str], s: dict) -> NetworkLayerGrams:
    """The family's network and every task's `s["num_samples"]` training examples (seed `s["seed"]`, batches of
    `s["batch_size"]`) on the evaluation device."""
    device = fam.eval_where["device"]

    def to_device(x: Any) -> Any:
        return x.to(device) if isinstance(x, torch.Tensor) else x

    batches = [tree_map(to_device, fam.batches(t, "train", int(s["num_samples"]), int(s["seed"]),
                                               int(s["batch_size"]))) for t in tasks]
    pre = fam.pretrained_state
    linear = linear_map_keys(fam.model_with(dict(pre)))
    return NetworkLayerGrams(
        fam.regmean_layers(list(pre)),
        model_at=lambda state: fam.model_with(state).to(device),
        grams=lambda model, b, keys, stop: fam.grams(model, b, keys=keys, stop_after=stop),
        batches=batches, linear_keys=[k for k in linear if k in pre])
