"""Task arithmetic (Ilharco et al., 2023): ``theta = theta_0 + sum_t lambda_t tau_t``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusion_bench.validation.ranges import PER_TASK_COEF

from .registry import merging_method
from .task_vectors import (
    MergeInputs,
    StateDict,
    Transform,
    Workspace,
    prepare,
    scaling_coefs,
    stream_merge,
)


@merging_method(kind="data-free", affine=True)
def task_arithmetic(
    pretrained: StateDict,
    finetuned: Sequence[StateDict],
    scaling_coef: float | Sequence[float] = 0.3,
) -> dict[str, Tensor]:
    """``theta_0 + sum_t lambda_t (theta_t - theta_0)`` in fp32, cast back to the pretrained dtype.

    ``scaling_coef``: one float for every task, or a list with one float per task
    (a negative value negates that task: task forgetting).
    """
    inp = prepare(pretrained, finetuned, "task_arithmetic")
    coefs = scaling_coefs(scaling_coef, inp.n, "task_arithmetic")
    return weighted_sum_merge(inp, coefs)


def weighted_sum_merge(
    inp: MergeInputs, coefs: Sequence[float], transform: Transform | None = None
) -> dict[str, Tensor]:
    """``theta_0 + sum_t coefs[t] * transform(tau)_t`` in one keys-outer pass."""
    lam = torch.tensor([float(c) for c in coefs], dtype=torch.float32)

    def combine(X: Tensor, key: str, s: int, e: int, ws: Workspace) -> Tensor:
        return torch.mv(X.t(), lam, out=ws.get("upd", e - s))

    return stream_merge(inp, combine, transform)

# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
task_arithmetic.ranges = {"scaling_coef": PER_TASK_COEF}
