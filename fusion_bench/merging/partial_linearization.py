"""Partial linearization (Tang et al., 2024, L-LoRA): task arithmetic over LoRA adapters that were fine-tuned
linearized (finetune=l_lora), with the merged adapters evaluated *through the linearized model*
f(x; W0, phi0) + J_phi (phi_merged - phi0), where task vectors add exactly (the output is affine in phi).

The merge itself is task arithmetic; its declaration (fusion_bench/merging/registry.py) tells the pipeline which
fine-tunes it needs (modes: the `requires_mode` attribute) and how to evaluate the result (linearized:
`evaluate_linearized`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from fusion_bench.validation.ranges import PER_TASK_COEF

from .registry import merging_method


@merging_method(kind="data-free", affine=True, modes=("l_lora",), linearized=True)
def partial_linearization(
    pretrained: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    scaling_coef: float | Sequence[float] = 0.3,
) -> dict[str, Tensor]:
    """``phi_0 + sum_t lambda_t (phi_t - phi_0)`` over L-LoRA adapter parameters."""
    from fusion_bench.merging.task_arithmetic import task_arithmetic

    return task_arithmetic(pretrained, finetuned, scaling_coef=scaling_coef)


# What each setting must be, checked with the rest of the config before any work (fusion_bench/validation).
partial_linearization.ranges = {"scaling_coef": PER_TASK_COEF}
