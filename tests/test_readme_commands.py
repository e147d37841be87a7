"""Every command the README and docs/ show runs as written: each `python run.py ...` composes with Hydra and passes
the validation pass or stops with a user error naming what is missing (weights, data, a GPU), never Hydra's own
"Could not override" or a traceback; each `make <target>` is a target of the Makefile. (The default run itself is
run end to end by the pipeline tests; here every documented command is checked in seconds.)"""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fusion_bench.errors import UserError
from fusion_bench.pipeline import validate_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(pattern: str) -> list[tuple[str, str]]:
    """(file:line, command) for every line of a Markdown file that runs `pattern`, in code blocks and backticks."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        for i, line in enumerate(lines, 1):
            j = i
            while line.rstrip().endswith("\\") and j < len(lines):  # a shell line continued on the next
                line, j = line.rstrip()[:-1] + " " + lines[j].strip(), j + 1
            for cmd in re.findall(rf"`?({pattern}[^`#\n]*)", line):
                found.append((f"{doc.relative_to(ROOT)}:{i}", cmd.strip()))
    return found


def _overrides(command: str) -> list[str]:
    """The overrides of one job of the command: a sweep's first value of each comma list."""
    words = [w for w in shlex.split(command)[2:] if w not in ("-m", "--multirun")
             and not (w.startswith("[") and w.endswith("]"))  # [optional] in the text
             and not re.fullmatch(r"[\w.+~/]+=(interval|range|choice|tag|glob)\(.*\)", w)]  # the sweeper's to choose
    if any(w.startswith("-") for w in words) or any("$" in w or "..." in w or "<" in w for w in words):
        return []  # Hydra flags (--cfg job, --help) or a placeholder of the text: not a runnable example
    if "-m" in command.split() or "--multirun" in command.split():
        words = [w.split("=", 1)[0] + "=" + _first(w.split("=", 1)[1]) if "=" in w else w for w in words]
    return words


def _first(value: str) -> str:
    if value.startswith(("[", "{", "'", '"')) or "range(" in value:
        return value
    return value.split(",")[0]


RUNS = [c for c in _commands(r"python run\.py") if _overrides(c[1]) or c[1].strip() == "python run.py"]


def test_the_docs_show_run_commands():
    assert len(RUNS) >= 20  # the README's quick start and the docs' examples


@pytest.mark.parametrize(("where", "command"), RUNS, ids=[w for w, _ in RUNS])
def test_each_documented_run_command_composes_and_validates(where, command, tmp_path, monkeypatch):
    overrides = _overrides(command)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine: a GPU trainer is refused clearly
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"paths.root={tmp_path}"])
    except (HydraException, OmegaConfBaseException) as e:
        pytest.fail(f"{where}: `{command}` does not compose: {e}")
    try:
        validate_config(cfg)
    except (UserError, RuntimeError) as e:  # missing weights / data / GPU: refused before any work, with a message
        assert str(e).strip(), f"{where}: `{command}` fails without a message"


MAKES = sorted({(w, m) for w, c in _commands(r"make [a-z][a-z0-9-]*") for m in re.findall(r"make ([a-z][a-z0-9-]*)", c)
                if m not in ("sure", "it", "a", "the", "one", "them", "by")})


def test_each_documented_make_target_exists():
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    missing = [(w, m) for w, m in MAKES if m not in targets]
    assert not missing, f"make targets the docs name that the Makefile lacks: {missing}"
    dry = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, check=False, timeout=30)
    assert dry.returncode == 0 and "run.py" in dry.stdout
