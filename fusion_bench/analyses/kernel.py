"""analysis=kernel: how far a fine-tune is from its kernel (NTK) regime.

For the fine-tune theta* of task t in a non-linear mode (standard, attention, linear_layers, lora), compare
f(x; theta*) with its post-hoc linearization in the SAME trainable parameters (models/modes.py
posthoc_linearized): f_lin(x) = f(x; theta_0) + J (theta* - theta_0), one torch.func.jvp per batch. Reported per
task on `analysis.split` (test):
- acc_finetuned, acc_linearized, gap = acc_finetuned - acc_linearized (the "kernel gap" of the attention-only
  and tangent-space papers), acc_pretrained;
- rel_dist_logits = ||L_f - L_lin||_F / ||L_f - L_0||_F over the logits L [N, C] of the whole split (the task's
  head on the normalised features: what accuracy reads), and rel_dist_features, the same over the encoder's
  output features [N, D] before normalisation. 0: the fine-tune is exactly linear in its weights; 1: the
  linearization's error is as large as the whole change fine-tuning made.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from fusion_bench.analyses.common import chosen_tasks
from fusion_bench.analyses.outputs import task_outputs
from fusion_bench.models.modes import check_posthoc_mode, load_trainable, posthoc_linearized
from fusion_bench.reporting import plots
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import md_table
from fusion_bench.stages.finetune import finetuned_state, stored_trainable

log = logging.getLogger(__name__)


def relative_distance(f: torch.Tensor, f_lin: torch.Tensor, f0: torch.Tensor) -> float:
    """||f - f_lin||_F / ||f - f_0||_F (inf when the fine-tune did not move the outputs)."""
    den = torch.linalg.norm((f - f0).double())
    return float(torch.linalg.norm((f - f_lin).double()) / den) if den > 0 else float("inf")


def kernel_task(fam, task: str, split: str) -> dict:
    """The kernel figures of one task's fine-tune (see the module docstring)."""
    linearized = posthoc_linearized(fam.mode_cfg, fam.encoder)
    load_trainable(linearized, dict(stored_trainable(fam, task).items())).requires_grad_(False).eval()
    models = {"pretrained": fam.encoder, "finetuned": fam.model_with(finetuned_state(fam, task)),
              "linearized": linearized}
    out = {k: task_outputs(fam, m, task, split, features=True, logits=True) for k, m in models.items()}
    acc = {k: o.accuracy for k, o in out.items()}
    f, lin, f0 = out["finetuned"], out["linearized"], out["pretrained"]
    return {"acc_pretrained": acc["pretrained"], "acc_finetuned": acc["finetuned"],
            "acc_linearized": acc["linearized"], "gap": acc["finetuned"] - acc["linearized"],
            "rel_dist_logits": relative_distance(f.logits, lin.logits, f0.logits),
            "rel_dist_features": relative_distance(f.features, lin.features, f0.features)}


def run(fam, method, cfg, run_dir: Path, method_name: str) -> tuple[dict, str, list[Path]]:
    tasks, split = chosen_tasks(fam, cfg.tasks), str(cfg.split)
    check_posthoc_mode(fam.mode_cfg)  # a linear / l_lora run stops here, before any evaluation
    per_task = {}
    for t in track(tasks, description=f"kernel ({fam.mode})"):
        per_task[t] = kernel_task(fam, t, split)
        log.info("kernel %s %s: %s", fam.mode, t, {k: round(v, 4) for k, v in per_task[t].items()})
    keys = list(next(iter(per_task.values())))
    mean = {k: float(np.mean([r[k] for r in per_task.values()])) for k in keys}
    result = {"tasks": tasks, "split": split, "per_task": per_task, "average": mean,
              "distance_over": "logits (rel_dist_logits) and encoder features (rel_dist_features) of the split"}
    png = plots.bars(tasks + ["average"],
                     {"f(x; theta*)": [r["acc_finetuned"] for r in per_task.values()] + [mean["acc_finetuned"]],
                      "f(x; theta_0) + J (theta* - theta_0)":
                          [r["acc_linearized"] for r in per_task.values()] + [mean["acc_linearized"]],
                      "||f - f_lin|| / ||f - f_0|| (logits)":
                          [r["rel_dist_logits"] for r in per_task.values()] + [mean["rel_dist_logits"]]},
                     f"fine-tuned vs post-hoc linearized (finetune={fam.mode}, {split})", "accuracy / distance",
                     fresh_path(run_dir / "kernel.png"))
    rows = [[t, *(r[k] for k in keys)] for t, r in per_task.items()] + [["**average**", *(mean[k] for k in keys)]]
    md = (f"Fine-tuned f(x; theta*) vs its post-hoc linearization f(x; theta_0) + J (theta* - theta_0) in the "
          f"parameters finetune={fam.mode} trains, on {split}. gap = acc_finetuned - acc_linearized; rel_dist = "
          f"||f - f_lin||_F / ||f - f_0||_F over the split's logits / encoder features.\n\n" + md_table(["task", *keys], rows))
    return result, md, [png]
