"""What `prepare` needs to know of a benchmark: its tasks, the official sizes, where a task lives under the
data root, how the real loaders count a copy, and how to lay a task out by hand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion_bench.data import split_sizes

from . import sources


@dataclass(frozen=True)
class Benchmark:
    name: str
    sizes: Callable[[], dict[str, dict[str, int]]]        # task -> split -> official size (read at call time)
    default_source: Callable[[str], sources.Source]
    task_dir: Callable[[Path, str], Path]                 # where the task's copy (and its marker) lives
    count: Callable[[Path, str], dict[str, int]]          # split -> size, read by the real loaders
    by_hand: Callable[[Path, str], str]                   # the layout to make by hand

    @property
    def tasks(self) -> list[str]:
        return list(self.sizes())


# ---- eight_tasks -------------------------------------------------------------------------------------------
def _eight_count(root: Path, task: str) -> dict[str, int]:
    from fusion_bench.data.eight_tasks import TASKS, DatasetFormatError, find_layout

    layout, where = find_layout(task, root)
    out = {}
    for split in split_sizes.EIGHT_TASKS[task]:
        labels = layout.open(TASKS[task], where, split).labels
        n = len(TASKS[task].classnames)
        if len(labels) and (int(np.min(labels)) < 0 or int(np.max(labels)) >= n):
            raise DatasetFormatError(f"{task}: {split} labels outside [0, {n}) in {where}")
        out[split] = len(labels)
    return out


def _eight_by_hand(root: Path, task: str) -> str:
    from fusion_bench.data.eight_tasks import LAYOUTS

    native = LAYOUTS[task][0].describe.replace("<D>", str(root))
    return (f"{native}; or a Hugging Face datasets copy in {root / task}/ (DatasetDict.save_to_disk, or the "
            f"Hub parquet files data/train-*.parquet, data/test-*.parquet)")


EIGHT_TASKS = Benchmark(
    "eight_tasks", lambda: split_sizes.EIGHT_TASKS, lambda task: sources.EIGHT_TASKS[task],
    lambda root, task: root / task, _eight_count, _eight_by_hand)


# ---- GLUE --------------------------------------------------------------------------------------------------
def _glue_count(root: Path, task: str) -> dict[str, int]:
    from fusion_bench.data.glue import read_split

    return {split: len(read_split(task, root, split)) for split in split_sizes.GLUE[task]}


def _glue_dir(root: Path, task: str) -> Path:
    from fusion_bench.data.glue import task_dir

    return task_dir(root, task)


def _glue_by_hand(root: Path, task: str) -> str:
    from fusion_bench.data.glue import TASKS

    folder = _glue_dir(root, task)
    return (f"{folder}/train.tsv and {folder}/{TASKS[task].dev_file} (the official GLUE TSVs, e.g. from "
            f"download_glue_data.py), or a datasets save_to_disk copy of {sources.GLUE_HUB_ID} ({task}) in "
            f"{folder}/")


GLUE = Benchmark("glue", lambda: split_sizes.GLUE, sources.glue_source, _glue_dir, _glue_count, _glue_by_hand)

BENCHMARKS = {b.name: b for b in (EIGHT_TASKS, GLUE)}
