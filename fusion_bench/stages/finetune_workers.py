"""The fine-tunes a run needs, on every core: one worker process per core (finetune.workers), one thread each.

On the CPU trainer every fine-tune runs on one thread, however many run at once (finetune.workers=1 included): a
matmul's sums split differently over one and two threads, and a 300-step tiny fine-tune made on two threads differs
from the one-thread one by up to 1e-3 in a weight. On one thread a stored fine-tune is the same bytes on any
machine, alone or beside others, in any order (tests/test_finetune_workers.py), so neither the thread count nor the
number of workers is part of the store's key (fusion_bench/keys.py).

Workers are forked from the run once the family has read the pretrained model and hashed it, so nothing is loaded
twice; each trains whole tasks through `ensure_finetuned` (store lock, atomic writes), writes its console output to
the run dir's finetune_<task>.log and sends its steps to the run's display. A fine-tune that fails is named with its
error and its log; the others go on and keep their checkpoints; then the run stops.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import queue as queue_module
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from fusion_bench.errors import ConfigError, UserError, one_line
from fusion_bench.families.base import ModelFamily
from fusion_bench.finetune.progress import FinetuneDisplay, reporting_to
from fusion_bench.reporting.memory import peak_children_gib, release
from fusion_bench.stages.finetune import ensure_finetuned

log = logging.getLogger(__name__)


class FinetuneFailed(RuntimeError):
    """Fine-tunes run in worker processes failed; the message names each task, its error and its log."""


class FinetuneUserError(FinetuneFailed, UserError):
    """As FinetuneFailed, where every failure was an error the user can fix from its message (one line)."""


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def on_one_cpu_process(cfg: DictConfig) -> bool:
    """Fine-tunes run in this process on the CPU (trainer=cpu), not on a GPU nor over DDP ranks."""
    return str(cfg.trainer.get("accelerator", "cpu")) == "cpu" and "ddp" not in str(cfg.trainer.get("strategy", ""))


def workers(cfg: DictConfig) -> int:
    """finetune.workers: `auto` is one per core on the CPU trainer and 1 on a GPU or over DDP ranks."""
    w = cfg.finetune.get("workers", "auto")
    if w == "auto":
        return cores() if on_one_cpu_process(cfg) and hasattr(os, "fork") else 1
    return int(w)


def check(cfg: DictConfig) -> None:
    """Refuse several workers where fine-tunes cannot run side by side (before anything trains)."""
    w = cfg.finetune.get("workers", "auto")
    if w in ("auto", 1):
        return
    if not on_one_cpu_process(cfg):
        raise ConfigError(f"finetune.workers={w}: fine-tunes run side by side on the CPU trainer only; with "
                          f"trainer.accelerator={cfg.trainer.get('accelerator')} (strategy "
                          f"{cfg.trainer.get('strategy', 'auto')}) they run one at a time: set finetune.workers=1 "
                          f"or auto")
    if not hasattr(os, "fork"):
        raise ConfigError(f"finetune.workers={w}: worker processes are forked, which this platform cannot do; "
                          f"set finetune.workers=1")


@contextmanager
def one_thread(cfg: DictConfig) -> Iterator[None]:
    """The thread count of a fine-tune on the CPU (see the module doc); unchanged on a GPU."""
    if not on_one_cpu_process(cfg):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def finetune_tasks(fam: ModelFamily, tasks: list[str], log_dir: Path) -> None:
    """Make every missing fine-tune of `tasks`: the user's files are read and checked first, then the fine-tunes
    train, finetune.workers at a time."""
    todo = []
    for task in sorted(tasks, key=lambda t: fam.imported(t) is None):  # the user's files checked before training
        if fam.checkpoint(task).is_file() or fam.imported(task) is not None:
            ensure_finetuned(fam, task)  # reused, or imported (read and checked, not trained)
        else:
            todo.append(task)
    n = min(workers(fam.cfg), len(todo))
    if n <= 1:
        _in_this_process(fam, todo)
    else:
        _in_workers(fam, todo, n, log_dir)


def _in_this_process(fam: ModelFamily, todo: list[str]) -> None:
    if not todo:
        return
    show = FinetuneDisplay() if not fam.ddp else nullcontext()  # the ranks of ddp_spawn draw Lightning's bar
    with one_thread(fam.cfg), show as display:
        for task in todo:
            with reporting_to(display.sink(task)) if display else nullcontext():
                ensure_finetuned(fam, task)
            if display:
                display.finished(task, "done")
            release()  # the trainer, the optimiser state and the training copy go with it


# ---- worker processes ---------------------------------------------------------------------------------------------
_family: ModelFamily | None = None  # what the forked workers inherit
_log_dir: Path | None = None
_steps: mp.Queue | None = None


def _in_workers(fam: ModelFamily, todo: list[str], n: int, log_dir: Path) -> None:
    global _family, _log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    steps = ctx.Queue()
    _family, _log_dir = fam, log_dir
    log.info("fine-tuning %d tasks in %d worker processes, one thread each (finetune.workers; logs: %s)",
             len(todo), n, log_dir / "finetune_<task>.log")
    failures = {}
    gc.freeze()  # what the workers inherit stays out of their collections: each would copy and walk all of it
    try:
        # every worker is forked at the first submit, before the display starts its thread
        pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_start_worker, initargs=(steps,))
        with pool, FinetuneDisplay() as display:
            running = {pool.submit(_train, task): task for task in todo}
            while running:
                done, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(steps, display)
                for future in done:
                    task = running.pop(future)
                    try:
                        failure = future.result()
                    except BrokenProcessPool as e:  # the worker process died (killed, out of memory)
                        why = "a worker process died (killed? out of memory?) while this fine-tune ran or waited"
                        failure = (False, f"{why} ({type(e).__name__})")
                    display.finished(task, "done" if failure is None else "[red]failed")
                    if failure is not None:
                        failures[task] = failure
            _drain(steps, display)
    finally:
        gc.unfreeze()
        _family = _log_dir = None
    log.info("fine-tune workers: the largest peaked at RSS %.2f GiB", peak_children_gib())
    if failures:
        lines = [f"fine-tune of task {t!r} failed: {msg} (log: {log_dir / f'finetune_{t}.log'})"
                 for t, (_, msg) in failures.items()]
        kept = [t for t in todo if t not in failures]
        error = FinetuneUserError if all(user for user, _ in failures.values()) else FinetuneFailed
        raise error("\n".join(lines + [f"the other fine-tunes are in the store: {', '.join(kept) or 'none'}"]))


def _drain(steps: mp.Queue, display: FinetuneDisplay) -> None:
    while True:
        try:
            task, *progress = steps.get_nowait()
        except queue_module.Empty:
            return
        display.update(task, *progress)


def _start_worker(steps: mp.Queue) -> None:
    global _steps
    torch.set_num_threads(1)
    _steps = steps
    root = logging.getLogger()  # the console belongs to the run's display: log to the run's files only
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)


def _train(task: str) -> tuple[bool, str] | None:
    """One fine-tune in a worker; None, or (a user's error?, the error on one line) with the traceback in the log."""
    with _output_to(_log_dir / f"finetune_{task}.log"):
        try:
            with reporting_to(lambda *progress: _steps.put((task, *progress))):
                ensure_finetuned(_family, task)
            return None
        except Exception as e:  # whatever fails, the run names the task and the log
            log.exception("the fine-tune of %s failed", task)  # the traceback, in the task's log
            return isinstance(e, UserError), f"{type(e).__name__}: {one_line(e)}"


@contextmanager
def _output_to(path: Path) -> Iterator:
    """This process's stdout and stderr (Lightning's and the libraries' prints, warnings) into `path`."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
