"""Analyses against brute-force references; summary of a multirun folder."""

import csv
import json

import numpy as np
import pytest
import torch

from fusion_bench.analyses.cosine import cosine_matrix, gram_matrix
from fusion_bench.reporting.summary import summarize


def _states(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(7, generator=g), "step": torch.tensor(3)}
    fts = [{k: (v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in pre.items()}
           for _ in range(n)]
    return pre, fts


def test_cosine_matrix_matches_flattened_reference():
    pre, fts = _states()
    flat = [torch.cat([(ft[k] - pre[k]).flatten() for k in ("w", "b")]).double() for ft in fts]
    ref = np.array([[torch.nn.functional.cosine_similarity(a, b, dim=0).item() for b in flat] for a in flat])
    np.testing.assert_allclose(cosine_matrix(pre, fts), ref, rtol=1e-6)
    np.testing.assert_allclose(gram_matrix(pre, fts)[0, 1], float(flat[0] @ flat[1]), rtol=1e-6)


def _report(coef, merged, method="task_arithmetic"):
    tasks = {t: {"zeroshot": 0.1, "finetuned": 0.9, "merged": m, "normalized": m / 0.9} for t, m in merged.items()}
    avg = {k: float(np.mean([v[k] for v in tasks.values()])) for k in ("zeroshot", "finetuned", "merged", "normalized")}
    return {"model": "tiny_clip", "finetune": "standard", "method": method, "taskpool": "tiny_eight",
            "scaling_coef": coef, "tasks": tasks, "average": avg}


def test_summary_gathers_a_multirun(tmp_path):
    for i, c in enumerate([0.0, 0.05, 0.15, 0.3]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "report.json").write_text(json.dumps(_report(c, {"a": 0.2 + c, "b": 0.5 - c})))
    summarize(tmp_path)
    rows = list(csv.DictReader((tmp_path / "summary.csv").read_text().splitlines()))
    assert [r["scaling_coef"] for r in rows] == ["0.0", "0.05", "0.15", "0.3"]
    assert float(rows[2]["merged"]) == pytest.approx(0.35)
    assert "0.15000000000000002" not in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "accuracy_vs_coef_tiny_clip_standard_task_arithmetic.png").stat().st_size > 10_000


def test_summary_of_searched_runs_in_job_order(tmp_path):
    """A modes x methods sweep with coefficient search: rows in job order (0, 1, ..., 11, not 0, 1, 10, 11, 2),
    one search-curve plot per finetune mode, one normalized-accuracy heatmap."""
    grid = [0.0, 0.5, 1.0]
    jobs = [(mode, method) for mode in ("standard", "lora") for method in ("task_arithmetic", "ties", "dare")] * 2
    for i, (mode, method) in enumerate(jobs):
        rep = _report(0.5, {"a": 0.3 + 0.01 * i}, method)
        rep.update(finetune=mode, search={"grid": grid, "val_normalized": [0.1, 0.4, 0.2]})
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "report.json").write_text(json.dumps(rep))
    summarize(tmp_path)
    rows = list(csv.DictReader((tmp_path / "summary.csv").read_text().splitlines()))
    assert [r["run"] for r in rows] == [f"{i}/report.json" for i in range(12)]
    for name in ("search_tiny_clip_standard.png", "search_tiny_clip_lora.png", "normalized_tiny_clip.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_summary_plots_runs_with_non_finite_results(tmp_path):
    """report.json writes null for NaN / inf (reporting.finite_json): the curves and the heatmap take it as a gap."""
    from fusion_bench.reporting.finite_json import dumps

    grid = [0.0, 0.5, 1.0]
    for i, (method, coef) in enumerate([("task_arithmetic", 0.0), ("task_arithmetic", 0.5), ("ties", 0.5)]):
        rep = _report(coef, {"a": float("nan") if i == 1 else 0.3, "b": 0.4}, method)
        rep.update(search={"grid": grid, "val_normalized": [0.1, float("nan"), 0.2]})
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "report.json").write_text(dumps(rep))
    summarize(tmp_path)
    assert (tmp_path / "normalized_tiny_clip.png").stat().st_size > 10_000
    assert (tmp_path / "accuracy_vs_coef_tiny_clip_standard_task_arithmetic.png").stat().st_size > 10_000
