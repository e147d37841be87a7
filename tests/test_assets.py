"""The class-name / prompt-template tables in fusion_bench/assets/*.json: well-formed, and what the modules load."""

import json
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from fusion_bench.data import eight_tasks, eight_tasks_names, imagenet_names

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "fusion_bench" / "assets"
# published class counts of the eight tasks (test_eight_tasks.py uses the same)
NUM_CLASSES = {"sun397": 397, "cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43, "mnist": 10,
               "dtd": 47}
GROUP = {"svhn": "digits", "mnist": "digits"}  # table group in eight_tasks_names.json; others: the task name


def _json(name):
    with open(ASSETS / name, encoding="utf-8") as f:
        return json.load(f)


def _check_templates(templates):
    assert templates and all(isinstance(t, str) for t in templates)
    assert len(set(templates)) == len(templates)
    for t in templates:
        assert t.count("{}") == 1 and t.replace("{}", "").count("{") == 0 and "}" not in t.replace("{}", ""), t
        assert t.format("x")  # a plain format string


def test_imagenet_json():
    data = _json("imagenet_names.json")
    assert set(data) == {"wnids", "classes", "templates"}
    wnids, classes = data["wnids"], data["classes"]
    assert len(wnids) == len(classes) == 1000
    assert len(set(wnids)) == 1000 and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids == sorted(wnids)  # the sorted folder order defines the class indices
    assert all(isinstance(c, str) and c for c in classes)
    assert len(data["templates"]) == 80
    _check_templates(data["templates"])


def test_imagenet_module_matches_json():
    data = _json("imagenet_names.json")
    for name, key in (("IMAGENET_WNIDS", "wnids"), ("IMAGENET_CLASSES", "classes"),
                      ("IMAGENET_TEMPLATES", "templates")):
        value = getattr(imagenet_names, name)
        assert type(value) is tuple and value == tuple(data[key]), name


def test_eight_tasks_json():
    data = _json("eight_tasks_names.json")
    assert set(data) == {GROUP.get(t, t) for t in NUM_CLASSES}
    assert set(eight_tasks.TASKS) == set(NUM_CLASSES)
    for task, n in NUM_CLASSES.items():
        table = data[GROUP.get(task, task)]
        classes = table["classes"]
        assert len(classes) == n, task
        assert all(isinstance(c, str) and c for c in classes), task
        assert len(set(classes)) == len(classes), task
        _check_templates(table["templates"])
    folders = data["eurosat"]["folders"]
    assert len(folders) == 10 and folders == sorted(folders) and len(set(folders)) == 10
    assert data["digits"]["classes"] == [str(i) for i in range(10)]


@pytest.mark.parametrize("task", sorted(NUM_CLASSES))
def test_eight_tasks_module_matches_json(task):
    table = _json("eight_tasks_names.json")[GROUP.get(task, task)]
    t = eight_tasks.TASKS[task]
    assert type(t.classnames) is tuple and t.classnames == tuple(table["classes"])
    assert type(t.templates) is tuple and t.templates == tuple(table["templates"])
    if task == "eurosat":
        assert t.folder_keys == eight_tasks_names.EUROSAT_FOLDERS == tuple(table["folders"])


def test_json_assets_are_package_data():
    with open(ROOT / "pyproject.toml", "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["fusion_bench"]
    for p in ASSETS.glob("*.json"):
        rel = p.relative_to(ROOT / "fusion_bench").as_posix()
        assert any(fnmatch(rel, pat) for pat in patterns), rel
