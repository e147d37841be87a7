r"""EMR merging (Huang et al., NeurIPS 2024, "EMR-Merging: Tuning-Free High-Performance Model Merging").

Elect, Mask & Rescale, per entry of every float key (``tau_t = theta_t - theta_0``):

* elect: ``gamma = sign(sum_t tau_t)``, a zero sum counting as ``-1`` (the reference code's
  ``(sum > 0) * 2 - 1``);
* unified vector: ``tau_uni = gamma * max_t(|tau_t| * 1[tau_t gamma > 0])`` (the largest magnitude
  among the tasks that agree with the elected sign; 0 where none agrees);
* task masks: ``M_t = 1[tau_t gamma > 0]``;
* rescalers: ``l_t = sum_keys mean|tau_t| / sum_keys mean|M_t * tau_uni|`` -- sums over keys of
  per-key means, as the reference code does (not one mean over all parameters).  A task whose
  denominator is 0 (its mask selects no non-zero entry of ``tau_uni``) gets ``l_t = 1``: its
  weights are ``theta_0`` whatever ``l_t`` is.

Task ``t`` uses ``theta_0 + l_t * M_t * tau_uni``.  No hyper-parameters.  Task-specific: the
result is a :class:`~fusion_bench.merging.task_specific.TaskSpecificMerge` (``tau_uni`` in fp32,
the masks as bool, the rescalers), built in one keys-outer pass over column chunks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .registry import merging_method
from .task_specific import TaskSpecificMerge
from .task_vectors import StateDict, Workspace, prepare, stream_blocks

log = logging.getLogger(__name__)


@merging_method("emr", kind="task-specific")
def emr_merging(pretrained: StateDict, finetuned: Sequence[StateDict]) -> TaskSpecificMerge:
    """EMR merging (see module doc): shared ``tau_uni``, per-task masks ``M_t`` and rescalers ``l_t``."""
    inp = prepare(pretrained, finetuned, "emr_merging")
    n = inp.n
    shared = {key: torch.empty(inp.shapes[key], dtype=torch.float32) for key in inp.float_keys}
    masks = {key: torch.empty((n, *inp.shapes[key]), dtype=torch.bool) for key in inp.float_keys}
    # per task and key: mean|tau_t| and mean|M_t * tau_uni| (fp64); summed over keys by math.fsum
    # (exactly rounded, so the rescalers do not depend on the key order of the checkpoint files)
    num: list[list[float]] = [[] for _ in range(n)]
    den: list[list[float]] = [[] for _ in range(n)]
    key_num = torch.zeros(n, dtype=torch.float64)
    key_den = torch.zeros(n, dtype=torch.float64)
    current: list[str | None] = [None]
    ws = Workspace()

    def close_key() -> None:
        key = current[0]
        if key is not None:
            m = inp.numels[key]
            for t, (a, b) in enumerate(zip((key_num / m).tolist(), (key_den / m).tolist())):
                num[t].append(a)
                den[t].append(b)
            key_num.zero_()
            key_den.zero_()

    def visit(X: Tensor, key: str, s: int, e: int, p32: Tensor) -> None:
        if key != current[0]:
            close_key()
            current[0] = key
        c = e - s
        S = torch.sum(X, 0, out=ws.get("S", c))
        g = torch.gt(S, 0.0, out=ws.get("gt", c, torch.bool))
        gamma = torch.mul(g, 2.0, out=S).sub_(1.0)  # +1 where sum > 0, else -1
        X.mul_(gamma)  # tau_t * gamma
        key_num.add_(torch.sum(torch.abs(X, out=ws.block("A", n, c)), 1, dtype=torch.float64))
        Mflat = masks[key].view(n, -1)[:, s:e]
        torch.gt(X, 0.0, out=ws.block("M", n, c, torch.bool))
        Mflat.copy_(ws.block("M", n, c, torch.bool))
        X.clamp_(min=0.0)  # |tau_t| * 1[tau_t gamma > 0]
        U = torch.amax(X, 0, out=ws.get("U", c))  # |tau_uni|
        X.sign_()  # M_t as 0/1 floats
        key_den.add_(torch.mv(X, U).double())
        torch.mul(U, gamma, out=shared[key].view(-1)[s:e])

    stream_blocks(inp, visit)
    close_key()
    sums = [(math.fsum(a), math.fsum(b)) for a, b in zip(num, den)]
    rescalers = [a / b if b > 0 else 1.0 for a, b in sums]
    log.info("emr_merging: rescalers %s", ", ".join(f"{r:.4f}" for r in rescalers))
    return TaskSpecificMerge(
        pretrained=inp.pretrained,
        shared=shared,
        masks=masks,
        rescalers=rescalers,
        method="emr_merging",
        rescaler_bits=32,
        keys=list(inp.keys),
    )
