"""`stage=analyze analysis=<kind>`: the analyses the seed papers use to explain merging, one file each (cosine,
disentanglement, num_tasks, negation, kernel, heads, landscape, pairwise; common.py and pair_grid.py are what
they share). Each writes numbers (<kind>.json), a Markdown table (<kind>.md) and PNG figures. This package sits
above the stages it calls (fusion_bench/stages) and below fusion_bench/pipeline.py, which dispatches to it."""

from __future__ import annotations

import logging
from pathlib import Path

from fusion_bench.reporting import finite_json
from fusion_bench.reporting.report import fresh_path
from fusion_bench.store import atomic_write_text

log = logging.getLogger(__name__)


def _analyses() -> dict:
    from fusion_bench.analyses import (
        cosine,
        disentanglement,
        heads,
        kernel,
        landscape,
        negation,
        num_tasks,
        pairwise,
    )

    return {"cosine": cosine.run, "disentanglement": disentanglement.run, "num_tasks": num_tasks.run,
            "negation": negation.run, "kernel": kernel.run, "heads": heads.run, "loss_landscape": landscape.run,
            "pairwise": pairwise.run}


def run_analysis(fam, method, analysis_cfg, run_dir: Path, method_name: str) -> dict:
    """`analysis=<kind>`: <kind>.json (numbers), <kind>.md (a table) and PNG figures in the run directory, never
    over an earlier file (a second run into the same folder writes <kind>-1.json, ...)."""
    run_dir, kind = Path(run_dir), analysis_cfg.kind
    analyses = _analyses()
    if kind not in analyses:
        raise ValueError(f"unknown analysis.kind={kind!r}; expected one of {sorted(analyses)}")
    result, md, figures = analyses[kind](fam, method, analysis_cfg, run_dir, method_name)
    result.update(kind=kind, model=fam.cfg.model.name, finetune=fam.mode, method=method_name,
                  taskpool=fam.cfg.taskpool.name, figures=[Path(f).name for f in figures])
    out = atomic_write_text(fresh_path(run_dir / f"{kind}.json"), finite_json.dumps(result, indent=1))
    head = f"# analysis={kind}: {fam.cfg.model.name}, finetune={fam.mode}, method={method_name}\n\n"
    atomic_write_text(out.with_suffix(".md"), head + md + "".join(f"\n![{kind}]({Path(f).name})\n" for f in figures))
    log.info("analysis %s written to %s", kind, out)
    return result
