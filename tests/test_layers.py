"""Every import points down: each folder (or top-level module) of fusion_bench imports only what lies below it,
lazy imports inside functions included. The order, top to bottom (docs/architecture.md "Layout"):"""

import ast
from pathlib import Path

import pytest

LAYERS = [
    ["sweep_callback"],
    ["hparams", "entry"],
    ["pipeline"],
    ["benchmarks", "analyses"],
    ["t5", "clip", "stages"],
    ["evaluation", "families"],
    ["models", "export"],
    ["data", "finetune", "reporting", "keys"],
    ["store"],
    ["merging"],
    ["statistics", "validation"],
    ["devices", "errors"],
]
LEVEL = {room: len(LAYERS) - i for i, rooms in enumerate(LAYERS) for room in rooms}
PACKAGE = Path(__file__).resolve().parent.parent / "fusion_bench"


def _room(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_rooms(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module + "." + a.name for a in node.names] if node.module == "fusion_bench" else [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: inside the same room
            continue
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "fusion_bench" and len(parts) > 1:
                yield parts[1], node.lineno


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


def test_every_room_is_in_the_order():
    rooms = {_room(p) for p in FILES}
    assert rooms == set(LEVEL), f"rooms missing from LAYERS: {rooms - set(LEVEL)}; gone: {set(LEVEL) - rooms}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up(path):
    here = _room(path)
    up = [(room, line) for room, line in _imported_rooms(path)
          if room != here and room in LEVEL and LEVEL[room] >= LEVEL[here]]
    assert not up, f"{path.relative_to(PACKAGE)} ({here}) imports from the same level or above: {up}"
