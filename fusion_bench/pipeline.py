"""The whole loop: finetune -> merge -> evaluate -> report. Each stage reads only what the one before wrote."""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import open_clip
import torch
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusion_bench import keys
from fusion_bench.data.tasks import Task, known_tasks, load_task
from fusion_bench.evaluation.accuracy import accuracy, eval_device
from fusion_bench.evaluation.distributed import distributed_accuracies, distributed_grid_accuracies
from fusion_bench.evaluation.search import (
    GRID,
    CoefficientGrid,
    affine_in_coef,
    grid_correct,
    normalized_mean,
)
from fusion_bench.finetune.train import cleanup, finetune
from fusion_bench.merging.consensus import tall_mask_lambda_grid, tall_masks
from fusion_bench.merging.task_specific import TaskSpecificMerge
from fusion_bench.models import modes
from fusion_bench.models.clip import ImageClassifier, image_norm, load_clip, zero_shot_head
from fusion_bench.models.imported import finetuned_source, import_encoder
from fusion_bench.reporting.report import write_report
from fusion_bench.store import (
    CheckpointError,
    CheckpointStore,
    atomic_save_safetensors,
    atomic_write_text,
    read_metadata,
)

log = logging.getLogger(__name__)

STAGES = ("finetune", "merge", "evaluate", "all", "analyze")


class MissingFinetuneError(FileNotFoundError):
    pass


def validate(cfg: DictConfig, stages=STAGES, known: list[str] | None = None) -> None:
    """Catch config errors before anything trains."""
    if cfg.stage not in stages:
        raise ValueError(f"stage={cfg.stage!r}: expected one of {stages}")
    if cfg.stage == "analyze" and not cfg.get("analysis"):
        raise ValueError("stage=analyze needs analysis=cosine|disentanglement|num_tasks")
    known = known if known is not None else known_tasks(cfg.taskpool)
    tasks = list(cfg.taskpool.tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in taskpool.tasks; {cfg.taskpool.name} has {known}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"taskpool.tasks has duplicates: {tasks}")
    coef = cfg.method.get("scaling_coef")
    if coef is not None and not isinstance(coef, (int, float)) and coef != "search" and len(coef) != len(tasks):
        raise ValueError(f"method.scaling_coef has {len(coef)} values for {len(tasks)} tasks")
    k = cfg.method.get("k")  # TIES's fraction (consensus_* count tasks with an integer k, checked by the method)
    if isinstance(k, float) and not 0 < k <= 1:
        raise ValueError(f"method.k={k} must be in (0, 1]")
    eval_device(cfg.trainer)  # trainer=gpu on a machine without CUDA
    spec = cfg.get("finetuned_from")
    if spec:
        if modes.training_config(cfg.finetune)["mode"] != "standard":
            raise ValueError(f"finetuned_from gives whole fine-tuned image encoders: use finetune=standard (or "
                             f"finetune=linear finetune.posthoc=true), not finetune={cfg.finetune.mode}")
        if isinstance(spec, str) and "{task}" not in spec and len(tasks) > 1:
            raise ValueError(f"finetuned_from={spec!r} names one checkpoint for {len(tasks)} tasks: put {{task}} "
                             f"where the task name goes, or give a task -> path mapping")
        absent = [f"{t}: {p}" for t in tasks if (p := finetuned_source(spec, t)) is not None and not p.exists()]
        if absent:
            raise FileNotFoundError("finetuned_from: no such fine-tuned checkpoint(s):\n  " + "\n  ".join(absent))


