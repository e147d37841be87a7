"""The Hydra callback of every multirun (conf/config.yaml hydra.callbacks.summary): when the sweep ends, the best
trial's test report first (hparams_search=optuna*), then the summary of all jobs (fusion_bench/reporting/summary.py);
and after each job once a job of the sweep has failed: Hydra's sweeper raises the first failure after the last job
instead of ending the multirun, so the summary of the jobs that succeeded is written then. It sits above both
reporting/ and hparams/ (the best trial runs the pipeline again)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from fusion_bench.reporting.summary import load_failures, summarize


class SummaryCallback(Callback):
    def on_job_end(self, config, job_return: JobReturn, **kwargs) -> None:
        """Once a job of the sweep has failed, the summary after each job: the multirun will not end normally."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        root = Path(config.hydra.sweep.dir)
        if job_return.status == JobStatus.FAILED or load_failures(root):
            summarize(root)

    def on_multirun_end(self, config, **kwargs) -> None:
        if config.get("objective"):  # hparams_search=optuna*: the best trial alone is evaluated on test first
            from fusion_bench.hparams.best_trial import (
                report_best_trial,  # the pipeline: only for Optuna sweeps
            )

            report_best_trial(config)
        summarize(config.hydra.sweep.dir)
