"""The batch of global step s is a pure function of (seed, s), so an interrupted fine-tune resumed at step s
sees exactly the batches an uninterrupted one would, on any number of ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, seed: int, max_steps: int, start_step: int = 0):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({n} samples)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.max_steps, self.start_step = max_steps, start_step
        self.steps_per_epoch = n // batch_size  # the last partial batch of each epoch is dropped

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        epoch, perm = -1, None
        for step in range(self.start_step, self.max_steps):
            e, i = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            batch = perm[i * self.batch_size : (i + 1) * self.batch_size]
            yield batch[rank::world].tolist()  # each rank its share of the global batch

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)
