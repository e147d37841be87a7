"""RegMean++ (Nguyen, Huu-Tien, Suzuki and Nguyen, "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging", arXiv 2508.03121, TMLR 2026).

RegMean (regmean.py) merges every linear map ``y = W x`` on its own, task ``t``'s Gram ``G_t`` made from the inputs
that fine-tune ``t`` computes itself. RegMean++ merges the network layer by layer (transformer block by block) in
forward order and makes the Grams of layer ``l`` from the *merged* network: task ``t``'s examples run through the
merged stem and merged blocks ``0 .. l-1``, then through fine-tune ``t``'s own block ``l``, and the inputs of that
block's linear maps give ``G_t^(l)``. The input of a block is the merge's (the cross-layer dependency); inside the
block each map reads what fine-tune ``t``'s block makes of it (the intra-layer one). Per map the closed form is
RegMean's (regmean.py: the same helper, fp64 ``solve``, open_clip's ``x @ proj``)::

    G~_t = a G_t + (1 - a) diag(G_t)                 (a = reduce_non_diagonal_ratio, default 0.95)
    W    = (sum_t W_t G~_t) (sum_t G~_t)^-1

Order of the merge (``layer_grams.order``, from the model family: :func:`layer_order`):

1. the stem, keys before the first block (open_clip: conv1, class / positional embedding, ln_pre; T5: the shared
   embedding): the mean of the fine-tunes, no Gram (the official code's ``merge_embedding_layer``). A T5 whose lm_head
   is tied to the shared embedding thus gets the mean there, where RegMean merges it by lm_head's Gram (the official
   code has no T5; its tables are CLIP's);
2. every block in forward order: its linear maps by the closed form over the Grams of the partial merge (asked of
   ``layer_grams`` once per block), its other floating keys (biases, norms, T5's relative attention bias) the mean;
3. the head, keys after the last block (open_clip: ln_post, proj; T5: the decoder's final norm, an untied lm_head):
   ``after_blocks="pretrained"`` (default) leaves them at theta_0, as the official code does; ``"regmean"`` continues
   step 2 (means, and ``proj`` by the closed form over the Gram of the merged network's pooled features).

Integer / bool buffers are copied from ``pretrained``; the result has the pretrained dtypes. A Gram is the mean of
``x x^T`` over the positions its map reads (fusion_bench/statistics/grams.py), as RegMean's here and as the
official hook's running mean over batch x token rows.

The official code (github.com/nthehai01/RegMean-plusplus, fusion_bench/method/regmean_plusplus, also in the reference
framework tanganke/fusion_bench; CLIP on Hugging Face's CLIPVisionModel; MergeBench holds its LLM port), which
produced the paper's tables, and what is taken from it here:

- embeddings and pre_layrnorm averaged first; the first block's inputs are those of the model with the averaged stem;
- per block and task, forward hooks on the fine-tuned block's ``nn.Linear`` modules (q, k, v, out_proj, fc1, fc2: in
  open_clip the packed in_proj_weight, out_proj, c_fc, c_proj, the same maps) while it runs on the merged model's
  hidden states of that task; the merged block (closed form for those weights, mean for the rest) then maps each
  task's hidden states to the next block's input;
- ``post_layernorm`` is never merged: the merged model keeps the pretrained one, and the visual projection is not
  part of the merged vision model at all (its fine-tunes never train it). The paper's descriptions (its abstract and
  the reference framework's page; the method section itself was not read here) speak of merging every linear layer
  and averaging the rest; the code that made its tables keeps what follows the last block at theta_0, which is the
  default here: ``after_blocks="pretrained"``. (The LLM port averages the final norm and keeps the embedding and
  lm_head at the base model's; ``"regmean"`` merges a head like the blocks.);
- defaults (config/method/regmean_plusplus/clip_regmean.yaml): 256 examples per task, batches of 32,
  reduce_non_diagonal_ratio 0.95 (also used for its RegMean baseline; the LLM port uses 0.1); the official
  ``exclude_param_names_regex`` (empty by default) is not offered;
- ``torch.inverse`` in the model dtype there, fp64 ``solve`` here (regmean.py).

How the Grams of a partial merge reach this plain function of tensors: ``layer_grams`` (:class:`LayerGrams`), which the
pipeline builds from the model family and the tasks' data (fusion_bench/stages/layer_grams.py), gives per task the
Grams of one layer's linear maps of the network at given weights; this function decides the weights (the merge so far
for the keys merged before, fine-tune ``t``'s own for the rest) and does the arithmetic. Nothing is cached: the
Grams depend on the merge. Cost: one forward per task and block, cut short after that block (about ``L / 2`` full
forwards per task for ``L`` blocks, against RegMean's one), and one copy of the network per task and block.
"""

from __future__ import annotations

import re
from collections import ChainMap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from fusion_bench.validation.ranges import choice, fraction

from .registry import merging_method
from .regmean import _merge_key
from .task_vectors import MergeInputs, StateDict, finish, prepare, statistic_keys

NAME = "regmean_plusplus"
AFTER_BLOCKS = ("pretrained", "regmean")


class Layer(NamedTuple):
    """One unit of the merge: the module whose forward computes it (``""``: the whole network) and its keys."""

    name: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class LayerOrder:
    """A network's merge-space keys in RegMean++'s order (module doc): stem, blocks in forward order, head."""

    stem: tuple[str, ...]
    blocks: tuple[Layer, ...]
    head: Layer

    @property
    def keys(self) -> list[str]:
        return [*self.stem, *(k for b in self.blocks for k in b.keys), *self.head.keys]


