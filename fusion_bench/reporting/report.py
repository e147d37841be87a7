"""report.json / report.md in the run directory, and the table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fusion_bench.reporting import finite_json
from fusion_bench.store import atomic_write_text

COLUMNS = ("zeroshot", "finetuned", "merged", "normalized")


def markdown(report: dict) -> str:
    head = (f"# {report['method']} on {report['taskpool']} ({report['model']}, finetune={report['finetune']}, "
            f"scaling_coef={report['scaling_coef']})\n\n")
    lines = ["| task | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    rows = list(report["tasks"].items()) + [("**average**", report["average"])]
    lines += [f"| {t} | " + " | ".join(_cell(r[c], "{:.4f}") for c in COLUMNS) + " |" for t, r in rows]
    lines += _left_out(report)
    if report.get("storage"):  # task-specific merges: what each task costs beyond the shared vector
        bits = report["storage"]["task_bits_per_parameter"]
        lines += ["", (f"Task-specific weights: {max(bits):.3f} bits per parameter per task beyond the shared "
                      f"fp32 vector (32 bits per parameter).")]
    if report.get("learnt_coefficients"):
        c = report["learnt_coefficients"]
        learnt = c.get("weights") or {t: (v if isinstance(v, float) else sum(v) / len(v))
                                      for t, v in c["coefficients"].items()}
        lines += ["", f"Coefficients learnt by {c['strategy']} on {c['inputs']}"
                      f"{' (mean over parameter tensors; coefficients.png)' if c.get('layer_wise') else ''}: "
                      + ", ".join(f"{t} {v:.3f}" for t, v in learnt.items())]
    if report.get("chosen_on_val"):
        lines += ["", f"Chosen on val: {report['chosen_on_val']}"]
    return head + "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    table = Table(title=f"{report['method']} | {report['model']} | finetune={report['finetune']} | "
                        f"scaling_coef={report['scaling_coef']}")
    table.add_column("task")
    for c in COLUMNS:
        table.add_column(c, justify="right")
    for t, r in report["tasks"].items():
        table.add_row(t, *(_cell(r[c], "{:.1f}", 100) for c in COLUMNS))
    table.add_row("average", *(_cell(report["average"][c], "{:.1f}", 100) for c in COLUMNS), style="bold")
    Console().print(table)
    for line in _left_out(report):
        Console().print(line)


def _cell(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else fmt.format(scale * value)


def _left_out(report: dict) -> list[str]:
    """Where an average is over fewer tasks than the table has (a task without a normalized score), say so."""
    n, over = len(report["tasks"]), report.get("average_over") or {}
    return [f"average {c} over {over[c]} of {n} tasks (the others have none: their fine-tune scores 0 or less)"
            for c in COLUMNS if over.get(c, n) < n]


def fresh_path(path: Path) -> Path:
    """Never overwrite an earlier run's output: report.json -> report-1.json, ... if taken."""
    i, p = 0, path
    while p.exists():
        i += 1
        p = path.with_name(f"{path.stem}-{i}{path.suffix}")
    return p


def write_report(report: dict, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    out = atomic_write_text(fresh_path(run_dir / "report.json"), finite_json.dumps(report, indent=2))
    atomic_write_text(out.with_suffix(".md"), markdown(report))
    print_table(report)
    return out
