"""The end of a hparams_search=optuna* sweep: the best trial (highest objective on val, the first of equals)
is evaluated on test, once, and written next to the trials.

    <sweep dir>/<n>/trial.json      every trial: its val figures and the value it returned (no test figure)
    <sweep dir>/best/report.json    the best trial's config run again without `objective`: the ordinary report
    <sweep dir>/optuna_best.json    the best trial: its number, parameters, val figures and test accuracies,
    <sweep dir>/optuna_best.md      and every trial's value

Called by the summary callback (fusion_bench/reporting/summary.py) before it tabulates the sweep.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fusion_bench.reporting import finite_json
from fusion_bench.reporting.report import fresh_path
from fusion_bench.stages.objective import TRIAL_FILE
from fusion_bench.store import atomic_write_text

log = logging.getLogger(__name__)


def load_trials(sweep_dir: Path) -> list[dict]:
    """Every trial.json of the sweep with its job number, in job order."""
    trials = []
    for path in sweep_dir.glob(f"*/{TRIAL_FILE}"):
        if not path.parent.name.isdigit():
            continue
        rec = json.loads(path.read_text())
        rec["job"] = int(path.parent.name)
        overrides = path.parent / ".hydra" / "overrides.yaml"
        rec["overrides"] = list(OmegaConf.load(overrides)) if overrides.is_file() else None
        trials.append(rec)
    return sorted(trials, key=lambda r: r["job"])


def _optuna_results(sweep_dir: Path) -> dict | None:
    path = sweep_dir / "optimization_results.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"  # a task without a normalized score (its fine-tune scores 0)


def _markdown(best: dict, test: dict, trials: list[dict]) -> str:
    lines = [(f"# Best of {len(trials)} trials: trial {best['job']} ({best['method']} on {best['taskpool']}, "
              f"{best['model']}, finetune={best['finetune']})"), "",
             f"{best['objective']} on val: {best['value']:.4f}; parameters: {' '.join(best['params'])}", "",
             "| task | merged val | normalized val | merged test | normalized test |",
             "|---|---|---|---|---|"]
    for t, v in best["tasks"].items():
        lines.append(f"| {t} | {v['merged_val']:.4f} | {v['normalized_val']:.4f} "
                     f"| {test['tasks'][t]['merged']:.4f} | {_f(test['tasks'][t]['normalized'])} |")
    avg = test["average"]
    mean_val = sum(v["merged_val"] for v in best["tasks"].values()) / len(best["tasks"])
    lines += [(f"| **average** | {mean_val:.4f} | {best['value']:.4f} | {avg['merged']:.4f} "
               f"| {_f(avg['normalized'])} |"), "",
              "Test figures are for this trial only. Every trial (val):", "",
              "| trial | value | parameters |", "|---|---|---|"]
    lines += [f"| {r['job']} | {r['value']:.4f} | {' '.join(r['params'])} |" for r in trials]
    return "\n".join(lines) + "\n"


def report_best_trial(config: DictConfig) -> Path | None:
    """Evaluate the sweep's best trial on test and write optuna_best.json / .md; None if no trial finished."""
    from fusion_bench.pipeline import run

    sweep_dir = Path(config.hydra.sweep.dir)
    trials = load_trials(sweep_dir)
    if not trials:
        log.warning("no %s under %s: no trial finished, no best trial to test", TRIAL_FILE, sweep_dir)
        return None
    common = set(config.hydra.overrides.task)  # the sweep's own overrides; the rest sets the trials apart
    for r in trials:
        r["params"] = [o for o in r["overrides"] or [] if o not in common]
    best = max(trials, key=lambda r: (r["value"], -r["job"]))
    optuna = _optuna_results(sweep_dir)
    if optuna and optuna.get("best_value") != best["value"]:
        log.warning("optimization_results.yaml says best_value %s, the trials' best is %s (trial %d)",
                    optuna.get("best_value"), best["value"], best["job"])
    cfg = OmegaConf.load(sweep_dir / str(best["job"]) / ".hydra" / "config.yaml")
    cfg.objective = None  # the ordinary run: test figures, report.json, the merged model
    out = fresh_path(sweep_dir / "best")
    log.info("best trial %d (%s %.4f on val): evaluating it on test in %s", best["job"], best["objective"],
             best["value"], out)
    test = run(cfg, out, best["method"])
    record = {"best_trial": best["job"], "objective": best["objective"], "value": best["value"],
              "params": best["params"], "overrides": best["overrides"],
              "optuna_params": (optuna or {}).get("best_params"),
              "val": best["tasks"], "test": test["tasks"], "test_average": test["average"],
              "report": str((out / "report.json").relative_to(sweep_dir)),
              "trials": [{"trial": r["job"], "value": r["value"], "params": r["params"]} for r in trials]}
    path = atomic_write_text(fresh_path(sweep_dir / "optuna_best.json"), finite_json.dumps(record, indent=2))
    atomic_write_text(path.with_suffix(".md"), _markdown(best, test, trials))
    log.info("best trial written to %s", path)
    return path
