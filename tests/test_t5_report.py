"""`python -m fusion_bench.reporting.t5_report DIR`: the partial-linearization paper's table and verdicts from the
report.json and cosine JSON files of `make bench-tiny-t5`, on hand-made runs whose verdicts are known."""

import json

from fusion_bench.reporting.t5_report import main, write_t5_report

TASKS = ("cola", "sst2")


def report(path, mode, method, merged, normalized, finetuned=0.8):
    path.mkdir(parents=True)
    tasks = {t: {"zeroshot": 0.3, "finetuned": finetuned, "merged": merged, "normalized": normalized} for t in TASKS}
    tasks["cola"]["normalized"] = None  # a task without a positive fine-tuned score: '-' in its cell
    (path / "report.json").write_text(json.dumps({
        "model": "tiny_t5", "taskpool": "tiny_glue", "finetune": mode, "method": method, "tasks": tasks,
        "average": {"zeroshot": 0.3, "finetuned": finetuned, "merged": merged, "normalized": normalized}}))


def cosine(path, mode, value):
    path.mkdir(parents=True)
    (path / "cosine.json").write_text(json.dumps({
        "kind": "cosine", "finetune": mode, "model": "tiny_t5", "tasks": list(TASKS),
        "cosine": [[1.0, value], [value, 1.0]], "mean_abs_off_diagonal": value}))


def test_table_cells_and_verdicts(tmp_path, capsys):
    report(tmp_path / "a" / "0", "standard", "task_arithmetic", 0.60, 0.75, finetuned=0.9)
    report(tmp_path / "a" / "1", "lora", "task_arithmetic", 0.50, 0.65)
    report(tmp_path / "a" / "2", "l_lora", "task_arithmetic", 0.52, 0.70)  # better by 5 points: passes
    report(tmp_path / "b" / "0", "lora", "ties", 0.55, 0.70)
    report(tmp_path / "b" / "1", "l_lora", "ties", 0.55, 0.702)  # better by less than the margin: no evidence
    cosine(tmp_path / "c" / "0", "lora", 0.10)
    cosine(tmp_path / "c" / "1", "l_lora", 0.02)
    text = write_t5_report([tmp_path]).read_text()
    assert "| task_arithmetic | 60.0 (75.0) | 50.0 (65.0) | 52.0 (70.0) |" in text
    assert "| ties | - | 55.0 (70.0) | 55.0 (70.2) |" in text  # no full fine-tune run: '-'
    assert "| fine-tuned (individual) | 90.0 | 80.0 | 80.0 |" in text
    assert "| cola | 30.0 | 80.0 | 50.0 (-) | 55.0 (-) |" in text  # normalized null shown as '-'
    assert "| LoRA | 0.1000 |" in text and "| L-LoRA | 0.0200 |" in text
    claims = text.split("## The paper's claims")[1]
    rows = [line for line in claims.splitlines() if line.startswith(("| 1", "| 2"))]
    assert "**partly holds**" in rows[0]  # TA passes, TIES within the margin
    assert "**holds**" in rows[1]
    main([str(tmp_path), "--out", str(tmp_path / "out")])  # never over an earlier report
    assert (tmp_path / "out" / "t5_report.md").is_file() and capsys.readouterr().out.strip().endswith(".md")
    write_t5_report([tmp_path])
    assert (tmp_path / "t5_report-1.md").is_file()


def test_no_lora_runs_is_not_measured(tmp_path):
    report(tmp_path / "0", "standard", "task_arithmetic", 0.6, 0.7)
    text = write_t5_report([tmp_path]).read_text()
    assert text.count("**not measured**") == 2
