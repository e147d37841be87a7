"""The marker of a finished task: <task dir>/.prepared.json, written atomically once the loaders counted the
official sizes. A task with a marker whose sizes are today's official ones is skipped."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fusion_bench.store import atomic_write_text

MARKER = ".prepared.json"


def read_marker(task_dir: Path) -> dict | None:
    path = task_dir / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a marker we cannot read marks nothing


def is_complete(task_dir: Path, expected: dict[str, int]) -> bool:
    marker = read_marker(task_dir)
    return marker is not None and marker.get("sizes") == expected


def write_marker(task_dir: Path, task: str, source: str, sizes: dict[str, int]) -> Path:
    record = {"task": task, "source": source, "sizes": sizes,
              "verified_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return atomic_write_text(task_dir / MARKER, json.dumps(record, indent=2) + "\n")
