"""What run.py's Hydra task function does around the pipeline.

- The run folder must be new: a folder that already holds an earlier run's outputs is refused at the start (not
  with a FileExistsError after all the work).
- A user error (fusion_bench.errors.UserError: a bad option, a broken user file, a full disk) ends an ordinary run
  with one line on stderr, `Error: <message>`, and exit status 1; HYDRA_FULL_ERROR=1 re-raises it for Hydra's
  full traceback, as Hydra does for its own errors. Any other exception goes to Hydra unchanged.
- The console shows the run, not the libraries' chatter: open_clip's INFO lines on the root logger (each model and
  tokenizer it builds) are kept out of the console (run.log keeps them); Lightning's per-fit notices are silenced
  where fine-tunes run (fusion_bench/finetune/train.py).
- In a sweep (-m), a failed job writes `error.json` (its overrides and one-line error) into its folder and re-raises:
  Hydra goes on with the other jobs, the multirun summary lists it (fusion_bench/reporting/summary.py), and Hydra
  reports the error at the end (the message alone for a user error) and exits 1.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fusion_bench.errors import ConfigError, UserError, one_line
from fusion_bench.pipeline import run
from fusion_bench.reporting import finite_json
from fusion_bench.reporting.summary import ERROR_FILE
from fusion_bench.stages.objective import trial_value
from fusion_bench.store import atomic_write_text

HYDRA_OWN = (".hydra",)  # what Hydra writes into a run folder before the job starts (and the job's *.log)


class OpenClipChatter(logging.Filter):
    """open_clip logs every model and tokenizer it builds at INFO on the root logger (ten lines a run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


def quiet_console() -> None:
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and not any(isinstance(f, OpenClipChatter) for f in handler.filters):
            handler.addFilter(OpenClipChatter())


def main(cfg: DictConfig) -> float | None:
    """Returns the trial's average normalized val accuracy under hparams_search=optuna* (the sweeper maximises it)."""
    quiet_console()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    fresh = False
    try:
        check_new_run_dir(run_dir, sweep)
        fresh = True
        return trial_value(cfg, run(cfg, run_dir, method_name=hc.runtime.choices["method"]))
    except Exception as e:
        if sweep:
            if fresh:  # an earlier run's folder keeps its own files
                record_failure(run_dir, e, list(OmegaConf.to_container(hc.overrides.task)))
            raise
        if isinstance(e, UserError) and not full_error_requested():
            sys.stderr.write(f"Error: {one_line(e)}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None
        raise


def full_error_requested() -> bool:
    """HYDRA_FULL_ERROR=1: the traceback of every error, as Hydra gives it for its own."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"  # Hydra's own test (hydra._internal.utils._is_env_set)


def check_new_run_dir(run_dir: Path, sweep: bool = False) -> None:
    """Refuse a run folder that holds an earlier run's outputs (anything but Hydra's .hydra/ and the job's log,
    which this run has just written): outputs are never overwritten, and the clash would come after all the work."""
    earlier = sorted(p.name for p in run_dir.iterdir() if p.name not in HYDRA_OWN and p.suffix != ".log") \
        if run_dir.is_dir() else []
    if earlier:
        where = f"hydra.sweep.dir={run_dir.parent} (job folder {run_dir.name})" if sweep else f"hydra.run.dir={run_dir}"
        raise ConfigError(f"{where}: already holds an earlier run ({', '.join(earlier[:4])}"
                          f"{', ...' if len(earlier) > 4 else ''}); must be a new folder: outputs are never "
                          f"overwritten (the default is new for every run)")


def record_failure(run_dir: Path, error: BaseException, overrides: list[str]) -> Path:
    """error.json in a failed sweep job's folder: what the multirun summary lists for it."""
    record = {"overrides": overrides, "error": one_line(error), "type": type(error).__name__}
    return atomic_write_text(run_dir / ERROR_FILE, finite_json.dumps(record, indent=2))
