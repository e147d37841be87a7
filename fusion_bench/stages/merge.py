"""The merge stage: the configured merging method (a plain function of tensors) over theta_0 and the fine-tunes,
and the merged weights written into the run directory."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from fusion_bench.evaluation.search import affine_in_coef
from fusion_bench.merging.task_specific import TaskSpecificMerge
from fusion_bench.store import atomic_save_safetensors


class Method:
    """`method=<name>`: the merging function with its YAML's hyper-parameters, and what it asks of the pipeline
    (function attributes: requires_mode, evaluate_linearized, affine_in_scaling_coef)."""

    PIPELINE_KEYS = ("statistics", "coefficients")  # read by the stages, not passed to the function

    def __init__(self, method_cfg: DictConfig, mode: str, name: str | None = None):
        self.cfg = method_cfg
        self.fn = instantiate({k: v for k, v in method_cfg.items() if k not in self.PIPELINE_KEYS})
        self.func = getattr(self.fn, "func", self.fn)
        needs = getattr(self.func, "requires_mode", None)
        if needs and mode != needs:
            raise ValueError(f"method needs fine-tunes of finetune={needs}, got finetune={mode}")
        self.name = name or self.func.__name__
        self.chosen: dict = {}  # hyper-parameters picked on val (TALL lambdas), given to every merge
        self.inputs: dict = {}  # what the stages computed for every merge (per-task statistics)

    @property
    def evaluate_linearized(self) -> bool:
        return getattr(self.func, "evaluate_linearized", False)

    @property
    def affine(self) -> bool:
        """theta(c) = theta_0 + c * (theta(1) - theta_0): the coefficient search needs one merge (search.py)."""
        return affine_in_coef(self.fn)

    @property
    def takes_coef(self) -> bool:
        return "scaling_coef" in inspect.signature(self.fn).parameters

    def __call__(self, pretrained: dict[str, torch.Tensor], finetuned: list[dict], scaling_coef=None, **hp
                 ) -> dict[str, torch.Tensor] | TaskSpecificMerge:
        """The merge; `hp` overrides the YAML's hyper-parameters (and the ones chosen on val)."""
        if self.takes_coef:
            hp["scaling_coef"] = scaling_coef
        return self.fn(pretrained, finetuned, **{**self.inputs, **self.chosen, **hp})


def save_merge(merged: dict | TaskSpecificMerge, run_dir: Path, tasks: list[str]) -> Path:
    """merged.safetensors; a task-specific merge as task_specific.safetensors: `shared.<key>` (fp32),
    `masks.<key>` (bool, one row per task) and the metadata `tasks` and `rescalers` (JSON lists), so that task t's
    weights are theta_0 + rescalers[t] * masks.<key>[t] * shared.<key> (keys without a mask: theta_0)."""
    if not isinstance(merged, TaskSpecificMerge):
        return atomic_save_safetensors(merged, run_dir / "merged.safetensors")
    tensors = {**{f"shared.{k}": v for k, v in merged.shared.items()},
               **{f"masks.{k}": m for k, m in merged.masks.items()}}
    meta = {"tasks": json.dumps(tasks), "rescalers": json.dumps(merged.rescalers), "method": merged.method,
            "format": "theta_t = theta_0 + rescalers[t] * masks.<key>[t] * shared.<key>"}
    return atomic_save_safetensors(tensors, run_dir / "task_specific.safetensors", metadata=meta)
