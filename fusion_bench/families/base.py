"""What every model family shares: the checkpoint store and its keys, the fine-tuning mode around the family's
network, theta_0 in merge space, and where evaluation runs.

A family (fusion_bench.clip.family, fusion_bench.t5.family) adds what only it knows: how to build its network
and tasks, accuracy on a task, how to fine-tune, and the forward passes that statistics and coefficient learning
differentiate. The stages (fusion_bench.stages) take a family and never look inside the model themselves.
"""

from __future__ import annotations

import copy
import json
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusion_bench import keys
from fusion_bench.devices import eval_device
from fusion_bench.errors import ConfigError
from fusion_bench.models import modes as clip_modes
from fusion_bench.store import CheckpointStore, read_metadata

ANALYSES = ("cosine", "disentanglement", "num_tasks", "negation", "kernel", "heads", "loss_landscape", "pairwise")


def validate_common(cfg: DictConfig, known: list[str], analyses: tuple[str, ...] = ("cosine", "num_tasks")) -> None:
    """The config errors every family shares that need more than an option's range (those are checked before, by
    fusion_bench.validation.check); the run-level ones are fusion_bench.pipeline.validate_config's."""
    if cfg.stage == "analyze" and not cfg.get("analysis"):
        raise ConfigError("stage=analyze needs analysis=<name>, one of conf/analysis/: cosine, disentanglement, "
                          "num_tasks, negation, kernel, heads, loss_landscape, pairwise")
    tasks = list(cfg.taskpool.tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(f"taskpool.tasks={tasks}: unknown task(s) {unknown}; {cfg.taskpool.name} has {known}")
    if cfg.stage == "analyze" and cfg.analysis.kind not in analyses:
        raise ConfigError(f"analysis={cfg.analysis.kind} is not available for model={cfg.model.name}: use "
                          + " or ".join(f"analysis={a}" for a in analyses))
    eval_device(cfg.trainer)  # trainer=gpu on a machine without CUDA


class ModelFamily:
    """A model family over one resolved config. Everything is built lazily, once."""

    # What a family offers, declared by each family (a new one inherits no other family's behaviour):
    modes: ClassVar[Any]  # required: build_mode_model / trainable_state / to_merge_space / eval_model / reload
    fast_search: ClassVar[bool] = False  # True: accuracy is an argmax over head logits, `grid_accuracies` exists
    analyses: ClassVar[tuple[str, ...]] = ("cosine", "num_tasks")  # stage=analyze kinds it supports (of ANALYSES)
    output_formats: ClassVar[tuple[str, ...]] = ("safetensors",)  # the output.format values (fusion_bench.export)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "modes", None) is None:
            raise TypeError(f"{cls.__name__} declares no fine-tuning modes: set the class attribute `modes` to a "
                            f"module or object with build_mode_model, trainable_state, to_merge_space, eval_model "
                            f"(fusion_bench/models/modes.py is CLIP's, fusion_bench/t5/modes.py T5's)")
        unknown = set(cls.analyses) - set(ANALYSES)
        if unknown:
            raise TypeError(f"{cls.__name__}.analyses names unknown analyses {sorted(unknown)}; known: {ANALYSES}")

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        raise NotImplementedError

    # ---- what a family must give ----------------------------------------------------------------------------
    @property
    def encoder(self) -> nn.Module:
        """The pretrained network that fine-tuning modes wrap (never modified)."""
        raise NotImplementedError

    @property
    def tasks(self) -> dict:
        raise NotImplementedError

    def acc(self, model: nn.Module, task: str, split: str) -> float:
        raise NotImplementedError

    def train(self, task: str, module: nn.Module, work_dir: Path) -> float:
        """Fine-tune `module` in place on the task; returns seconds per step."""
        raise NotImplementedError

    # ---- what a family may change ---------------------------------------------------------------------------
    def key_extras(self, task: str) -> dict:
        """Family-specific fields of a fine-tune's store key."""
        return {}

    def imported(self, task: str) -> Path | None:
        """A fine-tune given from outside the store (finetuned_from), if the family supports that."""
        return None

    def import_finetune(self, source: Path, task: str) -> dict[str, torch.Tensor]:
        """The user's fine-tune of `task` in `source`, read and checked (readable, keys, shapes, finite) as the store
        keeps it; a family whose `imported` gives files implements it."""
        raise NotImplementedError(f"{type(self).__name__} imports no fine-tunes (finetuned_from)")

    def report_extras(self) -> dict:
        return {}

    def pop_trained_head(self, task: str) -> torch.Tensor | None:
        """The head trained with the fine-tune just made (finetune.train_head), for the store; None: heads frozen."""
        return None

    def finetune_command(self, task: str) -> str:
        """The command that makes the fine-tune of `task` this run wants."""
        cfg = self.cfg
        head = " finetune.train_head=true" if self.mode_cfg.get("train_head") else ""
        return (f"python run.py stage=finetune model={cfg.model.name} taskpool={cfg.taskpool.name} "
                f"taskpool.tasks=[{task}] finetune={self.mode} seed={cfg.seed}{head}")

    def eval_key_extras(self) -> dict:
        """Family-specific fields the cached reference accuracies depend on."""
        return {}

    def accuracies(self, runs: list[tuple[nn.Module, str, str]]) -> list[float]:
        """Accuracy of each (model, task, split)."""
        return [self.acc(*r) for r in runs]

    def grid_accuracies(self, line, tasks: list[str], split: str) -> list[list[float]]:
        """acc[i][j]: accuracy on tasks[i] of the merge at line.grid[j] in one pass (fast_search families only)."""
        raise NotImplementedError(f"{type(self).__name__} has no one-pass coefficient grid (fast_search = False): "
                                  f"the search merges and evaluates at each coefficient")

    # ---- what the export stage asks of a family (fusion_bench.export, output.format) --------------------------
    @classmethod
    def check_output(cls, cfg: DictConfig, fmt: str, adapters: bool) -> None:
        """Raise fusion_bench.export.OutputError, before anything trains, when this family cannot write `fmt`
        (with `adapters`: merged LoRA adapters as a peft folder) for this config."""
        from fusion_bench.export import OutputError

        if adapters:
            raise OutputError(f"output.adapters=true: model={cfg.model.name} writes no peft adapter folders")

    def write_merged(self, merged: dict[str, torch.Tensor], fmt: str, out: Path, linearized: bool = False,
                     adapters: bool = False) -> Path:
        """The model at merge-space weights `merged` written at `out` (which must not exist) in format `fmt`, one of
        `output_formats` other than safetensors (the export stage writes that one itself)."""
        raise NotImplementedError(f"{type(self).__name__} writes no output.format={fmt}")

    def plain_model(self, merged: dict[str, torch.Tensor], linearized: bool = False) -> nn.Module:
        """The family's own network, without a fine-tuning-mode wrapper, at merge-space weights: LoRA adapters are
        folded into W0 + (alpha/r) B A (over the base the adapters were trained on), exactly what evaluation
        computes. What the export formats write; a linearized model has no such network."""
        from fusion_bench.export import OutputError
        from fusion_bench.models.lora import merged_weights

        if linearized or self.mode == "linear":
            raise OutputError(f"finetune={self.mode}{' (evaluated linearized)' if linearized else ''}: a linearized "
                              "model f(x; theta_0) + J (theta - theta_0) is no plain network; use output.format="
                              "safetensors")
        weights = merged_weights(self.base, merged) if self.merges_adapters else merged
        module = copy.deepcopy(self.encoder)
        params = dict(module.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise KeyError(f"{type(self.encoder).__name__} has no parameters {unknown[:5]} (merge of finetune="
                           f"{self.mode})")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].dtype))
        return module.requires_grad_(False).eval()

    # ---- what statistics and coefficient learning ask of a family (fusion_bench.stages) -------------------
    fisher_targets: ClassVar[tuple[str, ...]] = ("sample", "label", "expected")  # statistics/fisher.py

    def batches(self, task: str, split: str, n: int | None, seed: int, batch_size: int) -> list[tuple[Any, Any]]:
        """(inputs, labels) batches of n examples of the split drawn without replacement (seeded); all with None."""
        raise NotImplementedError(f"{type(self).__name__} gives no batches of its tasks' data")

    def grams(self, model: nn.Module, batches: list, norm_scales: bool = False, keys: list[str] | None = None,
              stop_after: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Input Gram matrix of every linear map of `model` (fusion_bench.statistics.input_grams); with
        `norm_scales` also each normalisation scale's mean of x_hat^2 (LOT Merging). `keys`: only those maps;
        `stop_after`: each batch's forward is cut short after that module (RegMean++: one block at a time)."""
        raise NotImplementedError(f"{type(self).__name__} computes no Gram matrices")

    def regmean_layers(self, keys: list[str]) -> Any:
        """The merge-space `keys` in RegMean++'s order (a fusion_bench.merging.regmean_pp.LayerOrder: stem, the
        blocks in forward order, head), named like the modules of `model_with`'s network."""
        raise NotImplementedError(f"{type(self).__name__} gives no layer order (regmean_layers)")

    def fisher(self, model: nn.Module, task: str, batches: list, target: str, seed: int,
               keys: list[str]) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of the parameters `keys` of `model` (fusion_bench.statistics.diagonal_fisher)."""
        raise NotImplementedError(f"{type(self).__name__} computes no Fisher information")

    def loss(self, model: nn.Module, task: str, batch) -> torch.Tensor:
        """Mean cross-entropy of `model` on a labelled batch of the task (LoraHub's objective)."""
        raise NotImplementedError(f"{type(self).__name__} has no loss for LoraHub")

    def logits_at(self, model: nn.Module, weights: dict[str, torch.Tensor], task: str, inputs) -> torch.Tensor:
        """The task's logits [B, C] of `model` run at merge-space `weights`, differentiable in them (AdaMerging)."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable classifier for AdaMerging")

    def require_split(self, tasks: list[str], split: str, who: str) -> None:
        """Stop before any work when a task has no (or an empty) `split`; `who` says what needs it."""
        for task in tasks:
            try:
                n = len(self.tasks[task].split(split))
            except (FileNotFoundError, KeyError, ValueError) as e:
                raise ConfigError(f"{who} needs the {split} split of task {task!r}, which taskpool="
                                  f"{self.cfg.taskpool.name} cannot give: {e}") from e
            if n == 0:
                raise ConfigError(f"{who}: the {split} split of task {task!r} is empty")

    @property
    def merges_plain_weights(self) -> bool:
        """Task vectors over the network's own parameters, evaluated as the plain network: what a Gram matrix,
        a Fisher or a functional forward at merged weights is defined on."""
        ft = self.mode_cfg
        return ft.mode in ("standard", "attention", "linear_layers") or (
            ft.mode == "lora" and ft.get("task_vector", "delta_w") == "delta_w")

    @property
    def merges_adapters(self) -> bool:
        """Task vectors over LoRA adapters (l_lora, or lora with finetune.task_vector=adapters): LoraHub's space."""
        ft = self.mode_cfg
        return ft.mode == "l_lora" or (ft.mode == "lora" and ft.get("task_vector", "delta_w") == "adapters")

    # ---- shared ---------------------------------------------------------------------------------------------
    @cached_property
    def store(self) -> CheckpointStore:
        return CheckpointStore(self.cfg.paths.store)

    @property
    def mode(self) -> str:
        return str(self.cfg.finetune.mode)

    @property
    def mode_cfg(self) -> DictConfig:
        return self.cfg.finetune

    @cached_property
    def base(self) -> nn.Module:
        """The mode model at the pretrained weights (theta_0 of the trainable parameters)."""
        return self.modes.build_mode_model(self.mode_cfg, self.encoder)

    def trainable_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.modes.trainable_state(module)

    @cached_property
    def pretrained_trainable(self) -> dict[str, torch.Tensor]:
        """theta_0 of the trainable parameters (what the store keeps): views of the encoder's own weights where the
        mode trains them as they are, else from the mode model at the pretrained weights."""
        views = self.modes.pretrained_trainable(self.mode_cfg, self.encoder)
        return views if views is not None else self.trainable_state(self.base)

    @cached_property
    def pretrained_state(self) -> dict[str, torch.Tensor]:
        """theta_0 in the space task vectors live in."""
        return self.modes.to_merge_space(self.mode_cfg, self.encoder, self.pretrained_trainable)

    def to_merge_space(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.modes.to_merge_space(self.mode_cfg, self.encoder, stored)

    @cached_property
    def fingerprint(self) -> str:
        """A hash of every pretrained weight a fine-tune starts from: the whole network and the mode's trainable
        start (for LoRA modes the adapters' init, which does not depend on W0). Part of the store key, and stored
        with each fine-tune to catch foreign task vectors."""
        return keys.fingerprint(self.encoder.state_dict(), self.pretrained_trainable)

    def checkpoint(self, task: str) -> Path:
        """Where the fine-tune of `task` lives in the store."""
        src = self.imported(task)
        if src is not None:  # a fine-tune researchers already have: keyed by where it came from and when
            return self.store.path(self.cfg.model.name, "standard", task, self.cfg.seed,
                                   keys.imported_fields(src, self.fingerprint))
        trained = clip_modes.training_config(self.mode_cfg)  # the fields that decide the weights, any family
        return self.store.path(self.cfg.model.name, trained["mode"], task, self.cfg.seed,
                               keys.finetune_fields(self.cfg, trained, self.fingerprint, **self.key_extras(task)))

    def checkpoint_meta(self, task: str) -> dict:
        return json.loads(read_metadata(self.checkpoint(task)).get("fusion_bench", "{}"))

    def model_with(self, merged: dict[str, torch.Tensor], linearized: bool = False) -> nn.Module:
        """The network at the given merge-space weights (a fine-tune or a merge), ready to evaluate."""
        return self.modes.eval_model(self.mode_cfg, self.encoder, merged, linearized)

    @property
    def ddp(self) -> bool:
        return "ddp" in str(self.cfg.trainer.get("strategy", ""))

    @cached_property
    def eval_trainer(self) -> DictConfig:
        """The trainer evaluation runs with: the fine-tuning trainer at `eval_precision` (fp32 by default)."""
        precision = self.cfg.get("eval_precision") or self.cfg.trainer.get("precision", "32-true")
        return OmegaConf.merge(self.cfg.trainer, {"precision": precision})

    @cached_property
    def eval_where(self) -> dict:
        """Where single-process evaluation runs: the device and autocast dtype at eval_precision."""
        device, autocast = eval_device(self.eval_trainer)
        return {"device": device, "autocast": autocast}
