"""The partial-linearization paper's table on tiny_glue, measured: `python -m fusion_bench.reporting.t5_report DIR`.

`make bench-tiny-t5` fine-tunes the tiny T5 on the eight tiny_glue tasks in three modes (full, LoRA, L-LoRA), merges
each mode's fine-tunes with every method of its sweep (coefficients chosen on val), runs LoraHub over the adapters
and the cosine analysis, then calls this on its folder. It writes `t5_report.md` there (never over an earlier one):

1. the average merged score of every method in every mode, absolute and normalized (merged / fine-tuned per task);
2. per mode, every task's score under every method, absolute (normalized);
3. the mean |cosine| between task vectors per mode;
4. the paper's two claims (Tang et al., "Parameter-Efficient Multi-task Model Fusion with Partial Linearization",
   ICLR 2024) with a verdict computed from those numbers: L-LoRA merges better than LoRA (normalized score, method
   by method), and L-LoRA's task vectors are closer to orthogonal than LoRA's. A comparison passes only by more than
   paper_report.MARGIN, as in the CLIP papers' report.

Where several runs share (mode, method), the newest (last in path order) counts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fusion_bench.reporting.paper_report import MARGIN, Claim, latest, load_runs
from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import md_table
from fusion_bench.store import atomic_write_text

MODES = {"standard": "full", "lora": "LoRA", "l_lora": "L-LoRA"}  # finetune= -> the paper's name
PAPER = "Tang et al., ICLR 2024"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(r: dict | None, task: str | None = None) -> str:
    """'abs (normalized)' of a report's average or of one task."""
    if r is None:
        return "-"
    s = r["average"] if task is None else r["tasks"].get(task)
    return "-" if s is None else f"{_pct(s['merged'])} ({_pct(s.get('normalized'))})"


def _methods(reports: list[dict]) -> list[str]:
    return sorted({r["method"] for r in reports}, key=lambda m: (m != "weight_average", m != "task_arithmetic", m))


def _reports(reports: list[dict]) -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = {}
    for r in sorted(reports, key=lambda r: str(r["_path"])):  # newest last wins
        if r.get("finetune") in MODES:
            out[(r["finetune"], r["method"])] = r
    return out


def _cosines(analyses: list[dict]) -> dict[str, float]:
    out = {}
    for mode in MODES:
        run = latest(analyses, "cosine", finetune=mode)
        if run is not None:
            out[mode] = float(run.get("mean_abs_off_diagonal",
                                      np.abs(np.asarray(run["cosine"])[~np.eye(len(run["tasks"]), dtype=bool)])
                                      .mean()))
    return out


def claim_merging(by: dict[tuple[str, str], dict]) -> Claim:
    c = Claim(f"L-LoRA fine-tunes merge better than LoRA fine-tunes ({PAPER}): higher normalized score, method by "
              "method")
    for method in sorted({m for _, m in by}):
        lo, ll = by.get(("lora", method)), by.get(("l_lora", method))
        if lo is None or ll is None or lo["average"].get("normalized") is None or \
                ll["average"].get("normalized") is None:
            continue
        a, b = lo["average"]["normalized"], ll["average"]["normalized"]
        c.checks.append((f"{method}: L-LoRA {_pct(b)} vs LoRA {_pct(a)}", b > a + MARGIN))
    passed = sum(ok for _, ok in c.checks)
    c.measured = f"{passed} of {len(c.checks)} methods: " + "; ".join(what for what, _ in c.checks) if c.checks else ""
    return c


def claim_orthogonal(cos: dict[str, float]) -> Claim:
    c = Claim(f"L-LoRA task vectors are closer to orthogonal than LoRA's ({PAPER}): lower mean |cos| between tasks")
    if "lora" in cos and "l_lora" in cos:
        c.checks.append((f"L-LoRA {cos['l_lora']:.4f} vs LoRA {cos['lora']:.4f}", cos["l_lora"] < cos["lora"] - MARGIN))
        c.measured = c.checks[0][0]
    return c


def write_t5_report(dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    analyses, reports = load_runs(dirs)
    by = _reports(reports)
    cos = _cosines(analyses)
    out = Path(out or dirs[0])
    modes = [m for m in MODES if any(k[0] == m for k in by)]
    methods = _methods([r for r in by.values()])
    lines = [f"# The partial-linearization paper's table on tiny_glue ({len(by)} merges)", "",
             ("Scores are percentages: absolute merged score (normalized: merged / the task's own fine-tune, "
              "averaged over the tasks with a positive fine-tuned score); coefficients chosen on val. Metrics per "
              "task as GLUE's: Matthews (cola), F1 (mrpc, qqp), Spearman (stsb), accuracy otherwise."), "",
             "## Average over the tasks", ""]
    first = next(iter(by.values()), None)
    ft_row = ["fine-tuned (individual)"] + [_pct(by[next(k for k in by if k[0] == m)]["average"]["finetuned"])
                                           for m in modes]
    zs_row = ["zero-shot"] + [_pct(first["average"]["zeroshot"]) if first else "-" for _ in modes]
    rows = [zs_row, ft_row] + [[m] + [_cell(by.get((mode, m))) for mode in modes] for m in methods]
    lines.append(md_table(["method", *(MODES[m] for m in modes)], rows))
    for mode in modes:
        tasks = sorted(next(r for k, r in by.items() if k[0] == mode)["tasks"])
        ms = [m for m in methods if (mode, m) in by]
        any_r = by[(mode, ms[0])]
        rows = [[t, _pct(any_r["tasks"][t]["zeroshot"]), _pct(any_r["tasks"][t]["finetuned"])]
                + [_cell(by[(mode, m)], t) for m in ms] for t in tasks]
        lines += ["", f"## finetune={mode} ({MODES[mode]}): per task", "",
                  md_table(["task", "zero-shot", "fine-tuned", *ms], rows)]
    if cos:
        lines += ["", "## Task-vector cosine (mean |cos| off the diagonal)", "",
                  md_table(["mode", "mean abs cosine"], [[MODES[m], f"{v:.4f}"] for m, v in cos.items()])]
    claims = [claim_merging(by), claim_orthogonal(cos)]
    lines += ["", "## The paper's claims", "",
              md_table(["#", "claim", "measured", "verdict"],
                       [[i + 1, c.text, c.measured or "-", f"**{c.verdict}**"] for i, c in enumerate(claims)])]
    return atomic_write_text(fresh_path(out / "t5_report.md"), "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="folders holding the runs (searched recursively)")
    p.add_argument("--out", default=None, help="where t5_report.md goes (default: the first folder)")
    args = p.parse_args(argv)
    print(write_t5_report(args.dirs, args.out))


if __name__ == "__main__":
    main()
