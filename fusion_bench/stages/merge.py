"""The merge stage: the configured merging method (a plain function of tensors) over theta_0 and the fine-tunes,
and the merged weights written into the run directory."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from fusion_bench.errors import ConfigError
from fusion_bench.evaluation.search import affine_in_coef
from fusion_bench.export.files import new_file
from fusion_bench.export.task_specific import write_task_specific
from fusion_bench.merging.svc import svc_calibrate, svc_options, svc_refusal
from fusion_bench.merging.task_specific import TaskSpecificMerge
from fusion_bench.stages.coefficients.task_coefs import scaled


class Method:
    """`method=<name>`: the merging function with its YAML's hyper-parameters, and what it asks of the pipeline
    (function attributes: requires_mode, evaluate_linearized, affine_in_scaling_coef). `method.svc` (post=svc):
    every merge is followed by SVC, singular value calibration (fusion_bench/merging/svc.py)."""

    PIPELINE_KEYS = ("statistics", "coefficients", "task_coefs", "svc")  # read by the stages, not passed to the function

    def __init__(self, method_cfg: DictConfig, mode: str, name: str | None = None, linearized: bool = False):
        """`linearized`: evaluate every merge through the linearized model (finetune.evaluate=linearized, l_lora);
        method=partial_linearization always does."""
        self.cfg = method_cfg
        self._linearized = linearized
        self.fn = instantiate({k: v for k, v in method_cfg.items() if k not in self.PIPELINE_KEYS})
        self.func = getattr(self.fn, "func", self.fn)
        needs = getattr(self.func, "requires_mode", None)
        if needs and mode != needs:
            raise ConfigError(f"method {getattr(self.func, '__name__', name)} needs fine-tunes of finetune={needs}, "
                              f"got finetune={mode}")
        self.name = name or self.func.__name__
        self.svc = svc_options(method_cfg.get("svc"), self.func)  # None, or svc_calibrate's settings
        self.chosen: dict = {}  # hyper-parameters picked on val (TALL lambdas), given to every merge
        self.inputs: dict = {}  # what the stages computed for every merge (per-task statistics)
        self.task_weights: list[float] | None = None  # method.task_coefs in task order (stages/coefficients/task_coefs.py)

    @property
    def evaluate_linearized(self) -> bool:
        return self._linearized or getattr(self.func, "evaluate_linearized", False)

    @property
    def affine(self) -> bool:
        """theta(c) = theta_0 + c * (theta(1) - theta_0): the coefficient search needs one merge (search.py). SVC is
        not affine in c (merging/svc.py): with method.svc the search merges and calibrates at every c."""
        return affine_in_coef(self.fn) and self.svc is None

    @property
    def takes_coef(self) -> bool:
        return "scaling_coef" in inspect.signature(self.fn).parameters

    def __call__(self, pretrained: dict[str, torch.Tensor], finetuned: list[dict], scaling_coef=None, **hp
                 ) -> dict[str, torch.Tensor] | TaskSpecificMerge:
        """The merge; `hp` overrides the YAML's hyper-parameters (and the ones chosen on val)."""
        if self.takes_coef:
            hp["scaling_coef"] = scaled(scaling_coef, self.task_weights)
        merged = self.fn(pretrained, finetuned, **{**self.inputs, **self.chosen, **hp})
        if self.svc is not None:
            merged = svc_calibrate(pretrained, finetuned, merged, **self.svc)
        return merged


def check_svc(cfg: DictConfig) -> None:
    """`method.svc` (post=svc): refused before any work where SVC cannot follow the method in this run (a
    task-specific method, learnt coefficients, a merge space of LoRA adapters; fusion_bench/merging/svc.py)."""
    from hydra.utils import get_method

    from fusion_bench.export import merges_adapters

    if cfg.stage == "finetune" or cfg.method.get("svc") is None:
        return
    strategies = [(OmegaConf.select(cfg, p) or {}).get("strategy", "grid") for p in ("coefficients", "method.coefficients")]
    why = svc_refusal(get_method(cfg.method._target_), adapters=merges_adapters(cfg.finetune),
                      strategy=next((s for s in strategies if s != "grid"), "grid"))
    if why is not None:
        raise ConfigError(f"method.svc: {why}; drop method.svc (post=svc)")


def save_merge(merged: dict | TaskSpecificMerge, run_dir: Path, tasks: list[str]) -> Path:
    """merged.safetensors (merge-space names); a task-specific merge as task_specific.safetensors: shared weights,
    bit-packed per-task masks and rescalers (fusion_bench.export.task_specific, whose `load_task_weights` gives
    task t's weights back). Neither overwrites an existing file."""
    if isinstance(merged, TaskSpecificMerge):
        return write_task_specific(merged, run_dir / "task_specific.safetensors", tasks)
    state = {k: v.detach().contiguous() for k, v in merged.items()}
    return new_file(run_dir / "merged.safetensors", lambda tmp: save_file(state, tmp))
