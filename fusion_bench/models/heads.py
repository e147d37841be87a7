"""What every classifier over features shares: logits of a head over normalised features, in fp32."""

from __future__ import annotations

import torch


def head_logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """head @ normalise(features) in fp32 under any autocast: at CLIP's logit scale (100 x cosine, logits 20-35)
    neighbouring bf16 values are 0.125-0.25 apart, and argmax ties would go to the lowest class index."""
    with torch.autocast(features.device.type, enabled=False):
        f = features.float()
        return (f / f.norm(dim=-1, keepdim=True)) @ head.float().T
