"""Fetch the public copies of a benchmark's data sets into the layouts the loaders read (`make data`):

    python -m fusion_bench.data.prepare eight_tasks --root ~/data [--tasks mnist,svhn] [--hf dtd=tanganke/dtd]
    python -m fusion_bench.data.prepare glue --root ~/data

Sources (fusion_bench/data/prepare/sources.py): torchvision's download URLs for MNIST, SVHN, GTSRB, EuroSAT
and DTD (md5-checked, unpacked where torchvision's `download=True` would), Hugging Face `datasets` copies for
SUN397, Cars, RESISC45 (tanganke/*) and GLUE (nyu-mll/glue), saved with `DatasetDict.save_to_disk`. `--hf
TASK=ID_OR_FOLDER` takes a task from another Hub id or a local copy instead.

Each task is checked by the real loaders (fusion_bench/data/eight_tasks.py, fusion_bench/data/glue.py) against
the official split sizes (fusion_bench/data/split_sizes.py), and only then marked complete (<task
dir>/.prepared.json, written atomically). A rerun skips complete tasks, marks a copy that is already there and
counts right, and picks up an interrupted download (archives already on disk with the right md5 are kept).
Before downloading anything, every host still needed is asked once with a short timeout: without network it
stops at once, names what it could not reach and how to lay the data out by hand. Nothing is overwritten: a
Hugging Face copy is written to <root>/.prepare-tmp/ and renamed into place only where the task folder is
absent or empty.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .benchmarks import BENCHMARKS, Benchmark
from .fetch import FetchError, fetch_hf, fetch_torchvision
from .marker import is_complete, read_marker, write_marker
from .network import OfflineError, check_reachable
from .sources import HFSource, Source, TorchvisionSource, glue_source
from .summary import log_summary

log = logging.getLogger(__name__)
STAGING = ".prepare-tmp"


class PrepareError(RuntimeError):
    """Some tasks could not be prepared; `results` holds every task's outcome."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


@dataclass
class Result:
    task: str
    source: str
    status: str  # complete (marker found) | verified (copy found, now marked) | fetched | failed
    sizes: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None


def _disk_bytes(folder: Path) -> int | None:
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _sources(bench: Benchmark, tasks: list[str], hf: dict[str, str]) -> dict[str, Source]:
    out = {}
    for task in tasks:
        if task not in hf:
            out[task] = bench.default_source(task)
        elif bench.name == "glue":
            out[task] = glue_source(task, hf[task])
        else:
            out[task] = HFSource(hf[task], ("train", "test"))
    return out


def _existing_counts(bench: Benchmark, root: Path, task: str) -> dict[str, int] | str | None:
    """The loaders' count of a copy already in place; None if there is none, the error if it cannot be
    read."""
    try:
        return bench.count(root, task)
    except FileNotFoundError:  # eight_tasks' DatasetNotFoundError, GLUE's missing TSVs
        return None
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        return f"{type(e).__name__}: {e}"


def _offline_message(bench: Benchmark, root: Path, failed: dict[str, list[str]]) -> str:
    lines = [(f"prepare {bench.name}: cannot reach the hosts these data sets come from (no network?); "
              "nothing was downloaded.")]
    lines += [f"  {task}: could not reach {', '.join(why)}" for task, why in failed.items()]
    lines += ["Lay them out by hand instead (or run this where the hosts answer and copy the folder over):"]
    lines += [f"  {task}: {bench.by_hand(root, task)}" for task in failed]
    lines += [("A Hugging Face copy already in the local cache is read with HF_HUB_OFFLINE=1; a local copy "
               "with --hf TASK=FOLDER (a save_to_disk folder or parquet files).")]
    return "\n".join(lines)


def _checked(bench: Benchmark, root: Path, task: str, expected: dict[str, int], where: Path
             ) -> dict[str, int]:
    counts = bench.count(root, task)
    if counts != expected:
        raise FetchError(f"{task}: the loaders count {counts} in {where}, not the official {expected} "
                         f"(fusion_bench/data/split_sizes.py); move {where} away and rerun")
    return counts


