"""`make gpu-check` (fusion_bench/benchmarks/gpu.py) on the CPU: `--cpu-smoke` runs every item of the GPU check's
plan at tiny sizes, in the GPU machine's situation: the packages it lacks (open_clip_torch, ftfy, wcwidth,
hydra-core, omegaconf, antlr4) are hidden from site-packages and come from wheels (built here from the installed
distributions, so nothing is downloaded), and nevergrad / optuna are hidden with no wheel at all. Self-test items
that fail, outlive their budget and kill their worker must each be recorded while every other item still runs."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fusion_bench.benchmarks import gpu

ROOT = Path(__file__).resolve().parent.parent
#: what the GPU machine lacks and the check installs from wheels; nevergrad and optuna it must not need at all
HIDDEN_SHIPPED = {"open_clip": "open_clip_torch", "ftfy": "ftfy", "wcwidth": "wcwidth", "omegaconf": "omegaconf",
                  "hydra": "hydra-core", "antlr4": "antlr4-python3-runtime"}  # fmt: skip
HIDDEN_UNSHIPPED = ("nevergrad", "optuna")

HIDER = '''
"""Test-only: hides packages of site-packages, as on the GPU machine (they may still come from elsewhere)."""
import importlib.abc, importlib.machinery, os, sys

_HIDDEN = set(os.environ["FUSION_BENCH_TEST_HIDE"].split(","))


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in _HIDDEN:  # submodules are found through their package
            return None
        entries = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p]
        spec = importlib.machinery.PathFinder.find_spec(name, entries)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return spec


sys.meta_path.insert(0, _Hide())
'''


def _wheel_from_installed(dist: str, out: Path) -> Path:
    """A py3-none-any wheel of an installed pure-Python distribution (its RECORD's files)."""
    d = importlib.metadata.distribution(dist)
    name = re.sub(r"[-_.]+", "_", d.metadata["Name"])
    path = out / f"{name}-{d.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for f in d.files or []:
            src = Path(d.locate_file(f))
            if str(f).startswith("..") or "__pycache__" in str(f) or not src.is_file():
                continue
            zf.write(src, str(f))
    return path


def _gpu_machine_env(tmp_path: Path) -> dict[str, str]:
    hider = tmp_path / "hider"
    hider.mkdir()
    (hider / "sitecustomize.py").write_text(HIDER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(hider), str(ROOT)])
    env["FUSION_BENCH_TEST_HIDE"] = ",".join([*HIDDEN_SHIPPED, *HIDDEN_UNSHIPPED])
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusion_bench.benchmarks.gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_wheel_tags():
    assert gpu._wheel_fits("ftfy-6.3.1-py3-none-any.whl", (3, 12))
    assert gpu._wheel_fits("regex-2026.5.9-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", (3, 12))
    assert not gpu._wheel_fits("regex-2026.5.9-cp311-cp311-manylinux2014_x86_64.whl", (3, 12))
    assert not gpu._wheel_fits("regex-2026.5.9-cp312-cp312-macosx_11_0_arm64.whl", (3, 12))


def test_missing_packages_stop_with_their_names(tmp_path):
    """No wheels: the check stops before any work, names every missing module, and says so in the JSON."""
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    out = tmp_path / "check.json"
    proc = _run(["--cpu-smoke", "--wheel-dir", str(empty), "--out", str(out)], _gpu_machine_env(tmp_path), 120)
    assert proc.returncode == 2, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["complete"] and all(i["status"] == "pending" for i in doc["items"])
    for module, dist in HIDDEN_SHIPPED.items():
        assert f"{module} ({dist})" in doc["error"]
    assert "make gpu-wheels" in doc["error"] and "make gpu-wheels" in proc.stderr


def test_deadline_skips_what_it_cannot_start(tmp_path):
    """Past --deadline-s no item starts: each is recorded as skipped, with the reason, and the JSON is complete."""
    out = tmp_path / "check.json"
    proc = _run(["--cpu-smoke", "--only", "merge/*", "--deadline-s", "0", "--out", str(out)], dict(os.environ), 120)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["complete"] and [i["name"] for i in doc["items"]] == [f"merge/vit_b32/{m}" for m in gpu.MERGES]
    assert all(i["status"] == "skipped" and "deadline" in i["error"] for i in doc["items"])
    assert doc["summary"]["skipped"] == len(gpu.MERGES)


