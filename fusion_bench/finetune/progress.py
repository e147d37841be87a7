"""Progress of the fine-tunes of a run: one rich display with a line per running fine-tune (step, loss, s/step).

A fine-tune reports through the sink that `reporting_to` installs for the time it trains (the finetune stage sets
one per task, in the run's process or in a worker process, where the sink sends to the run's display through a
queue); `fit_resumable` reports to it whenever one is installed (fusion_bench.finetune.train.StepReporter), and
draws Lightning's own bar otherwise. Lightning is not imported here: a run that trains nothing never loads it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

#: (step, total steps, loss, seconds per step) -> None
Sink = Callable[[int, int, float, float], None]
_sink: Sink | None = None


@contextmanager
def reporting_to(sink: Sink) -> Iterator[None]:
    global _sink
    before, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = before


def current_sink() -> Sink | None:
    return _sink


class FinetuneDisplay:
    """The run's display: a line per fine-tune, added when it starts, kept when it ends."""

    def __init__(self):
        self.progress = Progress(TextColumn("fine-tune [bold]{task.description:<12}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                                 TextColumn("{task.fields[per_step]} s/step"), TextColumn("{task.fields[state]}"),
                                 TimeElapsedColumn())
        self.rows: dict[str, int] = {}

    def __enter__(self) -> FinetuneDisplay:  # noqa: PYI034
        self.progress.__enter__()
        # log lines to the terminal go above the display (through rich's proxy of stdout), not through it
        self.moved = [(h, h.stream) for h in logging.getLogger().handlers
                      if type(h) is logging.StreamHandler and h.stream in (sys.__stdout__, sys.__stderr__)]
        for handler, _ in self.moved:
            handler.setStream(sys.stdout)
        return self

    def __exit__(self, *exc) -> None:
        for handler, stream in self.moved:
            handler.setStream(stream)
        self.progress.__exit__(*exc)

    def sink(self, name: str) -> Sink:
        return lambda step, total, loss, per_step: self.update(name, step, total, loss, per_step)

    def update(self, name: str, step: int, total: int, loss: float, per_step: float) -> None:
        if name not in self.rows:
            self.rows[name] = self.progress.add_task(name, total=total, loss="-", per_step="-", state="")
        self.progress.update(self.rows[name], completed=step, total=total, loss=f"{loss:.3f}",
                             per_step=f"{per_step:.3f}")

    def finished(self, name: str, state: str) -> None:
        if name not in self.rows:  # reused, imported, or failed before its first step
            self.rows[name] = self.progress.add_task(name, total=1, loss="-", per_step="-", state="")
            self.progress.update(self.rows[name], completed=1 if state == "done" else 0)
        self.progress.update(self.rows[name], state=state)
