"""Simple weight averaging: ``theta = mean_t theta_t`` (model soup over the task fine-tunes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import task_vectors as tv
from .registry import merging_method
from .task_vectors import StateDict, Workspace, as_fp32, chunks, finish, flat, prepare


@merging_method(kind="data-free")
def weight_average(pretrained: StateDict, finetuned: Sequence[StateDict]) -> dict[str, Tensor]:
    """Mean of the finetuned weights, computed in fp32, returned in the pretrained dtypes.

    ``pretrained`` supplies the key order, the output dtypes and the non-float buffers (copied).
    There is no ``scaling_coef``: nothing to search.
    """
    inp = prepare(pretrained, finetuned, "weight_average")
    ws = Workspace()
    out: dict[str, Tensor] = {}
    for key in inp.float_keys:
        o = torch.empty(inp.shapes[key], dtype=inp.dtypes[key])
        of = o.view(-1)
        fts = [flat(ft[key]) for ft in inp.finetuned]
        for s, e in chunks(inp.numels[key], tv.CHUNK):
            acc = ws.get("acc", e - s).copy_(fts[0][s:e])
            for ft in fts[1:]:
                acc.add_(as_fp32(ft[s:e], ws, "ft"))
            acc.div_(inp.n)
            of[s:e].copy_(acc)
        out[key] = o
    return finish(inp, out)