@pytest.mark.slow
def test_cpu_smoke_every_item_and_injected_failures(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for dist in HIDDEN_SHIPPED.values():
        _wheel_from_installed(dist, wheels)
    out = tmp_path / "check.json"
    proc = _run(["--cpu-smoke", "--inject", "fail,hang,crash", "--wheel-dir", str(wheels), "--out", str(out)],
                _gpu_machine_env(tmp_path), 600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    doc = json.loads(out.read_text())

    assert doc["schema"] == gpu.SCHEMA and doc["mode"] == "cpu-smoke" and doc["complete"]
    assert sorted(w["module"] for w in doc["wheels_installed"]) == sorted(HIDDEN_SHIPPED)
    env = doc["environment"]
    assert env["torch"] and env["torch_threads"] >= 1
    assert "site-packages" not in env["open_clip_from"] and "site-packages" not in env["omegaconf_from"]
    assert any("merge.device" in note for note in doc["notes"])
    # what the project's modules on this path import at module level is on the GPU machine or among the wheels
    there = {*gpu.PREINSTALLED, *(s.module for s in gpu.SHIPPED), *sys.stdlib_module_names, "fusion_bench"}
    for module in env["fusion_bench_modules"]:
        source = Path(importlib.util.find_spec(module).origin).read_text()
        for node in ast.parse(source).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            assert all(n.split(".")[0] in there for n in names), (module, names)

    # the same plan as the GPU check, with the self-tests first
    expected = [i.name for i in gpu.plan(gpu.Settings.cpu_smoke(), gpu.INJECTIONS)]
    assert [i["name"] for i in doc["items"]] == expected
    assert [i.name for i in gpu.plan(gpu.Settings.gpu())] == expected[len(gpu.INJECTIONS):]
    items = {i["name"]: i for i in doc["items"]}

    # the injected failures are recorded, each its own way, and the rest ran
    assert items["selftest/fail"]["status"] == "failed" and "injected failure" in items["selftest/fail"]["error"]
    assert "Traceback" in items["selftest/fail"]["result"]["traceback"]
    assert items["selftest/hang"]["status"] == "timed_out" and "budget" in items["selftest/hang"]["error"]
    assert items["selftest/crash"]["status"] == "crashed" and "exit code 3" in items["selftest/crash"]["error"]
    real = [i for i in doc["items"] if i["kind"] != "selftest"]
    assert all(i["status"] == "ok" for i in real), [(i["name"], i["error"]) for i in real if i["status"] != "ok"]
    assert doc["summary"]["ok"] == len(real) and doc["summary"]["logits_fp32_under_bf16"] is True

    for i in real:
        assert i["wall_s"] > 0 and i["error"] is None and i["peak_gpu_mem_gib"] is None  # CPU: no GPU memory
        r = i["result"]
        if i["kind"] == "finetune":
            assert r["mode"] in gpu.MODES and r["precision"] in ("bf16-mixed", "32") and r["arch"] == "tiny-clip"
            for key in ("train_images_per_s", "loader_images_per_s", "eval_images_per_s", "eval_model_images_per_s"):
                assert r[key] > 0, (i["name"], key)
            assert r["eval_logits_dtype"] == "torch.float32" and r["trainable_params"] > 0
        elif i["kind"] == "merge":
            assert r["merge_s"] > 0 and r["merged_finite"] and r["n_tasks"] == 8 and r["merge_device"] == "cpu"
        else:
            assert i["kind"] == "logits" and r["logits_fp32"] and r["modes_failed"] == []
            for mode in gpu.MODES:
                assert r["modes"][mode]["dtypes"]["logits"] == "torch.float32"
                assert r["modes"][mode]["dtypes"]["plain_head_product"] == "torch.bfloat16"