def _fetch_torchvision(bench: Benchmark, root: Path, task: str, source: TorchvisionSource,
                       expected: dict[str, int], keep_archives: bool) -> dict[str, int]:
    files = fetch_torchvision(source, root)
    counts = _checked(bench, root, task, expected, bench.task_dir(root, task))
    write_marker(bench.task_dir(root, task), task, source.describe(), counts)
    if not keep_archives:
        for f in files:
            f.unlink(missing_ok=True)
    return counts


def _fetch_hf(bench: Benchmark, root: Path, task: str, source: HFSource, expected: dict[str, int],
              cache_dir: str | None) -> dict[str, int]:
    staging_root = root / STAGING
    staging = bench.task_dir(staging_root, task)
    target = bench.task_dir(root, task)
    if target.exists() and any(target.iterdir()):
        raise FetchError(f"{task}: {target} already holds files that are not a complete copy; move it away "
                         f"(or finish it by hand) and rerun")
    if staging.exists():  # left by an interrupted earlier run
        shutil.rmtree(staging)
    fetch_hf(source, staging, cache_dir)
    counts = _checked(bench, staging_root, task, expected, staging)
    if target.exists():
        target.rmdir()  # empty (checked above)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, target)
    write_marker(target, task, source.describe(), counts)
    for folder in (staging.parent, staging_root):  # glue/ inside the staging root, then the root itself
        if folder.is_dir() and folder != root and not any(folder.iterdir()):
            folder.rmdir()
    return counts


def prepare(benchmark: str, root: str | Path, tasks: list[str] | None = None,
            hf: dict[str, str] | None = None, cache_dir: str | None = None, timeout: float = 5.0,
            keep_archives: bool = False) -> dict[str, Result]:
    """Fetch and check every task of `benchmark` (eight_tasks | glue) under `root`; see the module doc."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[benchmark]
    root = Path(root).expanduser()
    tasks = list(tasks or bench.tasks)
    hf = dict(hf or {})
    unknown = sorted({*tasks, *hf} - set(bench.tasks))
    if unknown:
        raise ValueError(f"unknown {benchmark} task(s) {unknown} (in --tasks / --hf); the tasks are "
                         f"{bench.tasks}")
    sources = _sources(bench, tasks, hf)
    results: dict[str, Result] = {}
    todo: dict[str, Source] = {}
    for task in tasks:
        expected, where = bench.sizes()[task], bench.task_dir(root, task)
        res = Result(task, sources[task].describe(), "complete", dict(expected), dict(expected))
        if is_complete(where, expected):
            res.source = read_marker(where).get("source", res.source)  # where the copy came from
            results[task] = res
            continue
        found = _existing_counts(bench, root, task)
        if found == expected:
            write_marker(where, task, "found in place", found)
            res.status = "verified"
            results[task] = res
        else:
            if found is not None:
                log.info("%s: the copy in %s counts %s, not the official %s: fetching", task, where, found,
                         expected)
            todo[task] = sources[task]
    failed = check_reachable(todo, root, timeout)
    if failed:
        raise OfflineError(_offline_message(bench, root, failed))
    for task, source in todo.items():
        expected, t0 = bench.sizes()[task], time.perf_counter()
        res = results[task] = Result(task, source.describe(), "fetched", expected=dict(expected))
        log.info("%s: fetching from %s", task, source.describe())
        try:
            if isinstance(source, TorchvisionSource):
                res.sizes = _fetch_torchvision(bench, root, task, source, expected, keep_archives)
            else:
                res.sizes = _fetch_hf(bench, root, task, source, expected, cache_dir)
        except (FetchError, OSError, RuntimeError, ValueError, ImportError) as e:
            res.status, res.error = "failed", f"{type(e).__name__}: {e}"
            log.error("%s: %s\n  by hand instead: %s", task, res.error, bench.by_hand(root, task))
        res.seconds = time.perf_counter() - t0
    for task, res in results.items():
        res.bytes = _disk_bytes(bench.task_dir(root, task))
    results = {t: results[t] for t in tasks}
    log_summary(bench.name, root, results)
    bad = {t: r for t, r in results.items() if r.status == "failed"}
    if bad:
        raise PrepareError(f"prepare {benchmark}: {len(bad)} of {len(results)} task(s) failed:\n"
                           + "\n".join(f"  {t}: {r.error}\n    by hand instead: {bench.by_hand(root, t)}"
                                       for t, r in bad.items()), results)
    return results
