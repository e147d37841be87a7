"""The evaluate stage: each task's reference accuracies (zero-shot, its own fine-tune) and a merge's accuracies."""

from __future__ import annotations

import json
from functools import partial

import torch

from fusion_bench import keys
from fusion_bench.evaluation.search import CoefficientGrid
from fusion_bench.families.base import ModelFamily
from fusion_bench.merging.task_specific import TaskSpecificMerge
from fusion_bench.stages.finetune import finetuned_state
from fusion_bench.stages.merge import Method
from fusion_bench.store import atomic_write_text


def eval_key(fam: ModelFamily, linearized: bool) -> str:
    """What the cached reference accuracies depend on besides the checkpoint."""
    where = fam.eval_where
    evaluation = {"device": where["device"].type, "autocast": str(where["autocast"]), "linearized": linearized}
    return keys.reference_key(fam.cfg, evaluation, **fam.eval_key_extras())


def reference_accuracies(fam: ModelFamily, task: str, linearized: bool = False) -> dict[str, float]:
    """Zero-shot and individual fine-tuned accuracy (val and test), cached next to the checkpoint. `linearized`:
    the fine-tune evaluated as the method evaluates merges (normalized accuracy compares like with like)."""
    path = fam.checkpoint(task).with_suffix(f".eval-{eval_key(fam, linearized)}.json")
    if path.is_file():
        return json.loads(path.read_text())
    ft = fam.model_with(finetuned_state(fam, task), linearized=linearized)
    runs = {f"{name}_{split}": (enc, task, split)
            for name, enc in (("zeroshot", fam.encoder), ("finetuned", ft)) for split in ("val", "test")}
    res = dict(zip(runs, fam.accuracies(list(runs.values()))))
    atomic_write_text(path, json.dumps(res))
    return res


def merged_accuracies(fam: ModelFamily, merged: dict | TaskSpecificMerge, split: str,
                      tasks: list[str] | None = None, linearized: bool = False) -> dict[str, float]:
    """Accuracy of a merge on each task; a task-specific merge (TALL masks, EMR) is evaluated on task i of
    `tasks` with its task i weights, one encoder at a time."""
    tasks = list(tasks or fam.tasks)
    if not isinstance(merged, TaskSpecificMerge):
        enc = fam.model_with(merged, linearized=linearized)
        return dict(zip(tasks, fam.accuracies([(enc, t, split) for t in tasks])))
    if fam.ddp:
        return dict(zip(tasks, fam.accuracies([(fam.model_with(merged.task_weights(i), linearized), t, split)
                                               for i, t in enumerate(tasks)])))
    return {t: fam.acc(fam.model_with(merged.task_weights(i), linearized), t, split) for i, t in enumerate(tasks)}


def grid_accuracies(fam: ModelFamily, method: Method, finetuned: list[dict], grid: list[float], split: str = "val",
                    tasks: list[str] | None = None) -> list[dict[str, float]]:
    """acc[i][task]: accuracy of the merge of `finetuned` at scaling_coef grid[i]. One merge and one evaluation
    encoder for the whole grid where the family and the method allow it (fusion_bench/evaluation/search.py)."""
    tasks = list(tasks or fam.tasks)
    lin, pre = method.evaluate_linearized, fam.pretrained_state
    if not (fam.fast_search and method.affine):
        return [merged_accuracies(fam, method(pre, finetuned, c), split, tasks, lin) for c in grid]
    base = fam.base if fam.mode == "l_lora" else None  # only l_lora folds adapters with the mode model
    encoder = fam.model_with(pre, linearized=lin)
    line = CoefficientGrid(encoder, pre, method(pre, finetuned, 1.0), grid,
                           partial(fam.modes.reload, finetune_cfg=fam.mode_cfg, base=base, linearized=lin))
    acc = fam.grid_accuracies(line, tasks, split)
    return [{t: acc[i][j] for i, t in enumerate(tasks)} for j in range(len(grid))]


def trainable_params(fam: ModelFamily) -> int:
    return sum(v.numel() for v in fam.pretrained_trainable.values() if isinstance(v, torch.Tensor))