class LayerGrams(Protocol):
    """What the pipeline hands :func:`regmean_plusplus`: the layer order and the Grams of one layer."""

    order: LayerOrder

    def __call__(self, states: Sequence[Mapping[str, Tensor]], layer: Layer) -> Sequence[Mapping[str, Tensor]]:
        """For each task ``t``, ``{key: Gram}`` of the linear maps among ``layer.keys`` of the network at the
        merge-space weights ``states[t]``, on task ``t``'s examples (``{}`` when the layer has no linear map)."""
        ...


def layer_order(keys: Sequence[str], block: str, head: str) -> LayerOrder:
    """``keys`` (the network's parameter order) in RegMean++'s order. ``block``: a regex matched at the start of a key
    whose match (group 1 if it has one) names the key's block, e.g. ``transformer\\.resblocks\\.\\d+``; blocks are
    merged in the order they first appear in ``keys``. ``head``: a regex (matched at the start) of the keys after the
    last block. Every other key is the stem."""
    blocks: dict[str, list[str]] = {}
    stem, tail = [], []
    for key in keys:
        m = re.match(rf"(?:{block})(?=\.|$)", key)
        if m:
            blocks.setdefault(m.group(1) if m.re.groups else m.group(0), []).append(key)
        elif re.match(head, key):
            tail.append(key)
        else:
            stem.append(key)
    return LayerOrder(tuple(stem), tuple(Layer(n, tuple(ks)) for n, ks in blocks.items()), Layer("", tuple(tail)))


@merging_method(kind="statistics", statistic="layer_gram")
def regmean_plusplus(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    layer_grams: LayerGrams,
    reduce_non_diagonal_ratio: float = 0.95,
    after_blocks: str = "pretrained",
) -> dict[str, Tensor]:
    """RegMean++ merge of ``finetuned`` layer by layer, ``layer_grams`` giving the Grams of the partial merge: see the
    module doc.

    Raises ``ValueError`` for a floating key the layer order misses (or names twice, or does not know), a Gram of a
    key outside the layer asked for or of a key that is not a 2-D floating weight, and RegMean's errors (a Gram of
    the wrong size, a singular ``sum_t G~_t``), naming the key, the layer and the task.
    """
    inp = prepare(pretrained, finetuned, NAME)
    a = float(reduce_non_diagonal_ratio)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"{NAME}: reduce_non_diagonal_ratio must lie in [0, 1], got {reduce_non_diagonal_ratio}")
    if after_blocks not in AFTER_BLOCKS:
        raise ValueError(f"{NAME}: after_blocks={after_blocks!r}; expected one of {AFTER_BLOCKS}")
    order = layer_grams.order
    _check_order(inp, order)
    out: dict[str, Tensor] = {}
    for key in order.stem:
        if inp.dtypes[key].is_floating_point:
            out[key] = _mean(inp, key)
    for layer in order.blocks:
        _merge_layer(inp, layer_grams, layer, out, a)
    if after_blocks == "regmean":
        _merge_layer(inp, layer_grams, order.head, out, a)
    return finish(inp, out)  # with after_blocks="pretrained" the head keys are theta_0's (cloned)


def _check_order(inp: MergeInputs, order: LayerOrder) -> None:
    seen: set[str] = set()
    for key in order.keys:
        if key in seen:
            raise ValueError(f"{NAME}: the layer order names {key!r} twice")
        if key not in inp.dtypes:
            raise ValueError(f"{NAME}: the layer order names {key!r}, which is not a key of the pretrained weights")
        seen.add(key)
    missing = [k for k in inp.float_keys if k not in seen]
    if missing:
        raise ValueError(f"{NAME}: the floating key {missing[0]!r} is in no layer of the layer order (stem, "
                         f"blocks, head); the model family's layer order must cover every merged key")


def _mean(inp: MergeInputs, key: str) -> Tensor:
    acc = inp.finetuned[0][key].to(torch.float32, copy=True)
    for ft in inp.finetuned[1:]:
        acc.add_(ft[key])
    return acc.div_(inp.n).to(inp.dtypes[key])


def _merge_layer(inp: MergeInputs, layer_grams: LayerGrams, layer: Layer, out: dict[str, Tensor], a: float) -> None:
    """Merge one layer into ``out`` (which holds every earlier layer's merged keys)."""
    floats = [k for k in layer.keys if inp.dtypes[k].is_floating_point]
    if any(len(inp.shapes[k]) == 2 for k in floats):  # a layer without 2-D weights has no linear map to ask about
        states = [ChainMap(out, ft) for ft in inp.finetuned]  # merged so far, task t's own from this layer on
        grams = list(layer_grams(states, layer))
    else:
        grams = [{} for _ in inp.finetuned]
    where = f"layer {layer.name or '(head)'!r}"
    for key in statistic_keys(inp, grams, f"{NAME} ({where})", "Gram"):
        if key not in layer.keys:
            raise ValueError(f"{NAME}: the Grams of {where} hold {key!r}, which is not one of its keys")
        if len(inp.shapes[key]) != 2:
            raise ValueError(f"{NAME}: a Gram was given for {key!r}, which is not a 2-D float weight "
                             f"({tuple(inp.shapes[key])})")
    for key in floats:
        if key in grams[0]:
            out[key] = _merge_key(key, inp.pretrained[key], [ft[key] for ft in inp.finetuned],
                                  [g[key] for g in grams], a, inp.names)
        else:
            out[key] = _mean(inp, key)


# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
regmean_plusplus.ranges = {
    "reduce_non_diagonal_ratio": fraction(note="the weight of the off-diagonal Gram entries"),
    "after_blocks": choice(*AFTER_BLOCKS),
}
