"""A task whose fine-tune scores 0 or less has no normalized score: null, never a division by ~0."""

import json
import math

from fusion_bench.pipeline import averages, normalized
from fusion_bench.reporting.report import write_report


def _report(per_task: dict) -> dict:
    return {"model": "tiny_t5", "finetune": "standard", "method": "task_arithmetic", "taskpool": "p",
            "scaling_coef": 0.3, "tasks": per_task, **averages(per_task)}


def test_a_zero_or_negative_finetuned_score_has_no_normalized_score(tmp_path, capsys, caplog):
    rows = {"a": (0.5, 0.8, 0.4), "b": (0.1, 0.0, 0.2), "c": (0.0, -0.1, 0.05), "d": (0.6, 0.9, 0.9)}
    per_task = {t: {"zeroshot": z, "finetuned": f, "merged": m, "normalized": normalized(m, f, t)}
                for t, (z, f, m) in rows.items()}
    assert per_task["a"]["normalized"] == 0.4 / 0.8 and per_task["d"]["normalized"] == 1.0
    assert per_task["b"]["normalized"] is None and per_task["c"]["normalized"] is None
    assert "task b: its fine-tune scores 0.0000 on test" in caplog.text

    report = _report(per_task)
    assert math.isclose(report["average"]["normalized"], (0.5 + 1.0) / 2)  # over the two tasks that have one
    assert math.isclose(report["average"]["merged"], (0.4 + 0.2 + 0.05 + 0.9) / 4)
    assert report["average_over"] == {"zeroshot": 4, "finetuned": 4, "merged": 4, "normalized": 2}

    path = write_report(report, tmp_path)
    text = path.read_text()
    back = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no NaN / Infinity
    assert back["tasks"]["b"]["normalized"] is None and back["average_over"]["normalized"] == 2
    md = path.with_suffix(".md").read_text()
    assert "| b | 0.1000 | 0.0000 | 0.2000 | - |" in md
    assert "average normalized over 2 of 4 tasks" in md
    out = capsys.readouterr().out
    assert "average normalized over 2 of 4 tasks" in out and "-8" not in out and "e+" not in out


def test_no_task_with_a_normalized_score_gives_a_null_average():
    per_task = {"a": {"zeroshot": 0.0, "finetuned": 0.0, "merged": 0.0, "normalized": normalized(0.0, 0.0, "a")}}
    assert averages(per_task)["average"]["normalized"] is None
