"""T5 / Flan-T5 on GLUE as a model family: a text-to-text T5 behind `T5Logits`, the GLUE tasks
(fusion_bench.data.glue; or taskpool=tiny_glue, the generated fusion_bench.data.tiny_glue, scored with GLUE's
metric of each task) and its metric (generated text vs target: exact match, Spearman for STS-B). The stages,
store and report are the ones CLIP uses; the fine-tuning modes (fusion_bench.t5.modes) act on T5Logits:

| finetune | trains (store keys)                                  | task vectors over                       |
|----------|------------------------------------------------------|-----------------------------------------|
| standard | every T5 parameter (Hugging Face names)              | the same                                |
| lora     | peft LoRA A, B (r=16, alpha=32) on attention q and v | delta_w: W0 + (alpha/r) B A of q and v (`finetune.task_vector=adapters`: A, B) |
| l_lora   | the same adapters, trained linearized around phi_0   | the adapters; evaluated folded into W (or linearized with method=partial_linearization) |

LoRA targets `model.lora_target` (every SelfAttention / EncDecAttention q and v) unless finetune.target_modules is set.
"""

from __future__ import annotations

import logging
import re
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusion_bench.data import glue, tiny_glue
from fusion_bench.devices import eval_device
from fusion_bench.errors import ConfigError
from fusion_bench.families.base import ModelFamily, validate_common
from fusion_bench.merging.regmean_pp import LayerOrder, layer_order
from fusion_bench.statistics import diagonal_fisher, input_grams
from fusion_bench.t5 import modes as t5_modes
from fusion_bench.t5.model import T5Logits, generate_texts, load_t5
from fusion_bench.t5.modes import MODES
from fusion_bench.t5.train import Seq2SeqCollator, finetune_t5

log = logging.getLogger(__name__)

SOURCES = {"glue": tuple(glue.TASKS), "tiny_glue": tiny_glue.TASKS}  # taskpool.source -> its tasks


