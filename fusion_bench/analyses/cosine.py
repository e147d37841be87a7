"""`analysis=cosine`: the cosine similarity of every pair of task vectors (a heatmap)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fusion_bench.merging import awd
from fusion_bench.merging.task_vectors import prepare
from fusion_bench.reporting import plots
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import matrix_table
from fusion_bench.stages.finetune import finetuned_state


def gram_matrix(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """G[i, j] = <tau_i, tau_j> over all floating-point entries: the merging engine's streaming pass (AWD's)."""
    return awd.gram_matrix(prepare(pretrained, finetuned, "cosine_matrix")).numpy()


def cosine_matrix(pretrained, finetuned) -> np.ndarray:
    g = gram_matrix(pretrained, finetuned)
    norms = np.sqrt(np.clip(np.diag(g), 1e-300, None))
    return g / np.outer(norms, norms)


def run(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    tasks = list(fam.cfg.taskpool.tasks)
    cos = cosine_matrix(fam.pretrained_state, [finetuned_state(fam, t) for t in tasks])
    png = plots.heatmap(cos, tasks, f"task-vector cosine similarity (finetune={fam.mode})",
                        fresh_path(run_dir / "cosine.png"), vmin=-0.1, vmax=1.0)
    off = cos[~np.eye(len(tasks), dtype=bool)]
    result = {"tasks": tasks, "cosine": cos.tolist(), "mean_abs_off_diagonal": float(np.abs(off).mean())}
    md = (f"Task-vector cosine similarity; mean |cos| off the diagonal {result['mean_abs_off_diagonal']:.4f}.\n\n"
          + matrix_table(cos, tasks, tasks))
    return result, md, [png]