@dataclass
class Experiment:
    """Everything a run needs, built lazily: the model, tasks, store, method, fine-tunes and accuracies.

    Subclasses for other model families (fusion_bench.t5) change `encoder`, `modes`, `tasks`, `acc` and `_train`.
    """

    cfg: DictConfig
    _heads: dict = field(default_factory=dict)
    chosen: dict = field(default_factory=dict)  # hyper-parameters picked on val (TALL lambdas), given to every merge
    modes = modes  # build_mode_model / trainable_state / to_merge_space / eval_model of this model family

    @cached_property
    def clip(self) -> nn.Module:
        return load_clip(self.cfg.model)

    @cached_property
    def tokenizer(self):
        return open_clip.get_tokenizer(self.cfg.model.arch)

    @cached_property
    def tasks(self) -> dict[str, Task]:
        mean, std = image_norm(self.clip)
        return {t: load_task(self.cfg.taskpool, t, mean, std, self.cfg.paths.data,
                             image_size=self.clip.visual.image_size) for t in self.cfg.taskpool.tasks}

    @cached_property
    def store(self) -> CheckpointStore:
        return CheckpointStore(self.cfg.paths.store)

    @property
    def encoder(self) -> nn.Module:
        """The pretrained network that fine-tuning modes wrap."""
        return self.clip.visual

    @property
    def mode_cfg(self) -> DictConfig:
        return self.cfg.finetune

    @cached_property
    def base(self) -> nn.Module:
        """The mode model at the pretrained weights (theta_0 of the trainable parameters)."""
        return self.modes.build_mode_model(self.mode_cfg, self.encoder)

    @cached_property
    def pretrained_state(self) -> dict[str, torch.Tensor]:
        """theta_0 in the space task vectors live in."""
        return self.modes.to_merge_space(self.mode_cfg, self.encoder, self.modes.trainable_state(self.base))

    @cached_property
    def fingerprint(self) -> str:
        """A hash of every pretrained weight a fine-tune starts from: the whole encoder and the mode's trainable
        start (for LoRA modes the adapters' init, which does not depend on W0). Part of the store key, and stored
        with each fine-tune to catch foreign task vectors."""
        return keys.fingerprint(self.encoder.state_dict(), self.modes.trainable_state(self.base))

    @cached_property
    def method(self):
        """The merging function (a functools.partial); a scaling_coef passed to it overrides the YAML's."""
        fn = instantiate(self.cfg.method)
        needs = getattr(getattr(fn, "func", fn), "requires_mode", None)
        if needs and self.cfg.finetune.mode != needs:
            raise ValueError(f"method needs fine-tunes of finetune={needs}, got finetune={self.cfg.finetune.mode}")
        return fn

    @property
    def evaluate_linearized(self) -> bool:
        return getattr(getattr(self.method, "func", self.method), "evaluate_linearized", False)

    def head(self, task: str) -> torch.Tensor:
        if task not in self._heads:
            t = self.tasks[task]
            self._heads[task] = zero_shot_head(self.clip, self.tokenizer, t.classnames, t.templates)
        return self._heads[task]

    def checkpoint(self, task: str) -> Path:
        trained = modes.training_config(self.mode_cfg)
        src = self.imported(task)
        if src is not None:  # a fine-tune researchers already have: keyed by where it came from and when
            return self.store.path(self.cfg.model.name, "standard", task, self.cfg.seed,
                                   keys.imported_fields(src, self.fingerprint))
        return self.store.path(self.cfg.model.name, trained["mode"], task, self.cfg.seed,
                               keys.finetune_fields(self.cfg, trained, self.fingerprint, **self.key_extras(task)))

    def key_extras(self, task: str) -> dict:
        """Model-family specific fields of a fine-tune's key."""
        return {}

    def imported(self, task: str) -> Path | None:
        """The fine-tuned encoder given for `task` by finetuned_from, if any."""
        return finetuned_source(self.cfg.get("finetuned_from"), task)

    def model_with(self, merged: dict[str, torch.Tensor], linearized: bool = False) -> nn.Module:
        """An encoder at the given merge-space weights (a fine-tune or a merge)."""
        return self.modes.eval_model(self.mode_cfg, self.encoder, merged, linearized)

    def acc(self, encoder: nn.Module, task: str, split: str) -> float:
        if self.ddp:
            return self.accuracies([(encoder, task, split)])[0]
        t = self.tasks[task]
        return accuracy(ImageClassifier(encoder, self.head(task)), t.split(split), t.num_classes,
                        self.cfg.model.eval_batch_size, **self.eval_where)

    def accuracies(self, runs: list[tuple[nn.Module, str, str]]) -> list[float]:
        """Accuracy of each (encoder, task, split); under DDP all of them in one start of the ranks."""
        if not self.ddp:
            return [self.acc(*r) for r in runs]
        return distributed_accuracies(
            [ImageClassifier(enc, self.head(t)) for enc, t, _ in runs], [self.tasks[t].split(s) for _, t, s in runs],
            [self.tasks[t].num_classes for _, t, _ in runs], self.cfg.model.eval_batch_size, self.eval_trainer,
            self.num_workers)

    @property
    def ddp(self) -> bool:
        return "ddp" in str(self.cfg.trainer.get("strategy", ""))

    @property
    def num_workers(self) -> int:
        """DataLoader worker processes (taskpool.num_workers: decoding and augmenting image files needs them)."""
        return int(self.cfg.taskpool.get("num_workers", 0))

    @cached_property
    def eval_trainer(self) -> DictConfig:
        """The trainer evaluation runs with: the fine-tuning trainer at `eval_precision` (fp32 by default)."""
        precision = self.cfg.get("eval_precision") or self.cfg.trainer.get("precision", "32-true")
        return OmegaConf.merge(self.cfg.trainer, {"precision": precision})

    @cached_property
    def eval_where(self) -> dict:
        """Where single-process evaluation runs: the trainer's device at eval_precision, the pool's workers."""
        device, autocast = eval_device(self.eval_trainer)
        return {"device": device, "autocast": autocast, "num_workers": self.num_workers}

    # ---- finetune stage -------------------------------------------------------------------------------
    def ensure_finetuned(self, task: str) -> Path:
        """The stored fine-tune of `task`, made first if absent. Jobs that want the same one at once (parallel
        sweeps, SLURM arrays on a shared file system) take turns on a lock: one trains, the others reuse it."""
        path = self.checkpoint(task)
        if path.is_file():
            log.info("reusing fine-tune %s", path)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix(".lock"))):
            if path.is_file():
                log.info("reusing fine-tune %s (made by a concurrent job)", path)
                return path
            return self._make_finetune(task, path)

    def _make_finetune(self, task: str, path: Path) -> Path:
        src = self.imported(task)
        if src is not None:
            state = import_encoder(src, self.modes.trainable_state(self.base))
            self.store.save(path, state, {"task": task, "mode": "standard", "model": self.cfg.model.name,
                                          "imported_from": str(src.resolve())})
            log.info("imported fine-tune of %s from %s -> %s", task, src, path)
            return path
        module = self.modes.build_mode_model(self.mode_cfg, self.encoder)
        work_dir = path.with_suffix(".partial")
        sec = self._train(task, module, work_dir)
        meta = {"task": task, "mode": self.cfg.finetune.mode, "model": self.cfg.model.name,
                "pretrained": self.fingerprint,
                "seed": self.cfg.seed, "seconds_per_step": round(sec, 4),
                "trainer": {k: str(self.cfg.trainer.get(k)) for k in ("accelerator", "devices", "precision")}}
        self.store.save(path, self.modes.trainable_state(module.cpu()), meta)
        cleanup(work_dir)
        log.info("fine-tuned %s in %.3f s/step -> %s", task, sec, path)
        return path

    def finetuned_state(self, task: str) -> dict[str, torch.Tensor]:
        path = self.checkpoint(task)
        if not path.is_file() and self.imported(task) is not None:
            self.ensure_finetuned(task)  # an import is read, not trained: any stage does it
        if not path.is_file():
            raise MissingFinetuneError(
                f"missing fine-tune for task {task!r} (mode {self.cfg.finetune.mode}, seed {self.cfg.seed}): {path}\n"
                f"make it with: python run.py stage=finetune model={self.cfg.model.name} "
                f"taskpool={self.cfg.taskpool.name} taskpool.tasks=[{task}] finetune={self.cfg.finetune.mode} "
                f"seed={self.cfg.seed}"
            )
        stored = self.store.load(path, expected=self.modes.trainable_state(self.base))
        origin = json.loads(read_metadata(path).get("fusion_bench", "{}")).get("pretrained")
        if origin is not None and origin != self.fingerprint:
            raise CheckpointError(f"checkpoint {path} was fine-tuned from another pretrained model (fingerprint "
                                  f"{origin}, this run's is {self.fingerprint}): its task vector would be meaningless")
        return self.modes.to_merge_space(self.mode_cfg, self.encoder, stored)

    def _train(self, task: str, module: nn.Module, work_dir: Path) -> float:
        """Fine-tune `module` in place on the task; returns seconds per step."""
        return finetune(module, self.head(task), self.tasks[task], self.cfg.model.train, self.cfg.trainer,
                        self.cfg.seed, work_dir, num_workers=self.num_workers)

    def eval_key(self, **extra) -> str:
        """What the cached reference accuracies depend on besides the checkpoint (`extra`: a family's own)."""
        evaluation = {"device": self.eval_where["device"].type, "autocast": str(self.eval_where["autocast"]),
                      "linearized": self.evaluate_linearized}
        return keys.reference_key(self.cfg, evaluation, **extra)

    def report_extras(self) -> dict:
        """Model-family specific report fields."""
        return {}

    def seconds_per_step(self, task: str) -> float | None:
        """Fine-tuning time per step, as recorded in the stored checkpoint."""
        meta = json.loads(read_metadata(self.checkpoint(task)).get("fusion_bench", "{}"))
        return meta.get("seconds_per_step")

    def reference_accuracies(self, task: str) -> dict[str, float]:
        """Zero-shot and individual fine-tuned accuracy (val and test), cached next to the checkpoint."""
        lin = self.evaluate_linearized  # normalized accuracy compares like with like
        path = self.checkpoint(task).with_suffix(f".eval-{self.eval_key()}.json")
        if path.is_file():
            return json.loads(path.read_text())
        ft = self.model_with(self.finetuned_state(task), linearized=lin)
        runs = {f"{name}_{split}": (enc, task, split)
                for name, enc in (("zeroshot", self.encoder), ("finetuned", ft)) for split in ("val", "test")}
        res = dict(zip(runs, self.accuracies(list(runs.values()))))
        atomic_write_text(path, json.dumps(res))
        return res

    # ---- merge stage ------------------------------------------------------------------------------------
    def merge(self, finetuned: list[dict], scaling_coef, **hp) -> dict[str, torch.Tensor] | TaskSpecificMerge:
        """The method's merge; `hp` overrides its YAML (the pipeline's choice of TALL lambdas)."""
        if "scaling_coef" in inspect.signature(self.method).parameters:
            hp["scaling_coef"] = scaling_coef
        return self.method(self.pretrained_state, finetuned, **{**self.chosen, **hp})

    def merged_accuracies(self, merged: dict | TaskSpecificMerge, split: str,
                          tasks: list[str] | None = None) -> dict[str, float]:
        """Accuracy of a merge on each task; a task-specific merge (TALL masks, EMR) is evaluated on task i of
        `tasks` with its task i weights, one encoder at a time."""
        tasks = list(tasks or self.tasks)
        lin = self.evaluate_linearized
        if not isinstance(merged, TaskSpecificMerge):
            enc = self.model_with(merged, linearized=lin)
            return dict(zip(tasks, self.accuracies([(enc, t, split) for t in tasks])))
        if self.ddp:
            return dict(zip(tasks, self.accuracies([(self.model_with(merged.task_weights(i), lin), t, split)
                                                    for i, t in enumerate(tasks)])))
        return {t: self.acc(self.model_with(merged.task_weights(i), lin), t, split) for i, t in enumerate(tasks)}

    def choose_tall_lambdas(self, finetuned: list[dict]) -> list[float]:
        """TALL's lambda_t for each task: of tall_mask_lambda_grid, the one whose mask gives task t the best val
        accuracy of theta_0 + m_t * tau_MTL (Wang et al. 2024); ties go to the smaller lambda."""
        base = {k: self.cfg.method[k] for k in ("base", "ties_k") if k in self.cfg.method}
        val = {lam: self.merged_accuracies(tall_masks(self.pretrained_state, finetuned, lambdas=lam, **base), "val")
               for lam in tall_mask_lambda_grid}
        for lam, accs in val.items():
            log.info("TALL lambda %.1f: val accuracy %s", lam, {t: round(a, 4) for t, a in accs.items()})
        return [max(tall_mask_lambda_grid, key=lambda lam: val[lam][t]) for t in self.tasks]

    fast_search = True  # accuracy is an argmax over head logits: CoefficientGrid applies

    def grid_accuracies(self, finetuned: list[dict], grid: list[float], split: str = "val",
                        tasks: list[str] | None = None) -> list[dict[str, float]]:
        """acc[i][task]: accuracy of the merge of `finetuned` at scaling_coef grid[i] (see evaluation/search.py)."""
        tasks = list(tasks or self.tasks)
        if not (self.fast_search and affine_in_coef(self.method)):
            return [self.merged_accuracies(self.merge(finetuned, c), split, tasks) for c in grid]
        lin = self.evaluate_linearized
        line = CoefficientGrid(self.model_with(self.pretrained_state, linearized=lin), self.pretrained_state,
                               self.merge(finetuned, 1.0), grid,
                               partial(modes.reload, finetune_cfg=self.mode_cfg, base=self.base, linearized=lin))
        if self.ddp:
            acc = distributed_grid_accuracies(line, [self.head(t) for t in tasks],
                                              [self.tasks[t].split(split) for t in tasks],
                                              [self.tasks[t].num_classes for t in tasks],
                                              self.cfg.model.eval_batch_size, self.eval_trainer, self.num_workers)
        else:
            acc = [grid_correct(line, self.head(t), self.tasks[t].split(split), self.cfg.model.eval_batch_size,
                                **self.eval_where) for t in tasks]
        return [{t: acc[i][j] for i, t in enumerate(tasks)} for j in range(len(grid))]