class T5Family(ModelFamily):
    """Its own model, modes, tasks, metric and training; generation-based evaluation in one process."""

    modes = t5_modes
    ddp = False  # generation-based evaluation runs in one process (trainer=ddp still fine-tunes on every rank)
    fast_search = False  # scores of generated text: the search merges and evaluates at each coefficient
    output_formats = ("safetensors", "transformers")

    @classmethod
    def validate(cls, cfg: DictConfig) -> None:
        source = cfg.taskpool.get("source")
        if source not in SOURCES:
            raise ConfigError(f"model={cfg.model.name} is a T5 model: use taskpool=glue or taskpool=tiny_glue "
                              f"(got taskpool={cfg.taskpool.name})")
        if cfg.get("finetuned_from"):
            raise ConfigError("finetuned_from imports CLIP image encoders; for T5, fine-tune with stage=finetune")
        if cfg.finetune.get("train_head"):
            raise ConfigError("finetune.train_head=true trains an image classifier's head; T5 generates its answers "
                              "as text and has no head: set finetune.train_head=false")
        if cfg.finetune.mode not in MODES:
            raise ConfigError(f"finetune={cfg.finetune.mode} is not available for T5; use one of {MODES}")
        if eval_device(cfg.trainer)[1] is torch.float16:
            raise ConfigError(f"trainer.precision={cfg.trainer.precision}: T5's activations overflow float16 (inf/NaN "
                              f"losses); use bf16-mixed or 32-true")
        validate_common(cfg, sorted(SOURCES[source]), cls.analyses)  # the others compare image-classifier predictions

    @classmethod
    def check_output(cls, cfg: DictConfig, fmt: str, adapters: bool) -> None:
        """Every T5 merge has a transformers form; adapters (checked by fusion_bench.export) a peft one."""

    def write_merged(self, merged: dict[str, torch.Tensor], fmt: str, out: Path, linearized: bool = False,
                     adapters: bool = False) -> Path:
        """T5ForConditionalGeneration + tokenizer, or with `adapters` a peft adapter folder (fusion_bench.export.t5)."""
        from fusion_bench.export.t5 import write_peft_adapter, write_t5

        if fmt != "transformers":
            return super().write_merged(merged, fmt, out, linearized, adapters)
        if adapters:
            return write_peft_adapter(self.backbone.t5, self.mode_cfg, merged, self.pretrained_trainable, out)
        return write_t5(self.plain_model(merged, linearized).t5, self.tokenizer, out)

    def report_extras(self) -> dict:
        return {"metrics": {t: task.metric_name for t, task in self.tasks.items()}}

    @cached_property
    def _loaded(self):
        return load_t5(self.cfg.model)

    @cached_property
    def backbone(self) -> T5Logits:
        return T5Logits(self._loaded[0]).requires_grad_(False).eval()

    @property
    def encoder(self) -> T5Logits:
        return self.backbone

    @cached_property
    def tokenizer(self):
        return self._loaded[1]

    @cached_property
    def tasks(self) -> dict[str, glue.GlueTask]:
        pool = self.cfg.taskpool
        load = tiny_glue.load_task if pool.get("source") == "tiny_glue" else glue.load_glue_task
        return {t: load(pool, t) for t in pool.tasks}

    @cached_property
    def mode_cfg(self) -> DictConfig:
        """cfg.finetune with the T5 LoRA target filled in."""
        ft = OmegaConf.to_container(self.cfg.finetune, resolve=True)
        if ft["mode"] in ("lora", "l_lora") and not ft.get("target_modules"):
            ft["target_modules"] = str(self.cfg.model.lora_target)
        return OmegaConf.create(ft)

    def key_extras(self, task: str) -> dict:
        return {"template": glue.TASKS[task].template}

    def acc(self, model: nn.Module, task: str, split: str) -> float:
        """The task's metric (exact match, Spearman for STS-B; tiny_glue: GLUE's F1 / Matthews where GLUE uses
        them) of greedy generations on the task's split."""
        m, t = self.cfg.model, self.tasks[task]
        preds = generate_texts(model, self.tokenizer, [e.source for e in t.split(split)], m.eval_batch_size,
                               m.max_source_length, m.max_new_tokens, **self.eval_where)
        model.to("cpu")
        return t.score(preds, split)

    def collator(self) -> Seq2SeqCollator:
        c, m = self.backbone.t5.config, self.cfg.model
        return Seq2SeqCollator(self.tokenizer, m.max_source_length, m.max_target_length,
                               c.decoder_start_token_id, c.pad_token_id)

    def eval_key_extras(self) -> dict:
        return {"max_new_tokens": self.cfg.model.max_new_tokens}

    fisher_targets = ("label",)  # sampling whole target sequences from the model is not implemented

    def batches(self, task: str, split: str, n: int | None, seed: int, batch_size: int) -> list[tuple]:
        """(encoder/decoder inputs, labels) of the collated examples (labels: target token ids, padding -100)."""
        data, collate = self.tasks[task].split(split), self.collator()
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        out = []
        for s in range(0, len(order), batch_size):
            b = collate([data[i] for i in order[s:s + batch_size]])
            out.append(({k: b[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}, b["labels"]))
        return out

    def grams(self, model: nn.Module, batches: list, norm_scales: bool = False, keys: list[str] | None = None,
              stop_after: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Mean of x x^T over the real (non-padding) tokens each linear map reads (`gram_positions`): a task's
        Gram does not depend on its sequence lengths nor on how its examples are batched and padded. With
        `norm_scales` also each T5LayerNorm's mean of x_hat^2 over the positions it normalises (LOT Merging)."""
        return input_grams(model, batches, forward=lambda m, b: m(**b[0]),
                           size=lambda b: b[0]["input_ids"].shape[0], positions=gram_positions,
                           norm_scales=norm_scales, keys=keys, stop_after=stop_after)[0]

    def regmean_layers(self, keys: list[str]) -> LayerOrder:
        """T5ForConditionalGeneration: the stem (the shared embedding, with it a tied lm_head), the encoder blocks,
        the encoder's final norm (a layer of its own: the decoder's cross-attention reads the merged encoder's
        output), the decoder blocks, the head (the decoder's final norm, an untied lm_head)."""
        return layer_order(keys, block=r"(?:encoder|decoder)\.block\.\d+|encoder\.final_layer_norm",
                           head=r"decoder\.final_layer_norm\.|lm_head\.")

    def fisher(self, model: nn.Module, task: str, batches: list, target: str, seed: int,
               keys: list[str]) -> dict[str, torch.Tensor]:
        return diagonal_fisher(model, batches, _target_log_likelihood, keys=keys, target=target, seed=seed)[0]

    def loss(self, model: nn.Module, task: str, batch) -> torch.Tensor:
        x, labels = batch
        logits = model(**x)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    def train(self, task: str, module: nn.Module, work_dir: Path) -> float:
        return finetune_t5(module, self.collator(), self.tasks[task].split("train"), self.cfg.model.train,
                           self.cfg.trainer, self.cfg.seed, work_dir)


_READS_ENCODER = re.compile(r"(^|\.)(encoder\.|EncDecAttention\.[kv]\.weight$)")


def gram_positions(key: str, batch: tuple[dict[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The positions of a collated batch that count in the Gram of weight `key` (RegMean): the encoder's real
    tokens (`attention_mask == 1`) for every encoder map and the cross-attention k / v (which read the encoder's
    output); the decoder positions with a target token (`labels != -100`; the decoder input there is the start
    token or a target token, never one after EOS) for every other decoder map and `lm_head`. Padding is excluded:
    masked in the encoder's attention and after the target in the causal decoder, it changes no real position's
    input, so the Gram is that of the examples themselves, however they are padded."""
    x, labels = batch
    return x["attention_mask"].bool() if _READS_ENCODER.search(key) else labels != -100


def _target_log_likelihood(model: nn.Module, x: dict, labels: torch.Tensor) -> torch.Tensor:
    """log p(target | source) per example: the sum of the target tokens' log-probabilities (padding excluded)."""
    logp = torch.log_softmax(model(**x).float(), dim=-1)
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)
