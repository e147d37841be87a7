"""One report of the seed papers' claims, measured: `python -m fusion_bench.reporting.paper_report DIR [DIR ...]`.

Reads every analysis JSON (`stage=analyze analysis=...`, fusion_bench/evaluation/) and report.json below the
folders given, and writes `paper_report.md` (never over an earlier one: paper_report-1.md, ...) with a `figures/`
folder of the analyses' PNGs, into `--out` (default: the first folder). Each claim is one sentence, the numbers
measured for it, and a verdict computed from those numbers by the checks written next to it: "holds" (every check
passes), "partly holds" (some do), "does not hold" (none does), "not measured" (the runs it needs are missing).
A comparison passes only by more than MARGIN (0.005 absolute): a smaller difference is no evidence either way.
Where several runs of the same analysis and mode exist, the last one in path order (the newest run folder) counts.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusion_bench.reporting.report import fresh_path
from fusion_bench.reporting.tables import md_table
from fusion_bench.store import atomic_write_text

KINDS = ("negation", "kernel", "heads", "loss_landscape", "pairwise", "cosine", "disentanglement", "num_tasks")
HOLDS, PARTLY, FAILS, MISSING = "holds", "partly holds", "does not hold", "not measured"
#: a comparison passes only by more than this (absolute, on accuracies, normalized accuracies, xi and distances):
#: half a point, 2.5 images of a 500-image test split. A smaller difference is no evidence either way.
MARGIN = 0.005


def below(a: float, b: float) -> bool:
    """a < b by more than MARGIN."""
    return a < b - MARGIN


@dataclass
class Claim:
    text: str
    measured: str = ""
    required: int = 1  # checks the claim needs: with fewer measured, it is "not measured"
    checks: list[tuple[str, bool]] = field(default_factory=list)  # (what is compared, whether it passes)
    figures: list[Path] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return verdict([ok for _, ok in self.checks]) if len(self.checks) >= self.required else MISSING


def verdict(checks: Sequence[bool]) -> str:
    if not checks:
        return MISSING
    return HOLDS if all(checks) else PARTLY if any(checks) else FAILS


# ---- reading the runs -----------------------------------------------------------------------------------------
def load_runs(dirs: Sequence[str | Path]) -> tuple[list[dict], list[dict]]:
    """(analyses, reports) below the folders: analysis JSONs by their `kind`, pipeline report.json files."""
    analyses, reports = [], []
    for root in map(Path, dirs):
        if not root.is_dir():
            raise FileNotFoundError(f"paper_report: no folder {root}")
        for path in sorted(root.rglob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(data, dict):
                continue
            data["_path"] = path
            if data.get("kind") in KINDS and "finetune" in data:
                analyses.append(data)
            elif path.name.startswith("report") and "average" in data and "finetune" in data:
                reports.append(data)
    return analyses, reports


def latest(runs: list[dict], kind: str, **match) -> dict | None:
    found = [r for r in runs if r.get("kind", kind) == kind and all(r.get(k) == v for k, v in match.items())]
    return max(found, key=lambda r: str(r["_path"])) if found else None


def figures_of(run: dict | None) -> list[Path]:
    if run is None:
        return []
    folder = run["_path"].parent
    names = run.get("figures") or [p.name for p in sorted(folder.glob(f"{run['kind']}*.png"))]
    return [folder / n for n in names if (folder / n).is_file()]


def xi_mean(run: dict) -> float:
    return float(run.get("xi_mean", np.mean(run["xi"])))


def ta_normalized(analyses: list[dict], reports: list[dict], mode: str) -> tuple[float, str] | None:
    """Normalized task-arithmetic accuracy of `mode`: num_tasks (all tasks merged) or a report.json."""
    run = latest(analyses, "num_tasks", finetune=mode, method="task_arithmetic")
    if run is not None:
        return float(run["normalized"][-1]), f"num_tasks, {run['num_tasks'][-1]} tasks"
    rep = latest(reports, "report", finetune=mode, method="task_arithmetic")
    if rep is not None:
        return float(rep["average"]["normalized"]), "report.json"
    return None


# ---- the claims -----------------------------------------------------------------------------------------------
def claim_negation(analyses: list[dict]) -> Claim:
    c = Claim("Negating a task vector (theta_0 - lambda tau_t) lowers the target task's accuracy while the control "
              "task keeps at least 95% of the pretrained model's accuracy (Ilharco et al., ICLR 2023).", required=2)
    modes = sorted({r["finetune"] for r in analyses if r["kind"] == "negation"}, key=lambda m: (m != "standard", m))
    parts = []
    for mode in modes:  # the newest run of each mode, standard first
        run = latest(analyses, "negation", finetune=mode)
        a, keep = run["average"], run["keep"]
        parts.append(f"finetune={mode}: target {a['target_pretrained']:.1%} -> {a['target']:.1%}, control "
                     f"{a['control_pretrained']:.1%} -> {a['control']:.1%} ({a['control_kept']:.1%} kept)")
        c.checks += [(f"{mode}: target accuracy falls", below(a["target"], a["target_pretrained"])),
                     (f"{mode}: control keeps >= {keep:.0%}", a["control_kept"] >= keep)]
        c.figures += figures_of(run)
    if parts:
        run = latest(analyses, "negation", finetune=modes[0])
        c.measured = f"{len(run['tasks'])} tasks, control {run['control']}, test accuracy averaged over the " \
                     f"tasks; " + "; ".join(parts)
    return c


def claim_mode_vs_standard(analyses: list[dict], reports: list[dict], mode: str, who: str) -> Claim:
    c = Claim(f"{who} fine-tunes have a lower weight disentanglement error and a higher normalized task-arithmetic "
              f"accuracy than standard fine-tunes.", required=2)
    std, other = (latest(analyses, "disentanglement", finetune=m) for m in ("standard", mode))
    parts = [f"no analysis=disentanglement run of finetune={m}" for m, r in (("standard", std), (mode, other))
             if r is None]
    if std is not None and other is not None:
        if std["tasks"] == other["tasks"] and std["grid"] == other["grid"]:
            xs, xo = xi_mean(std), xi_mean(other)
            parts.append(f"xi (mean over the grid, {' x '.join(std['tasks'])}): standard {xs:.3f}, {mode} {xo:.3f}")
            c.checks.append((f"xi {mode} < standard", below(xo, xs)))
            c.figures += figures_of(std) + figures_of(other)
        else:
            parts.append("disentanglement runs of different task pairs or grids: not compared")
    ns, no = ta_normalized(analyses, reports, "standard"), ta_normalized(analyses, reports, mode)
    if ns is not None and no is not None:
        parts.append(f"normalized task arithmetic: standard {ns[0]:.3f} ({ns[1]}), {mode} {no[0]:.3f} ({no[1]})")
        c.checks.append((f"normalized {mode} > standard", below(ns[0], no[0])))
        c.figures += figures_of(latest(analyses, "num_tasks", finetune=mode, method="task_arithmetic"))
    parts += [f"no task-arithmetic num_tasks run or report of finetune={m}" for m, r in (("standard", ns), (mode, no))
              if r is None]
    c.measured = "; ".join(parts)
    return c


def claim_kernel(analyses: list[dict]) -> Claim:
    c = Claim("Attention-only fine-tuning stays closer to its kernel regime than full fine-tuning: a smaller gap "
              "between the fine-tuned model and its post-hoc linearization (Jin et al., ICLR 2025).", required=2)
    std, att = latest(analyses, "kernel", finetune="standard"), latest(analyses, "kernel", finetune="attention")
    if std is None or att is None:
        c.measured = "; ".join(f"no analysis=kernel run of finetune={m}" for m, r in (("standard", std),
                                                                                       ("attention", att)) if r is None)
        return c
    gap = {k: float(np.mean([abs(r["gap"]) for r in run["per_task"].values()])) for k, run in
           (("standard", std), ("attention", att))}
    dist = {"standard": std["average"]["rel_dist_logits"], "attention": att["average"]["rel_dist_logits"]}
    c.measured = (f"mean |acc(f) - acc(f_lin)| over tasks: standard {gap['standard']:.3f}, attention "
                  f"{gap['attention']:.3f}; ||f - f_lin|| / ||f - f_0|| (logits): standard {dist['standard']:.3f}, "
                  f"attention {dist['attention']:.3f}")
    c.checks = [("accuracy gap attention < standard", below(gap["attention"], gap["standard"])),
                ("relative output distance attention < standard", below(dist["attention"], dist["standard"]))]
    c.figures = figures_of(std) + figures_of(att)
    return c


def claim_heads(analyses: list[dict]) -> Claim:
    c = Claim("Task-specific heads trained with the encoder raise the weight disentanglement error compared with "
              "frozen zero-shot heads (disentanglement read through the heads, not only the representation).")
    run = latest(analyses, "heads", finetune="standard") or latest(analyses, "heads")
    if run is None:
        return c
    fr, tr = run["frozen"], run["trained"]
    c.measured = (f"finetune={run['finetune']}, {' x '.join(run['pair'])}: xi frozen {fr['xi_mean']:.3f}, trained "
                  f"{tr['xi_mean']:.3f}; on features xi_rep frozen {fr['xi_rep_mean']:.4f}, trained "
                  f"{tr['xi_rep_mean']:.4f}; task addition normalized frozen {fr['average']['normalized']:.3f}, "
                  f"trained {tr['average']['normalized']:.3f}")
    c.checks = [("xi trained > frozen", below(fr["xi_mean"], tr["xi_mean"]))]
    c.figures = figures_of(run)
    return c


def context(analyses: list[dict]) -> tuple[list[str], list[Path]]:
    """Numbers and figures without a claim: cosine similarity, the loss landscape, pairwise merges, num_tasks."""
    lines, figs = [], []
    for r in [r for r in analyses if r["kind"] == "cosine"]:
        off = np.asarray(r["cosine"])[~np.eye(len(r["tasks"]), dtype=bool)]
        lines.append(f"- task-vector cosine (finetune={r['finetune']}): mean |cos| off the diagonal "
                     f"{np.abs(off).mean():.4f}")
    for r in [r for r in analyses if r["kind"] == "pairwise"]:
        lines.append(f"- pairwise merges ({r['method']}, finetune={r['finetune']}): mean normalized accuracy "
                     f"{r['mean_normalized']:.3f} over {len(r['pairs'])} pairs")
    for r in [r for r in analyses if r["kind"] == "loss_landscape"]:
        m = r["minimum"]
        lines.append(f"- joint loss of {' + '.join(r['tasks'])} (finetune={r['finetune']}): minimum "
                     f"{m['joint_loss']:.3f} at lambda = {m['lambda']}")
    for r in [r for r in analyses if r["kind"] == "num_tasks"]:
        lines.append(f"- normalized accuracy vs tasks merged ({r['method']}, finetune={r['finetune']}): "
                     + ", ".join(f"{k}: {v:.3f}" for k, v in zip(r["num_tasks"], r["normalized"])))
    for r in analyses:
        if r["kind"] in ("cosine", "pairwise", "loss_landscape", "num_tasks"):
            figs += figures_of(r)
    return lines, figs


# ---- writing --------------------------------------------------------------------------------------------------
def _copy_figures(paths: list[Path], folder: Path, copied: dict[Path, str]) -> list[str]:
    names = []
    for p in paths:
        if p not in copied:  # <sweep>_<job>_<figure>.png, e.g. kernel_1_kernel.png
            folder.mkdir(parents=True, exist_ok=True)
            dest = fresh_path(folder / f"{p.parent.parent.name}_{p.parent.name}_{p.name}")
            shutil.copyfile(p, dest)
            copied[p] = f"{folder.name}/{dest.name}"
        names.append(copied[p])
    return names


def write_paper_report(dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    analyses, reports = load_runs(dirs)
    out = Path(out or dirs[0])
    claims = [claim_negation(analyses),
              claim_mode_vs_standard(analyses, reports, "linear", "Linearized (tangent-space; Ortiz-Jimenez et al., "
                                     "NeurIPS 2023)"),
              claim_mode_vs_standard(analyses, reports, "attention", "Attention-only (Jin et al., ICLR 2025)"),
              claim_kernel(analyses), claim_heads(analyses)]
    models = sorted({f"{r['model']} / {r.get('taskpool', '?')}" for r in analyses})
    lines = [f"# The seed papers' claims, measured ({', '.join(models) or 'no runs found'})", "",
             f"From {len(analyses)} analysis runs and {len(reports)} reports under: "
             + ", ".join(f"`{d}`" for d in dirs) + ". Verdicts are computed from the numbers by the checks listed "
             f"with each claim; a comparison passes only by more than {MARGIN} (absolute).", "",
             md_table(["#", "claim", "measured", "verdict"],
                      [[i + 1, c.text, c.measured or "-", f"**{c.verdict}**"] for i, c in enumerate(claims)])]
    copied: dict[Path, str] = {}
    figures = out / "figures"
    for i, c in enumerate(claims):
        lines += ["", f"## {i + 1}. {c.verdict}: {c.text}", "", f"Measured: {c.measured or 'nothing (runs missing)'}",
                  ""]
        lines += [f"- check: {what}: {'yes' if ok else 'no'}" for what, ok in c.checks]
        lines += [f"\n![claim {i + 1}]({name})" for name in _copy_figures(c.figures, figures, copied)]
    ctx, ctx_figs = context(analyses)
    if ctx:
        lines += ["", "## Context (no claim)", "", *ctx]
        lines += [f"\n![context]({name})" for name in _copy_figures(ctx_figs, figures, copied)]
    return atomic_write_text(fresh_path(out / "paper_report.md"), "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="folders holding analysis runs (searched recursively)")
    p.add_argument("--out", default=None, help="where paper_report.md and figures/ go (default: the first folder)")
    args = p.parse_args()
    print(write_paper_report(args.dirs, args.out))


if __name__ == "__main__":
    main()
