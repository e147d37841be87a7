r"""MagMax (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning").

Per entry of every float key, the task vector of largest magnitude:
``tau_MagMax = tau_k`` with ``k = argmax_t |tau_t|`` (ties: the first such task), and
``theta = theta_0 + lambda * tau_MagMax``.  The paper (and its code, ``merge_max_abs``) uses a fixed
``lambda = 0.5``; here ``scaling_coef`` defaults to 0.5 and can be searched on validation.
One keys-outer pass over column chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import ONE_COEF

from .registry import merging_method
from .task_vectors import StateDict, Workspace, prepare, scalar_coef, stream_merge


@merging_method(kind="data-free", affine=True)
def magmax(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_coef: float = 0.5,
) -> dict[str, Tensor]:
    """MagMax: ``theta_0 + scaling_coef * tau_{argmax_t |tau_t|}`` per entry (see module doc)."""
    inp = prepare(pretrained, finetuned, "magmax")
    lam = scalar_coef(scaling_coef, "magmax")
    n = inp.n

    def combine(X: Tensor, key: str, s: int, e: int, ws: Workspace) -> Tensor:
        # running selection; strict ">" keeps the first task on ties (argmax + gather is ~5x slower on CPU)
        c = e - s
        best = ws.get("upd", c).copy_(X[0])
        best_abs = torch.abs(X[0], out=ws.get("best_abs", c))
        a, sel = ws.get("a", c), ws.get("sel", c, torch.bool)
        for t in range(1, n):
            torch.abs(X[t], out=a)
            torch.gt(a, best_abs, out=sel)
            torch.where(sel, X[t], best, out=best)
            torch.maximum(a, best_abs, out=best_abs)
        return best.mul_(lam)

    return stream_merge(inp, combine)

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
magmax.ranges = {"scaling_coef": ONE_COEF}
