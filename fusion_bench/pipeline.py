"""The whole loop: finetune -> merge -> evaluate -> report. Each stage reads only what the one before wrote."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import open_clip
import torch
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import track
from torch import nn

from fusion_bench.data.tasks import Task, known_tasks, load_task
from fusion_bench.evaluation.accuracy import accuracy, eval_device
from fusion_bench.evaluation.distributed import distributed_accuracies
from fusion_bench.finetune.train import cleanup, finetune
from fusion_bench.models import modes
from fusion_bench.models.clip import ImageClassifier, image_norm, load_clip, zero_shot_head
from fusion_bench.models.imported import finetuned_source, import_encoder
from fusion_bench.reporting.report import write_report
from fusion_bench.store import (
    CheckpointError,
    CheckpointStore,
    atomic_save_safetensors,
    atomic_write_text,
    config_hash,
    read_metadata,
)

log = logging.getLogger(__name__)

STAGES = ("finetune", "merge", "evaluate", "all", "analyze")
SEARCH_GRID = [round(0.05 * i, 2) for i in range(21)]


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
    k = cfg.method.get("k")
    if k is not None and not 0 < float(k) <= 1:
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
        """A short hash of the pretrained weights, stored with each fine-tune to catch foreign task vectors."""
        h = hashlib.sha256()
        for k in sorted(self.pretrained_state)[:16]:
            h.update(k.encode() + self.pretrained_state[k].float().numpy().tobytes()[:65536])
        return h.hexdigest()[:16]

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
        c = self.cfg
        trained = modes.training_config(c.finetune)
        hp = {"train": OmegaConf.to_container(c.model.train), "finetune": trained,
              "pool": f"{c.taskpool.name}-v{c.taskpool.get('version')}", "weights": str(c.model.get("pretrained"))}
        src = self.imported(task)
        if src is not None:  # a fine-tune researchers already have: keyed by where it came from and when
            hp = {"imported": str(src.resolve()), "mtime_ns": src.stat().st_mtime_ns, "weights": hp["weights"]}
        return self.store.path(c.model.name, trained["mode"], task, c.seed, hp)

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
            [self.tasks[t].num_classes for _, t, _ in runs], self.cfg.model.eval_batch_size, self.cfg.trainer,
            self.num_workers)

    @property
    def ddp(self) -> bool:
        return "ddp" in str(self.cfg.trainer.get("strategy", ""))

    @property
    def num_workers(self) -> int:
        """DataLoader worker processes (taskpool.num_workers: decoding and augmenting image files needs them)."""
        return int(self.cfg.taskpool.get("num_workers", 0))

    @cached_property
    def eval_where(self) -> dict:
        """Where single-process evaluation runs: the trainer's device and precision, the pool's workers."""
        device, autocast = eval_device(self.cfg.trainer)
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
                "seed": self.cfg.seed, "seconds_per_step": round(sec, 4)}
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

    def eval_key(self) -> str:
        """What the cached reference accuracies depend on besides the checkpoint."""
        pool = {k: v for k, v in OmegaConf.to_container(self.cfg.taskpool).items()
                if k not in ("num_workers", "cache_eval")}  # how data is read, not what it is
        return config_hash({"taskpool": pool,
                            "finetune": OmegaConf.to_container(self.cfg.finetune)})  # posthoc shares checkpoints

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
        path = self.checkpoint(task).with_suffix(f".eval-{self.eval_key()}{'-lin' if lin else ''}.json")
        if path.is_file():
            return json.loads(path.read_text())
        ft = self.model_with(self.finetuned_state(task), linearized=lin)
        runs = {f"{name}_{split}": (enc, task, split)
                for name, enc in (("zeroshot", self.encoder), ("finetuned", ft)) for split in ("val", "test")}
        res = dict(zip(runs, self.accuracies(list(runs.values()))))
        atomic_write_text(path, json.dumps(res))
        return res

    # ---- merge stage ------------------------------------------------------------------------------------
    def merge(self, finetuned: list[dict], scaling_coef) -> dict[str, torch.Tensor]:
        kwargs = {"scaling_coef": scaling_coef} if "scaling_coef" in inspect.signature(self.method).parameters else {}
        return self.method(self.pretrained_state, finetuned, **kwargs)

    def merged_accuracies(self, merged: dict, split: str) -> dict[str, float]:
        enc = self.model_with(merged, linearized=self.evaluate_linearized)
        return dict(zip(self.tasks, self.accuracies([(enc, t, split) for t in self.tasks])))


def _normalized_mean(acc: dict[str, float], ref: dict[str, dict], split: str) -> float:
    return sum(acc[t] / max(ref[t][f"finetuned_{split}"], 1e-12) for t in acc) / len(acc)


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
    # stage=merge with a fixed coefficient evaluates nothing; with `search` it picks the coefficient on val
    ref = {t: exp.reference_accuracies(t) for t in tasks} if cfg.stage != "merge" or coef == "search" else {}
    if coef == "search":
        search = {}
        for c in track(SEARCH_GRID, description="scaling_coef search on val"):
            val = exp.merged_accuracies(exp.merge(finetuned, c), "val")
            search[c] = _normalized_mean(val, ref, "val")
            log.info("scaling_coef %.2f: val normalized accuracy %.4f", c, search[c])
        coef = max(search, key=search.get)
    merged = exp.merge(finetuned, coef)
    if cfg.stage == "merge":
        out = atomic_save_safetensors(merged, run_dir / "merged.safetensors")
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
        **exp.report_extras(),
        "method_config": OmegaConf.to_container(cfg.method),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(report, run_dir)
    return report
