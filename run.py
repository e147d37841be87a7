"""fusion_bench entry point: `python run.py method=ties model=tiny_clip taskpool=tiny_eight finetune=standard`."""

import os
from pathlib import Path

# OpenMP threads that spin while waiting make torch many times slower on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fusion_bench.pipeline import run
from fusion_bench.stages.objective import trial_value


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the trial's average normalized val accuracy under hparams_search=optuna* (the sweeper maximises it)."""
    hc = HydraConfig.get()
    return trial_value(cfg, run(cfg, Path(hc.runtime.output_dir), method_name=hc.runtime.choices["method"]))


if __name__ == "__main__":
    main()