def save_merge(merged: dict | TaskSpecificMerge, run_dir: Path, tasks: list[str]) -> Path:
    """merged.safetensors; a task-specific merge as task_specific.safetensors: `shared.<key>` (fp32),
    `masks.<key>` (bool, one row per task) and the metadata `tasks` and `rescalers` (JSON lists), so that task t's
    weights are theta_0 + rescalers[t] * masks.<key>[t] * shared.<key> (keys without a mask: theta_0)."""
    if not isinstance(merged, TaskSpecificMerge):
        return atomic_save_safetensors(merged, run_dir / "merged.safetensors")
    tensors = {**{f"shared.{k}": v for k, v in merged.shared.items()}, **{f"masks.{k}": m for k, m in merged.masks.items()}}
    meta = {"tasks": json.dumps(tasks), "rescalers": json.dumps(merged.rescalers), "method": merged.method,
            "format": "theta_t = theta_0 + rescalers[t] * masks.<key>[t] * shared.<key>"}
    return atomic_save_safetensors(tensors, run_dir / "task_specific.safetensors", metadata=meta)


def run(cfg: DictConfig, run_dir: Path, method_name: str) -> dict | None:
    if cfg.model.get("family") == "t5":
        from fusion_bench.t5.pipeline import T5Experiment, validate_t5

        validate_t5(cfg)
        exp = T5Experiment(cfg)
    else:
        validate(cfg)
        exp = Experiment(cfg)
    torch.set_num_threads(int(cfg.num_threads))
    tasks = list(cfg.taskpool.tasks)
    t0 = time.perf_counter()
    if cfg.stage in ("finetune", "all"):
        for task in tasks:
            exp.ensure_finetuned(task)
        if cfg.stage == "finetune":
            return None
    if cfg.stage == "analyze":
        from fusion_bench.evaluation.analysis import run_analysis

        return run_analysis(exp, cfg.analysis, run_dir, method_name)
    finetuned = [exp.finetuned_state(t) for t in tasks]
    coef = cfg.method.get("scaling_coef")
    if coef is not None and not isinstance(coef, (int, float, str)):
        coef = [float(c) for c in coef]
    search = None
    if cfg.method.get("lambdas") == "search":  # TALL masks / Consensus: lambda_t per task on val
        exp.chosen["lambdas"] = exp.choose_tall_lambdas(finetuned)
        log.info("TALL lambdas chosen on val: %s", dict(zip(tasks, exp.chosen["lambdas"])))
    # stage=merge with a fixed coefficient evaluates nothing; with `search` it picks the coefficient on val
    ref = {t: exp.reference_accuracies(t) for t in tasks} if cfg.stage != "merge" or coef == "search" else {}
    if coef == "search":
        search = {c: normalized_mean(val, ref, "val")
                  for c, val in zip(GRID, exp.grid_accuracies(finetuned, GRID, "val"))}
        for c, score in search.items():
            log.info("scaling_coef %.2f: val normalized accuracy %.4f", c, score)
        coef = max(search, key=search.get)
    merged = exp.merge(finetuned, coef)
    if cfg.stage == "merge":
        out = save_merge(merged, run_dir, tasks)
        log.info("merged weights written to %s", out)
        return None
    test = exp.merged_accuracies(merged, "test")
    per_task = {
        t: {"zeroshot": ref[t]["zeroshot_test"], "finetuned": ref[t]["finetuned_test"], "merged": test[t],
            "normalized": test[t] / max(ref[t]["finetuned_test"], 1e-12)}
        for t in tasks
    }
    report = {
        "model": cfg.model.name,
        "finetune": cfg.finetune.mode,
        "method": method_name,
        "taskpool": cfg.taskpool.name,
        "scaling_coef": coef,
        "seed": cfg.seed,
        "trainable_params": sum(v.numel() for v in exp.modes.trainable_state(exp.base).values()),
        "seconds_per_step": {t: exp.seconds_per_step(t) for t in tasks},
        "tasks": per_task,
        "average": {k: sum(v[k] for v in per_task.values()) / len(per_task)
                    for k in ("zeroshot", "finetuned", "merged", "normalized")},
        "search": None if search is None else {"grid": list(search), "val_normalized": list(search.values())},
        "chosen_on_val": exp.chosen or None,
        "storage": merged.storage_summary() if isinstance(merged, TaskSpecificMerge) else None,
        **exp.report_extras(),
        "method_config": OmegaConf.to_container(cfg.method),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(report, run_dir)
    return report
