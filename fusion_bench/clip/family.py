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

from fusion_bench.clip.imported import finetuned_source
from fusion_bench.clip.model import ImageClassifier, head_logits, load_clip, zero_shot_head
from fusion_bench.data.tasks import Task, known_tasks, load_control, load_task
from fusion_bench.errors import ConfigError, MissingFileError
from fusion_bench.evaluation.accuracy import accuracy
from fusion_bench.evaluation.search import CoefficientGrid, grid_correct
from fusion_bench.families.base import ANALYSES, ModelFamily, validate_common
from fusion_bench.merging.regmean_pp import LayerOrder, layer_order
from fusion_bench.models import modes as clip_modes
from fusion_bench.reporting.memory import release
from fusion_bench.statistics import diagonal_fisher, input_grams
from fusion_bench.store import CheckpointError


class CLIPFamily(ModelFamily):
    """open_clip's image tower with one head per task: the frozen zero-shot head, or with finetune.train_head the
    head trained with each fine-tune (initialised from the zero-shot head, stored next to it, never merged)."""

    modes = clip_modes
    fast_search = True  # accuracy is an argmax over head logits: the search's CoefficientGrid applies
    analyses = ANALYSES  # every one
    output_formats = ("safetensors", "open_clip", "transformers")  # output.format (fusion_bench.export)

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        validate_common(cfg, known_tasks(cfg.taskpool), cls.analyses)
        spec, tasks = cfg.get("finetuned_from"), list(cfg.taskpool.tasks)
        if spec is not None and not spec:  # '' (an unset shell variable) must not silently fine-tune everything
            raise ConfigError(f"finetuned_from={spec!r}: empty; give a path with {{task}} (e.g. "
                              f"/ckpts/clip-vit-base-patch32_{{task}}) or a task -> path mapping, or leave it null "
                              f"to fine-tune here")
        if spec is None:
            return
        if cfg.finetune.get("train_head"):
            raise ConfigError("finetuned_from imports fine-tuned encoders without their heads: finetune.train_head=true "
                              "needs fine-tunes made here (stage=finetune)")
        if clip_modes.training_config(cfg.finetune)["mode"] != "standard":
            raise ConfigError(f"finetuned_from gives whole fine-tuned image encoders: use finetune=standard (or "
                              f"finetune=linear finetune.posthoc=true), not finetune={cfg.finetune.mode}")
        if isinstance(spec, str) and "{task}" not in spec and len(tasks) > 1:
            raise ConfigError(f"finetuned_from={spec!r} names one checkpoint for {len(tasks)} tasks: put {{task}} "
                              f"where the task name goes, or give a task -> path mapping")
        absent = [f"{t}: {p}" for t in tasks if (p := finetuned_source(spec, t)) is not None and not p.exists()]
        if absent:
            raise MissingFileError(f"finetuned_from: no such fine-tuned checkpoint(s): {'; '.join(absent)}")

    @classmethod
    def check_output(cls, cfg: DictConfig, fmt: str, adapters: bool) -> None:
        from fusion_bench.clip.hf_export import NoTransformersEquivalent, hf_clip_config
        from fusion_bench.export import OutputError

        if adapters:
            raise OutputError("output.adapters=true: peft's LoRA layer for open_clip's nn.MultiheadAttention adds the "
                              "out_proj delta twice (peft 0.21, see fusion_bench/models/lora.py), so a peft adapter "
                              "folder would not reproduce this merge; write the folded weights (output.adapters=false)")
        if fmt == "transformers":
            try:
                hf_clip_config(cfg.model.arch)
            except NoTransformersEquivalent as e:
                raise OutputError(f"output.format=transformers: {e}. Write it with output.format=open_clip (or "
                                  f"safetensors)") from e

    def write_merged(self, merged: dict[str, torch.Tensor], fmt: str, out: Path, linearized: bool = False,
                     adapters: bool = False) -> Path:
        """The whole CLIP: merged image tower, the pretrained text tower (fusion_bench.clip.export)."""
        from fusion_bench.clip.export import whole_clip_state, write_open_clip
        from fusion_bench.clip.hf_export import save_hf_clip

        visual = self.plain_model(merged, linearized).state_dict()
        whole = self.__dict__.get("_whole")  # the loaded CLIP until the zero-shot heads exist
        state = whole_clip_state((whole if whole is not None else load_clip(self.cfg.model)).state_dict(), visual)
        if fmt == "open_clip":
            return write_open_clip(state, self.cfg.model.arch, out)
        if fmt == "transformers":
            return save_hf_clip(state, self.cfg.model.arch, out, preprocess=self.encoder.preprocess_cfg)
        return super().write_merged(merged, fmt, out, linearized, adapters)

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

    @property
    def train_head(self) -> bool:
        return bool(self.mode_cfg.get("train_head", False))

    @property
    def wants_control(self) -> bool:
        """The run needs the pool's control task (analysis=negation): its head is made with the others."""
        analysis = self.cfg.get("analysis")
        return self.cfg.stage == "analyze" and analysis is not None and analysis.get("kind") == "negation"

    @cached_property
    def control(self) -> Task:
        """The pool's control task (taskpool.control), evaluated by analysis=negation; never fine-tuned or merged."""
        pp = self.encoder.preprocess_cfg
        task = load_control(self.cfg.taskpool, tuple(pp["mean"]), tuple(pp["std"]), self.cfg.paths.data,
                            image_size=self.encoder.image_size)
        if task.name in self.tasks:
            raise ValueError(f"taskpool.control is named {task.name!r} like a task of the pool")
        return task

    def task(self, name: str) -> Task:
        """A task of the pool, or the control task by its name."""
        if name in self.tasks:
            return self.tasks[name]
        if self.wants_control and name == self.control.name:
            return self.control
        raise KeyError(f"unknown task {name!r}; taskpool.tasks are {list(self.tasks)}")

    @cached_property
    def _heads(self) -> dict[str, torch.Tensor]:
        """Every task's zero-shot head (class-name embeddings of the text tower; the control task's too when the
        run needs it), made at once; then the text tower is let go and only the image encoder stays in memory."""
        encoder, tokenizer = self.encoder, open_clip.get_tokenizer(self.cfg.model.arch)
        tasks = {**self.tasks, **({self.control.name: self.control} if self.wants_control else {})}
        heads = {t: zero_shot_head(self._whole, tokenizer, task.classnames, task.templates)
                 for t, task in tasks.items()}
        assert self._whole.visual is encoder
        del self._whole
        release()
        return heads

    def model_with(self, merged: dict[str, torch.Tensor], linearized: bool = False) -> nn.Module:
        """As the base; the zero-shot heads are made first, so the text tower is gone before the evaluation copy
        (and a search's task vector) exist: at a ViT-L/14 search's peak that is 0.46 GiB less."""
        self._heads  # noqa: B018 (a cached property: made once)
        return super().model_with(merged, linearized)

    def zero_shot_head(self, task: str) -> torch.Tensor:
        return self._heads[task]

    def head(self, task: str) -> torch.Tensor:
        """The head task `task` is evaluated with: its zero-shot head, or with finetune.train_head the head trained
        with its fine-tune (read from the store; the control task always has its zero-shot head)."""
        if not self.train_head or task not in self.tasks:
            return self._heads[task]
        trained = self.__dict__.setdefault("_trained_heads", {})
        if task not in trained:
            trained[task] = self._stored_head(task)
        return trained[task]

    def _stored_head(self, task: str) -> torch.Tensor:
        ckpt = self.checkpoint(task)
        path = self.store.head_path(ckpt)
        if not path.is_file():
            raise CheckpointError(f"finetune.train_head=true: no trained head {path} of task {task!r} (fine-tune "
                                  f"{ckpt}{'' if ckpt.is_file() else ', also missing'}); make it with: "
                                  f"{self.finetune_command(task)}")
        state = self.store.load(path, expected={"head": self._heads[task]})
        return state["head"]

    def key_extras(self, task: str) -> dict:
        """A trained head starts from the zero-shot head: its bytes key the fine-tune (the text tower is not in the
        encoder's fingerprint)."""
        if not self.train_head:
            return {}
        from fusion_bench import keys

        return {"head_init": keys.fingerprint({"head": self._heads[task]})}

    def pop_trained_head(self, task: str) -> torch.Tensor | None:
        return self.__dict__.get("_new_heads", {}).pop(task, None)

    def import_finetune(self, source: Path, task: str) -> dict[str, torch.Tensor]:
        from fusion_bench.clip.imported import import_encoder  # open_clip / transformers files

        return import_encoder(source, self.pretrained_trainable, task)

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
        t = self.task(task)
        return accuracy(self.classifier(encoder, task), t.split(split), t.num_classes,
                        self.cfg.model.eval_batch_size, **self.eval_where)

    def accuracies(self, runs: list[tuple[nn.Module, str, str]]) -> list[float]:
        """Under DDP all of them in one start of the ranks."""
        if not self.ddp:
            return [self.acc(*r) for r in runs]
        from fusion_bench.evaluation.distributed import distributed_accuracies  # Lightning: only under DDP

        return distributed_accuracies(
            [self.classifier(enc, t) for enc, t, _ in runs], [self.task(t).split(s) for _, t, s in runs],
            [self.task(t).num_classes for _, t, _ in runs], self.cfg.model.eval_batch_size, self.eval_trainer,
            self.num_workers)

    def grid_accuracies(self, line: CoefficientGrid, tasks: list[str], split: str) -> list[list[float]]:
        """acc[i][j]: accuracy on tasks[i] of the merge at line.grid[j], each batch decoded once (search.py)."""
        if self.ddp:
            from fusion_bench.evaluation.distributed import distributed_grid_accuracies

            return distributed_grid_accuracies(line, [self.head(t) for t in tasks],
                                               [self.task(t).split(split) for t in tasks],
                                               [self.task(t).num_classes for t in tasks],
                                               self.cfg.model.eval_batch_size, self.eval_trainer, self.num_workers)
        return [grid_correct(line, self.head(t), self.task(t).split(split), self.cfg.model.eval_batch_size,
                             **self.eval_where) for t in tasks]

    def batches(self, task: str, split: str, n: int | None, seed: int, batch_size: int) -> list[tuple]:
        data = self.tasks[task].split(split)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        return [default_collate([data[i] for i in order[s:s + batch_size]]) for s in range(0, len(order), batch_size)]

    def grams(self, model: nn.Module, batches: list, norm_scales: bool = False, keys: list[str] | None = None,
              stop_after: nn.Module | None = None) -> dict[str, torch.Tensor]:
        return input_grams(model, batches, forward=lambda m, b: m(b[0]), size=lambda b: len(b[0]),
                           norm_scales=norm_scales, keys=keys, stop_after=stop_after)[0]

    def regmean_layers(self, keys: list[str]) -> LayerOrder:
        """open_clip's VisionTransformer: the stem (conv1, class / positional embedding, ln_pre), the residual blocks,
        the head (attn_pool, ln_post, proj: what follows the blocks in its forward)."""
        return layer_order(keys, block=r"transformer\.resblocks\.\d+", head=r"(attn_pool|ln_post)\.|proj$")

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
        """Fine-tune behind the zero-shot head; with finetune.train_head the head is a parameter that starts there
        and trains too (kept for `pop_trained_head`, which the finetune stage stores next to the fine-tune)."""
        head = self._heads[task]
        if self.train_head:
            head = nn.Parameter(head.clone())
        from fusion_bench.clip.train import finetune  # Lightning: only where something trains

        sec = finetune(module, head, self.tasks[task], self.cfg.model.train, self.cfg.trainer,
                       self.cfg.seed, work_dir, num_workers=self.num_workers)
        if self.train_head:
            self.__dict__.setdefault("_new_heads", {})[task] = head.detach().clone()
        return sec
