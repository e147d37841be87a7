"""The batch of global step s is a pure function of (seed, s), so an interrupted fine-tune resumed at step s
sees exactly the batches an uninterrupted one would, on any number of ranks. With `with_seeds` each sample also
carries a seed for its random augmentation (SeededAugmentation), so the augmented images are a function of
(seed, s) too, whatever the number of DataLoader workers (whose own RNGs restart with every resume).
StepDataLoader hands these batches to Lightning so that each one goes to the step it belongs to, after any
number of resumes: it starts every pass at the trainer's current step, never at a position of its own."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


class StepBatchSampler(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, seed: int, max_steps: int, start_step: int = 0,
                 with_seeds: bool = False):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({n} samples)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.max_steps, self.start_step, self.with_seeds = max_steps, start_step, with_seeds
        self.steps_per_epoch = n // batch_size  # the last partial batch of each epoch is dropped

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self) -> Iterator[list]:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        epoch, perm = -1, None
        for step in range(self.start_step, self.max_steps):
            e, i = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            batch = perm[i * self.batch_size : (i + 1) * self.batch_size].tolist()
            if self.with_seeds:  # one seed per position of the global batch
                base = (self.seed * 1_000_003 + step) * 65_537
                batch = [(idx, base + j) for j, idx in enumerate(batch)]
            yield batch[rank::world]  # each rank its share of the global batch

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)


class StepDataLoader(DataLoader):
    """The training DataLoader over a StepBatchSampler, resumable in Lightning's sense.

    To Lightning the whole fine-tune is one epoch of `max_steps` batches (`len(self)`, whatever step it resumes
    at), and every pass over the loader starts at `step()`, the trainer's global step when the pass begins: the
    batch of step s is the sampler's batch s, after a resume, across the sampler's epochs and whatever Lightning
    restores of its own epoch and batch counters. (Before, a run resumed at step s got a loader of max_steps - s
    batches: Lightning, which restores its batch index s, ended its epoch at step max_steps - s and started the
    sampler again at s, so step max_steps - s trained on the batch of step s, and so on.)

    state_dict / load_state_dict (saved by Lightning in the checkpoint, as `loops.fit_loop.state_dict.
    combined_loader`) hold the step and what the data order depends on: a checkpoint is refused if the order
    it was written under differs, instead of resuming into another data order. A checkpoint without them
    (written before they existed) resumes from its global step all the same.
    """

    def __init__(self, dataset: Dataset, batch_sampler: StepBatchSampler, step: Callable[[], int],
                 **kwargs: Any):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.step = step

    def __len__(self) -> int:
        return self.batch_sampler.max_steps

    def __iter__(self):
        self.batch_sampler.start_step = self.step()  # read by the sampler when its pass begins
        return super().__iter__()

    def _order(self) -> dict[str, int]:
        sampler = self.batch_sampler
        return {"n": sampler.n, "batch_size": sampler.batch_size, "seed": sampler.seed,
                "max_steps": sampler.max_steps}

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step(), **self._order()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = {k: state.get(k) for k in ("step", *self._order())}
        expected = {"step": self.step(), **self._order()}
        if saved != expected:
            raise ValueError(
                f"the fine-tuning checkpoint being resumed was written with data order {saved}, this run's is "
                f"{expected}: it cannot resume to the weights of an uninterrupted run; delete the checkpoint's "
                "`.partial` directory (the log's `resuming from` line names the checkpoint) to fine-tune from the "
                "start")


class SeededAugmentation(Dataset):
    """dataset[i] computed with torch's CPU generator and Python's RNG seeded by the sample's seed: keys are
    (index, seed) pairs from StepBatchSampler(with_seeds=True). The caller's RNG states are left as they were.

    Only the CPU generator is seeded (`torch.default_generator`, which is what `torch.manual_seed` seeds on the
    CPU): `torch.manual_seed` also queues the seed for CUDA, XPU and MTIA and, while those are not initialised,
    formats the whole Python stack for each, about 2.5 ms per sample inside Lightning's deep stack."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        py_state = random.getstate()  # some transforms draw from Python's random
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
