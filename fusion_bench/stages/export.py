"""The export stage: the merged model written into the run dir in the format `output.format` names
(fusion_bench.export): a plain dict of merge-space weights, or a task-specific merge (then one model per task)."""

from __future__ import annotations

import logging
from pathlib import Path

from fusion_bench.export import check_output, output_path
from fusion_bench.families.base import ModelFamily
from fusion_bench.merging.task_specific import TaskSpecificMerge
from fusion_bench.stages.merge import Method, save_merge

log = logging.getLogger(__name__)


def _models(merged, tasks: list[str]):
    """(task, merge-space weights): one per task for a task-specific merge, made one at a time; else (None, merged)."""
    if isinstance(merged, TaskSpecificMerge):
        for i, task in enumerate(tasks):
            yield task, merged.task_weights(i)
    else:
        yield None, merged


def export_merge(fam: ModelFamily, method: Method, merged, run_dir: Path, tasks: list[str]) -> list[Path]:
    """Write the merge as output.format says; returns what was written (files or folders). A task-specific merge
    is always written as task_specific.safetensors, and for the other formats also as one model per task."""
    fmt, adapters = check_output(type(fam), fam.cfg)
    if fmt is None:
        log.info("merged model not written (output.format=null)")
        return []
    task_specific = isinstance(merged, TaskSpecificMerge)
    written = [save_merge(merged, run_dir, tasks)] if fmt == "safetensors" or task_specific else []
    if fmt != "safetensors":
        for task, weights in _models(merged, tasks):
            written.append(fam.write_merged(weights, fmt, output_path(run_dir, fmt, adapters, task),
                                            linearized=method.evaluate_linearized, adapters=adapters))
    for path in written:
        log.info("merged model written to %s (output.format=%s%s)", path, fmt, ", adapters" if adapters else "")
    return written
