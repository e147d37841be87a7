"""Per-sample outputs of a CLIP encoder on one task's split in one pass: predictions, cross-entropy, and on request
the encoder's features and the head's logits. What the analyses compare between models (disentanglement of
predictions or of features, the loss landscape, the kernel analysis)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn
from torch.utils.data import DataLoader

from fusion_bench.evaluation.accuracy import eval_mode
from fusion_bench.models.heads import head_logits


@dataclass
class Outputs:
    pred: torch.Tensor  # [N] argmax of the logits
    loss: torch.Tensor  # [N] cross-entropy of the logits against the labels (fp32)
    labels: torch.Tensor  # [N]
    features: torch.Tensor | None = None  # [N, D] encoder outputs (before the head's normalisation), fp32
    logits: torch.Tensor | None = None  # [N, C] fp32

    @property
    def accuracy(self) -> float:
        return (self.pred == self.labels).double().mean().item()


@torch.no_grad()
def task_outputs(fam, encoder: nn.Module, task: str, split: str, features: bool = False,
                 logits: bool = False) -> Outputs:
    """`encoder` on task `task`'s split with the task's head (fam.head: zero-shot or trained), where and at the
    precision the family evaluates (fam.eval_where); logits and features in fp32."""
    where, head = fam.eval_where, fam.head(task)
    device, autocast = where["device"], where["autocast"]
    data = fam.task(task).split(split)
    loader = DataLoader(data, batch_size=fam.cfg.model.eval_batch_size, shuffle=False,
                        num_workers=where.get("num_workers", 0), pin_memory=device.type == "cuda")
    home = next(encoder.parameters()).device
    out: dict[str, list[torch.Tensor]] = {"pred": [], "loss": [], "labels": [], "features": [], "logits": []}
    try:
        with eval_mode(encoder.to(device)):
            for x, y in track(loader, description=f"outputs on {task}", transient=True, disable=len(data) < 5000):
                y = torch.as_tensor(y)
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    f = encoder(x.to(device, non_blocking=True))
                lg = head_logits(f, head.to(device)).cpu()
                out["pred"].append(lg.argmax(dim=-1))
                out["loss"].append(F.cross_entropy(lg, y, reduction="none"))
                out["labels"].append(y)
                if features:
                    out["features"].append(f.float().cpu())
                if logits:
                    out["logits"].append(lg)
    finally:
        encoder.to(home)
    cat = {k: torch.cat(v) if v else None for k, v in out.items()}
    return Outputs(**cat)
