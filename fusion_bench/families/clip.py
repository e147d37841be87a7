"""CLIP image classifiers (open_clip): the image encoder, image task pools, zero-shot heads, top-1 accuracy."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.func import functional_call
from torch.utils.data import default_collate

from fusion_bench.data.tasks import Task, known_tasks, load_task
from fusion_bench.evaluation.accuracy import accuracy
from fusion_bench.evaluation.distributed import distributed_accuracies, distributed_grid_accuracies
from fusion_bench.evaluation.search import CoefficientGrid, grid_correct
from fusion_bench.families.base import ModelFamily, validate_common
from fusion_bench.finetune.train import finetune
from fusion_bench.models import modes as clip_modes
from fusion_bench.models.clip import ImageClassifier, head_logits, load_clip, zero_shot_head
from fusion_bench.models.imported import finetuned_source
from fusion_bench.reporting.memory import release
from fusion_bench.statistics import diagonal_fisher, input_grams


class CLIPFamily(ModelFamily):
    """open_clip's image tower with one frozen zero-shot head per task."""

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        validate_common(cfg, known_tasks(cfg.taskpool))
        spec, tasks = cfg.get("finetuned_from"), list(cfg.taskpool.tasks)
        if not spec:
            return
        if clip_modes.training_config(cfg.finetune)["mode"] != "standard":
            raise ValueError(f"finetuned_from gives whole fine-tuned image encoders: use finetune=standard (or "
                             f"finetune=linear finetune.posthoc=true), not finetune={cfg.finetune.mode}")
        if isinstance(spec, str) and "{task}" not in spec and len(tasks) > 1:
            raise ValueError(f"finetuned_from={spec!r} names one checkpoint for {len(tasks)} tasks: put {{task}} "
                             f"where the task name goes, or give a task -> path mapping")
        absent = [f"{t}: {p}" for t in tasks if (p := finetuned_source(spec, t)) is not None and not p.exists()]
        if absent:
            raise FileNotFoundError("finetuned_from: no such fine-tuned checkpoint(s):\n  " + "\n  ".join(absent))

    @cached_property
    def encoder(self) -> nn.Module:
        """The image encoder. The whole CLIP stays loaded only until the zero-shot heads exist (`_heads`)."""
        self._whole = load_clip(self.cfg.model)
        release()  # the state dict read from the file
        return self._whole.visual

    @cached_property
    def tasks(self) -> dict[str, Task]:
        pp = self.encoder.preprocess_cfg
        return {t: load_task(self.cfg.taskpool, t, tuple(pp["mean"]), tuple(pp["std"]), self.cfg.paths.data,
                             image_size=self.encoder.image_size) for t in self.cfg.taskpool.tasks}

    @cached_property
    def _heads(self) -> dict[str, torch.Tensor]:
        """Every task's zero-shot head (class-name embeddings of the text tower), made at once; then the text
        tower is let go and only the image encoder stays in memory."""
        encoder, tokenizer = self.encoder, open_clip.get_tokenizer(self.cfg.model.arch)
        heads = {t: zero_shot_head(self._whole, tokenizer, task.classnames, task.templates)
                 for t, task in self.tasks.items()}
        assert self._whole.visual is encoder
        del self._whole
        release()
        return heads

    def head(self, task: str) -> torch.Tensor:
        """The task's zero-shot classification head."""
        return self._heads[task]

    def imported(self, task: str) -> Path | None:
        return finetuned_source(self.cfg.get("finetuned_from"), task)

    @property
    def num_workers(self) -> int:
        """DataLoader worker processes (taskpool.num_workers: decoding and augmenting image files needs them)."""
        return int(self.cfg.taskpool.get("num_workers", 0))

    @cached_property
    def eval_where(self) -> dict:
        return {**super().eval_where, "num_workers": self.num_workers}

    def classifier(self, encoder: nn.Module, task: str) -> ImageClassifier:
        return ImageClassifier(encoder, self.head(task))

    def acc(self, encoder: nn.Module, task: str, split: str) -> float:
        if self.ddp:
            return self.accuracies([(encoder, task, split)])[0]
        t = self.tasks[task]
        return accuracy(self.classifier(encoder, task), t.split(split), t.num_classes,
                        self.cfg.model.eval_batch_size, **self.eval_where)

    def accuracies(self, runs: list[tuple[nn.Module, str, str]]) -> list[float]:
        """Under DDP all of them in one start of the ranks."""
        if not self.ddp:
            return [self.acc(*r) for r in runs]
        return distributed_accuracies(
            [self.classifier(enc, t) for enc, t, _ in runs], [self.tasks[t].split(s) for _, t, s in runs],
            [self.tasks[t].num_classes for _, t, _ in runs], self.cfg.model.eval_batch_size, self.eval_trainer,
            self.num_workers)

    def grid_accuracies(self, line: CoefficientGrid, tasks: list[str], split: str) -> list[list[float]]:
        """acc[i][j]: accuracy on tasks[i] of the merge at line.grid[j], each batch decoded once (search.py)."""
        if self.ddp:
            return distributed_grid_accuracies(line, [self.head(t) for t in tasks],
                                               [self.tasks[t].split(split) for t in tasks],
                                               [self.tasks[t].num_classes for t in tasks],
                                               self.cfg.model.eval_batch_size, self.eval_trainer, self.num_workers)
        return [grid_correct(line, self.head(t), self.tasks[t].split(split), self.cfg.model.eval_batch_size,
                             **self.eval_where) for t in tasks]

    def batches(self, task: str, split: str, n: int | None, seed: int, batch_size: int) -> list[tuple]:
        data = self.tasks[task].split(split)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        return [default_collate([data[i] for i in order[s:s + batch_size]]) for s in range(0, len(order), batch_size)]

    def grams(self, model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
        return input_grams(model, batches, forward=lambda m, b: m(b[0]), size=lambda b: len(b[0]))[0]

    def fisher(self, model: nn.Module, task: str, batches: list, target: str, seed: int,
               keys: list[str]) -> dict[str, torch.Tensor]:
        fisher, _ = diagonal_fisher(self.classifier(model, task), batches, keys=[f"encoder.{k}" for k in keys],
                                    target=target, seed=seed)
        return {k.removeprefix("encoder."): v for k, v in fisher.items()}

    def loss(self, model: nn.Module, task: str, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.classifier(model, task)(x), torch.as_tensor(y))

    def logits_at(self, model: nn.Module, weights: dict[str, torch.Tensor], task: str, inputs) -> torch.Tensor:
        return head_logits(functional_call(model, weights, (inputs,)), self.head(task))

    def train(self, task: str, module: nn.Module, work_dir: Path) -> float:
        return finetune(module, self.head(task), self.tasks[task], self.cfg.model.train, self.cfg.trainer,
                        self.cfg.seed, work_dir, num_workers=self.num_workers)
