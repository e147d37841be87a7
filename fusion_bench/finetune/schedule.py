"""The learning-rate schedule of every fine-tune: linear warmup, then cosine decay to 0 (a LambdaLR factor)."""

from __future__ import annotations

import math


def cosine_with_warmup(warmup_steps: int, max_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
