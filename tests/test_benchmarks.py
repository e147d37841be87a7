"""The benchmark scripts still run (smoke tests on tiny settings; the figures themselves come from `make bench-*`)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_finetune_benchmark_reports_every_column(tmp_path):
    out = _run("fusion_bench.benchmarks.finetune", "--arch", "tiny_clip", "--modes", "standard", "l_lora",
               "--steps", "2", "--warmup", "1", "--batch-size", "8", "--eval-batches", "1", "--json",
               str(tmp_path / "rows.json"))
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["mode"] for r in rows] == ["standard", "l_lora"]
    for r in rows:
        assert r["images_per_s"] > 0 and r["eval_images_per_s"] > 0 and r["train_gflops_per_image"] > 0
    assert rows[0]["trainable_params"] == 828_672 and rows[1]["trainable_params"] < rows[0]["trainable_params"]
    assert rows[1]["train_gflops_per_image"] > rows[0]["train_gflops_per_image"]  # the jvp's tangent pass
    assert out.count("\n| ") == 3  # header + two modes


def test_eval_data_benchmark_runs():
    out = _run("fusion_bench.benchmarks.eval_data", "--images", "12", "--size", "64x48", "--workers", "0")
    assert "| decode every pass | 0 |" in out and "| uint8 cache | 0 |" in out
